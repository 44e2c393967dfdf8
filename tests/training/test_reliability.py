"""Nothing lost: kill -9, SIGTERM, a second `train` on the same run, full and read-only disks, NaN.

The README's "Guarantees" section states what these tests check; keep the two in step.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import difftool
from difftool import config as config_mod
from difftool.errors import UserError
from difftool.models.load import load_model
from difftool.rundir import LOCK_FILE, RunDir
from difftool.runlock import run_lock
from difftool.training.loop import train
from difftool.training.plan import plan_training
from tests.conftest import (
    FIXTURE_RUN,
    RELEASED_RUNS,
    assert_user_error,
    difftool_cmd,
    invoke,
    tiny_config,
)
from tests.training.conftest import assert_same_weights, model_weights


def write_recipe(path: Path, *overrides: str) -> Path:
    path.write_text(config_mod.dump_yaml(tiny_config(*overrides)))
    return path


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders anywhere in a run folder (a write that never completed)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".tmp-*"))


def logged(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def check_loads(checkpoint: Path) -> None:
    """What `--resume` and `difftool sample CHECKPOINT` read from a checkpoint, all of it."""
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == int(checkpoint.name.split("-")[1])
    load_model(checkpoint)
    load_file(checkpoint / "model.safetensors")
    states = sorted([*checkpoint.glob("*.bin"), *checkpoint.glob("*.pkl")])
    assert [p.name for p in states] == ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "optimizer.bin",
                                        "random_states_0.pkl"]
    for path in states:
        torch.load(path, weights_only=False)  # written by this test's own run: trusted


# ---------------------------------------------------------------- the run lock


def test_a_held_lock_refuses_a_second_holder_and_names_the_owner(tmp_path):
    with run_lock(tmp_path / "run") as lock:
        owner = json.loads(lock.read_text())
        assert owner["pid"] == os.getpid()
        refused = rf"in use by another difftool train \(pid {os.getpid()} on .* per train.lock\); wait for it"
        with pytest.raises(UserError, match=refused), run_lock(tmp_path / "run"):
            pass
    assert not (tmp_path / "run").exists(), "a folder made only for the lock is removed with it"


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "since": "yesterday"}))
    result = train(tiny_config("train.max_steps=2"), run)
    assert result.finished
    assert f"taking over {run / LOCK_FILE} from pid {dead.pid} on elsewhere, which is no longer running" \
        in " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert not (run / LOCK_FILE).exists()


def test_a_refused_start_leaves_no_folder_behind(tmp_path):
    with pytest.raises(UserError, match="fewer than train.batch_size"):
        train(tiny_config("data.num_images=4"), tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_second_train_on_a_running_run_is_refused_and_sigterm_saves(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", "train.max_steps=100000", "checkpoint.every=100000",
                          "sample.every=100000", "log.every=2")
    out = tmp_path / "run"
    proc = subprocess.Popen(difftool_cmd() + ["train", "--recipe", str(recipe), "--output", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    for extra in ([], ["--overwrite"]):
        second = invoke("train", "--recipe", recipe, "--output", out, *extra)
        assert_user_error(second, f"{out} is in use by another difftool train (pid {proc.pid} on")
    assert proc.poll() is None, "the refused commands must not disturb the running one"

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped at step" in err and "Traceback" not in err
    checkpoint = RunDir(out).latest_checkpoint()
    check_loads(checkpoint)
    assert not (out / LOCK_FILE).exists() and not leftovers(out)


# ---------------------------------------------------------------- full or read-only disks


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resumes(tmp_path, monkeypatch):
    reference = train(tiny_config(), tmp_path / "reference")
    real_save = Accelerator.save_state

    def save_then_run_out_of_space(self, output_dir=None, **kwargs):
        real_save(self, output_dir, **kwargs)  # a partly written checkpoint folder, as a full disk leaves it
        if output_dir.endswith("step-000006"):
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "optimizer.bin"))

    monkeypatch.setattr(Accelerator, "save_state", save_then_run_out_of_space)
    run = RunDir(tmp_path / "full")
    with pytest.raises(UserError, match=r"^No space left on device: .*step-000006/optimizer.bin; the newest "
                                        r"complete checkpoint is .*step-000003\. Free space or fix permissions, "
                                        r"then continue with: difftool train --resume"):
        train(tiny_config(), run.root)
    assert [c.name for c in run.checkpoints()] == ["step-000003"]
    check_loads(run.checkpoints()[0])
    assert not leftovers(run.root) and not (run.root / LOCK_FILE).exists() and not run.model_dir.exists()

    monkeypatch.undo()  # space freed
    plan = plan_training(resume=str(run.root))
    train(plan.cfg, plan.output, resume=plan.resume)
    assert_same_weights(model_weights(run.root), model_weights(reference.run))
    assert logged(run.root) == logged(reference.run)


def test_a_kill_while_exporting_the_model_is_finished_by_resume(tmp_path):
    result = train(tiny_config(), tmp_path / "run")
    exported = model_weights(result.run)
    shutil.rmtree(result.run / "model")  # killed after the last checkpoint, before model/ was in place
    plan = plan_training(resume=str(result.run))
    again = train(plan.cfg, plan.output, resume=plan.resume)
    assert again.finished and again.step == 6
    assert_same_weights(model_weights(result.run), exported)
    with pytest.raises(UserError, match="already trained to step 6"):
        train(plan.cfg, plan.output, resume=plan.resume)


# ---------------------------------------------------------------- kill -9


def launch(recipe: Path, run: Path, log: Path) -> subprocess.Popen:
    """`train` into `run`: a fresh start while it has no complete checkpoint, else `--resume`."""
    if RunDir(run).latest_checkpoint():
        args = ["--resume", str(run)]
    else:
        args = ["--recipe", str(recipe), "--output", str(run), "--overwrite"]
    return subprocess.Popen(difftool_cmd() + ["train", *args, "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def listing(folder: Path) -> set[str]:
    """What `folder` holds now; nothing while it does not exist (a fresh start with --overwrite removes the run
    folder at a moment of its choosing, so checking first and listing after would race it)."""
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        return set()


def wait_for_checkpoint_writes(run: Path, proc: subprocess.Popen) -> None:
    """Until the process starts its next checkpoint (or ends): start-up is not what this test is about."""
    folder = RunDir(run).checkpoints_dir
    before = listing(folder)
    deadline = time.monotonic() + 120
    while proc.poll() is None and listing(folder) == before:
        assert time.monotonic() < deadline, "no checkpoint activity within 2 minutes"
        time.sleep(0.002)


KILLS = 8


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_and_resume_is_exact(tmp_path):
    """8 SIGKILLs of a run that checkpoints (and rotates) every step: every other one the moment a checkpoint
    starts to be written, the others at random moments after. Each kill costs a start-up (about 10 s on
    2 cores, importing the model stack), so the kills are few and half of them aimed."""
    recipe = write_recipe(tmp_path / "tiny.yaml", "train.max_steps=30", "checkpoint.every=1",
                          "checkpoint.total_limit=2", "sample.every=10", "log.every=1")
    reference = tmp_path / "reference"  # trained in-process: only the killed runs need processes of their own
    train(plan_training(recipe=str(recipe), output=reference).cfg, reference)
    rng = random.Random(20261130)
    chains, kills, mid_write = [tmp_path / "chain-0"], 0, 0
    while kills < KILLS:
        run = chains[-1]
        if (run / "model" / "difftool.json").is_file():  # finished, though killed before the process ended
            chains.append(tmp_path / f"chain-{len(chains)}")
            continue
        log = tmp_path / f"log-{kills}.txt"
        had_checkpoint = RunDir(run).latest_checkpoint() is not None
        proc = launch(recipe, run, log)
        wait_for_checkpoint_writes(run, proc)
        time.sleep(rng.uniform(0, 0.3) if kills % 2 else 0)
        if proc.poll() is not None:  # finished before the kill: check it, go on with a new run
            assert proc.returncode == 0, log.read_text()[-2000:]
            chains.append(tmp_path / f"chain-{len(chains)}")
            continue
        proc.kill()
        proc.wait()
        kills += 1
        if had_checkpoint:
            assert "taking over" in log.read_text(), "the resumed run takes over the killed run's lock"
        mid_write += bool(leftovers(run))
        for checkpoint in RunDir(run).checkpoints():
            check_loads(checkpoint)
    # The last run is completed without interruption (unless the last kill came once it had exported its
    # model, while it was recording the end of its session: then it is finished, and a resume is refused).
    last = chains[-1]
    if not (last / "model" / "difftool.json").is_file():
        resume = str(last) if RunDir(last).latest_checkpoint() else None
        plan = plan_training(recipe=None if resume else str(recipe), output=last, resume=resume)
        assert train(plan.cfg, plan.output, resume=plan.resume, overwrite=not resume).finished

    assert mid_write >= 3, f"only {mid_write} of {KILLS} kills landed while a checkpoint was being written"
    for run in chains:
        assert_same_weights(model_weights(run), model_weights(reference))
        assert logged(run) == logged(reference)
        assert not leftovers(run) and not (run / LOCK_FILE).exists()


# ---------------------------------------------------------------- a real full / read-only file system


def run_in_private_mounts(script: str, tmp_path: Path) -> None:
    """Run a shell script in its own mount namespace, where it may mount small tmpfs file systems.

    `unshare -rm` needs no root where user namespaces are enabled; elsewhere the test is skipped
    (the monkeypatched full-disk test above still runs).
    """
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespaces here (unshare -rm)")
    proc = subprocess.run(["unshare", "-rm", "sh", "-euc", script], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def one_error_line(path: Path) -> str:
    """The error a command ended with: one line, its last, and no traceback before it."""
    text = path.read_text()
    errors = [ln for ln in text.splitlines() if ln.startswith("difftool: error: ")]
    assert len(errors) == 1 and text.rstrip().endswith(errors[0]) and "Traceback" not in text, text[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_really_full_then_read_only_disk(tmp_path):
    """Train onto a 1.6 MB tmpfs (room for one checkpoint, not two), then try to resume on it read-only."""
    recipe = write_recipe(tmp_path / "tiny.yaml", "checkpoint.total_limit=1", "sample.every=100000")
    exe = " ".join(difftool_cmd())
    run_in_private_mounts(f"""
        mkdir disk
        mount -t tmpfs -o size=1600k tmpfs disk
        rc=0; {exe} train --recipe {recipe} --output disk/run --quiet 2> full.txt || rc=$?; echo $rc > full.rc
        cp -a disk/run copy
        mount -o remount,ro disk
        rc=0; {exe} train --resume disk/run --quiet 2> ro.txt || rc=$?; echo $rc > ro.rc
    """, tmp_path)
    assert (tmp_path / "full.rc").read_text().strip() == "2"
    line = one_error_line(tmp_path / "full.txt")
    assert "No space left on device" in line and "newest complete checkpoint is disk/run/checkpoints/step-000003" in line
    copy = RunDir(tmp_path / "copy")
    assert [c.name for c in copy.checkpoints()] == ["step-000003"]
    check_loads(copy.checkpoints()[0])
    assert not leftovers(copy.root) and not (copy.root / LOCK_FILE).exists() and not copy.model_dir.exists()

    assert (tmp_path / "ro.rc").read_text().strip() == "2"
    assert "Read-only file system: disk/run/train.lock" in one_error_line(tmp_path / "ro.txt")


@pytest.mark.slow
def test_sampling_onto_a_full_disk_keeps_finished_images_and_resume_completes_them(tiny_run, tmp_path):
    exe = " ".join(difftool_cmd())
    sample = f"{exe} sample {tiny_run} -n 30 --batch-size 2 --steps 2 --scheduler ddim -o disk/out -q"
    run_in_private_mounts(f"""
        mkdir disk
        mount -t tmpfs -o size=48k tmpfs disk
        rc=0; {sample} 2> full.txt || rc=$?; echo $rc > full.rc
        ls -a disk/out > kept.txt
        mount -o remount,size=4m disk
        {sample} --resume 2> resumed.txt
        cp -a disk/out out
    """, tmp_path)
    assert (tmp_path / "full.rc").read_text().strip() == "2"
    assert "No space left on device" in one_error_line(tmp_path / "full.txt")
    kept = [n for n in (tmp_path / "kept.txt").read_text().split() if n.endswith(".png")]
    assert 0 < len(kept) < 30 and not any(n.startswith(".tmp-") for n in kept)
    assert f"{30 - len(kept)} new of 30" in (tmp_path / "resumed.txt").read_text()
    reference = tmp_path / "reference"
    subprocess.run(sample.replace("disk/out", str(reference)).split(), check=True, capture_output=True, timeout=300)
    made = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert made == sorted(p.name for p in reference.glob("*.png"))
    for name in made:
        assert (tmp_path / "out" / name).read_bytes() == (reference / name).read_bytes(), name


# ---------------------------------------------------------------- version skew



@pytest.fixture
def old_run(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE_RUN, tmp_path / "old-run"))


@pytest.mark.parametrize("version", RELEASED_RUNS)
def test_a_run_made_by_a_released_difftool_samples_inspects_and_resumes(version, tmp_path):
    old_run = Path(shutil.copytree(RELEASED_RUNS[version], tmp_path / "old-run"))
    assert json.loads((old_run / "model" / "difftool.json").read_text())["difftool_version"] == version
    for source in (old_run, old_run / "model", old_run / "checkpoints" / "step-000002"):
        assert list(load_model(source).unet.config.block_out_channels) == [4, 8]
    sampled = invoke("sample", old_run, "-n", "2", "--steps", "2", "-o", tmp_path / "s", "-q")
    assert sampled.exit_code == 0, sampled.output
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2
    assert invoke("inspect", old_run).exit_code == 0
    plan = plan_training(resume=str(old_run), values={"train.max_steps": 4})
    assert train(plan.cfg, plan.output, resume=plan.resume).finished
    assert [step for step, _ in logged(old_run)] == [2, 4]  # logged at the last step of each session


def test_a_run_records_the_version_that_made_it(tiny_run):
    """So the version-skew guard and the report can tell a run of an older difftool from one of this."""
    recorded = [config_mod.read_config_yaml(tiny_run / "config.yaml")["difftool_version"],
                json.loads((tiny_run / "model" / "difftool.json").read_text())["difftool_version"],
                json.loads((tiny_run / "checkpoints" / "step-000006" / "progress.json").read_text())["difftool_version"],
                json.loads((tiny_run / "sessions.jsonl").read_text().splitlines()[0])["difftool_version"]]
    assert recorded == [difftool.__version__] * 4


def test_a_config_written_by_a_newer_difftool_says_which_version(old_run):
    text = (old_run / "config.yaml").read_text().replace("difftool_version: 0.1.0", "difftool_version: 9.0.0")
    (old_run / "config.yaml").write_text(text.replace("train:\n", "train:\n  future_knob: 3\n"))
    this = re.escape(difftool.__version__)
    with pytest.raises(UserError, match=rf"config.yaml was written by difftool 9.0.0 and this is difftool {this}: "
                                        r"unknown config key 'train.future_knob'.*Use difftool 9.0.0 for this run"):
        plan_training(resume=str(old_run))


def test_a_checkpoint_this_version_cannot_restore_names_the_versions_that_wrote_it(old_run):
    checkpoint = old_run / "checkpoints" / "step-000002"
    progress = json.loads((checkpoint / "progress.json").read_text())
    (checkpoint / "progress.json").write_text(json.dumps({**progress, "accelerate_version": "0.20.0"}))
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.bin")  # a layout this torch rejects
    plan = plan_training(resume=str(old_run), values={"train.max_steps": 4})
    with pytest.raises(UserError, match=r"cannot resume from .*step-000002 \(ValueError: .*\); it was written by "
                                        r"difftool 0.1.0 \(diffusers .*, accelerate 0.20.0, torch .*\) and this is "
                                        rf"difftool {re.escape(difftool.__version__)} .*Install those versions to resume it"):
        train(plan.cfg, plan.output, resume=plan.resume)


DAMAGE = {
    "progress.json deleted": (lambda c: (c / "progress.json").unlink(), "its progress.json is missing"),
    "progress.json cut short": (lambda c: (c / "progress.json").write_text('{"step": '),
                                "its progress.json is damaged (Expecting value"),
    "weights cut short": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:999]),
                          "it does not load ("),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_names_the_complete_one_and_the_command(tmp_path, damage):
    """However the newest checkpoint is damaged, resuming the run says what, and from where to resume instead."""
    run = train(tiny_config(), tmp_path / "run").run
    newest, earlier = run / "checkpoints" / "step-000006", run / "checkpoints" / "step-000003"
    spoil, problem = DAMAGE[damage]
    spoil(newest)
    line = assert_user_error(invoke("train", "--resume", run, "--max-steps", "8", "-q"),
                             f"cannot resume from {newest}: {problem}")
    assert line.endswith(f"; the newest complete checkpoint is {earlier}: difftool train --resume {earlier}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"], "nothing changed"
    result = invoke("train", "--resume", earlier, "--max-steps", "8", "-q")  # the command it names
    assert result.exit_code == 0, result.output
    check_loads(newest)  # written again on the way to step 8


# ---------------------------------------------------------------- SIGTERM while sampling


@pytest.mark.slow
def test_sigterm_while_sampling_keeps_finished_images_and_resume_completes_them(tiny_run, tmp_path):
    out = tmp_path / "out"
    cmd = difftool_cmd() + ["sample", str(tiny_run), "-n", "60", "--batch-size", "2", "--steps", "10", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("0*.png"))) < 4:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    kept = len(list(out.glob("0*.png")))
    assert 4 <= kept < 60 and not leftovers(out)
    # The resume runs in-process (a start-up less): the interruption above is the one that needs a real process.
    resumed = invoke(*cmd[len(difftool_cmd()):], "--resume", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert f"{60 - kept} new of 60" in resumed.stderr
    reference = tmp_path / "reference"
    assert invoke(*cmd[len(difftool_cmd()):-2], "-o", reference, "-q").exit_code == 0
    for image in sorted(reference.glob("0*.png")):
        assert (out / image.name).read_bytes() == image.read_bytes(), image.name
