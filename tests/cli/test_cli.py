"""The `difftool` command: CliRunner for each path, the installed executable for the end-to-end ones."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from difftool import __version__
from difftool import config as config_mod
from difftool.cli import launch as launch_mod
from difftool.errors import UserError
from difftool.rundir import PROGRESS_FILE, RunDir
from tests.conftest import assert_user_error, invoke, tiny_config

pytestmark = pytest.mark.usefixtures("scratch_cwd")


def make_run(root: Path, *steps: int) -> RunDir:
    """A run folder as training leaves it, without training: config.yaml and checkpoint markers."""
    run = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    run.config.write_text(config_mod.dump_yaml(tiny_config()))
    for step in steps:
        run.checkpoint(step).mkdir(parents=True)
        (run.checkpoint(step) / PROGRESS_FILE).write_text(json.dumps({"step": step}))
    return run


def dry_run_config(stdout: str) -> config_mod.Config:
    return config_mod.config_from_dict(config_mod.parse_yaml(stdout))


# ---------------------------------------------------------------- app


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"difftool {__version__}"


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "train" in result.stdout and "recipes" in result.stdout
    # The one-line summary in the command list stops before the examples.
    train_line = next(ln for ln in result.stdout.splitlines() if " train " in ln)
    assert "Examples" not in train_line


def test_help_version_and_usage_errors_do_not_import_the_model_stack():
    """torch and diffusers take seconds to import; --help, --version and a mistyped option must not wait for them."""
    code = ("import sys; from difftool.cli.app import app; "
            "print(sorted(m for m in ('torch', 'diffusers', 'accelerate', 'datasets') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_missing_model_path_or_a_mistyped_setting_is_refused_before_the_model_stack_is_imported(tmp_path):
    """A mistyped path or --set should not wait 4-10 seconds for torch and diffusers to be refused."""
    missing = tmp_path / "runs" / "typo"
    code = textwrap.dedent(f"""
        import sys
        from difftool.cli.app import app
        for argv in (["sample", "{missing}"], ["inspect", "{missing}"], ["convert", "{missing}", "out"],
                     ["evaluate", "{missing}"], ["inpaint", "a.png", "m.png", "--model", "{missing}"],
                     ["noise", "a.png", "--model", "{missing}"], ["img2img", "a.png", "--model", "{missing}"],
                     ["interpolate", "{missing}", "--seeds", "0", "1"],
                     ["train", "--set", "train.batchsize=3", "--dry-run"]):
            try:
                app(argv)
            except SystemExit as stop:
                print(argv[0], stop.code, sorted(m for m in ("torch", "diffusers") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.stdout.splitlines() == [f"{command} 2 []" for command in ("sample", "inspect", "convert", "evaluate",
                                                                           "inpaint", "noise", "img2img", "interpolate",
                                                                           "train")], proc.stderr
    assert proc.stderr.count(f"{missing} does not exist") == 8
    assert "give a folder of images, a samples .npz or a model" in proc.stderr  # evaluate's remedy
    assert "unknown config key 'train.batchsize'; did you mean 'train.batch_size'?" in proc.stderr


def test_train_help_ends_with_examples():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    assert any(ln.strip() == "Examples:" for ln in result.stdout.splitlines())
    assert "difftool train --recipe cifar10" in result.stdout


# ---------------------------------------------------------------- recipes


def test_recipes_list_shows_all_four():
    result = invoke("recipes", "list")
    assert result.exit_code == 0, result.output
    for name in ("cifar10", "folder64", "mnist", "quickstart"):
        assert name in result.stdout
    assert "800000" in result.stdout  # the cifar10 row's steps


def test_recipes_show():
    result = invoke("recipes", "show", "cifar10")
    assert result.exit_code == 0, result.output
    assert "block_out_channels: [128, 256, 256, 256]" in result.stdout
    assert "dataset: cifar10" in result.stdout


def test_recipes_show_unknown_suggests():
    assert_user_error(invoke("recipes", "show", "cifr10"), "unknown recipe 'cifr10'; did you mean 'cifar10'?")


def test_recipes_cp_writes_an_editable_copy_and_never_overwrites(tmp_path):
    dest = tmp_path / "edit" / "my.yaml"
    result = invoke("recipes", "cp", "cifar10", dest)
    assert result.exit_code == 0, result.output
    assert f"wrote {dest}" in result.stdout
    assert dest.read_text() == config_mod.recipe_text("cifar10")
    assert config_mod.load_config(str(dest)) == config_mod.load_config("cifar10", ["recipe=my"])

    dest.write_text("# my edits\n")
    assert_user_error(invoke("recipes", "cp", "mnist", dest), f"{dest} already exists")
    assert dest.read_text() == "# my edits\n"


def test_recipes_cp_unknown_recipe_writes_nothing(tmp_path):
    assert_user_error(invoke("recipes", "cp", "nope", tmp_path / "x.yaml"), "unknown recipe 'nope'")
    assert not (tmp_path / "x.yaml").exists()


# ---------------------------------------------------------------- train --dry-run


def test_train_dry_run_prints_resolved_config_and_run_folder(tmp_path):
    out = tmp_path / "my-run"
    result = invoke("train", "--recipe", "cifar10", "--set", "train.batch_size=64", "--set", "train.lr=1e-4",
                    "--max-steps", "10", "--output", out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"# run folder: {out}"
    cfg = dry_run_config(result.stdout)
    assert cfg == config_mod.load_config("cifar10", ["train.batch_size=64", "train.lr=1e-4", "train.max_steps=10"])
    assert "difftool_version: " + __version__ in result.stdout
    assert not out.exists()  # a dry run writes nothing


def test_train_dry_run_picks_recipe_and_folder_from_the_dataset(tmp_path):
    result = invoke("train", "--dataset", "mnist", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == ["# recipe mnist: the recipe made for mnist",
                                              f"# run folder: {Path('runs/mnist-mnist')}"]
    assert dry_run_config(result.stdout).recipe == "mnist"
    assert not (tmp_path / "runs").exists()


def test_train_on_a_folder_without_a_gpu_chooses_folder32_and_says_why(tmp_path):
    (tmp_path / "photos").mkdir()
    result = invoke("train", "--dataset", tmp_path / "photos", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("# recipe folder32: no GPU here")
    cfg = dry_run_config(result.stdout)
    assert (cfg.recipe, cfg.data.resolution, cfg.data.dataset) == ("folder32", 32, str(tmp_path / "photos"))


def test_train_dry_run_refuses_a_dataset_folder_that_is_not_there(tmp_path):
    result = invoke("train", "--dataset", tmp_path / "nowhere", "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"difftool: error: dataset folder not found: {tmp_path / 'nowhere'}; check the path, "
                                      "or use --dataset shapes for the built-in data")


def test_training_says_in_its_first_line_which_recipe_it_chose_and_why(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (10 * i, 20, 30)).save(tmp_path / "photos" / f"{i}.png")
    result = invoke("train", "--dataset", "photos", "--max-steps", "1", "--batch-size", "2", "--output", "run",
                    "--set", "sample.num_images=1", "--set", "sample.steps=2")
    assert result.exit_code == 0, result.output
    first = " ".join(result.stderr.split("\n\n")[0].split())  # rich wraps long lines
    assert first.startswith("training folder32 (chosen: no GPU here: 32 px"), first


def test_train_dry_run_typed_flags(tmp_path):
    result = invoke("train", "--resolution", 16, "--batch-size", 8, "--seed", 3, "--mixed-precision", "bf16",
                    "--channels", 1, "--dry-run")
    assert result.exit_code == 0, result.output
    cfg = dry_run_config(result.stdout)
    assert (cfg.data.resolution, cfg.train.batch_size, cfg.train.seed) == (16, 8, 3)
    assert cfg.train.mixed_precision == "bf16" and cfg.data.channels == 1


def test_train_dry_run_resume_uses_the_saved_config(tmp_path):
    run = make_run(tmp_path / "run", 3, 6)
    result = invoke("train", "--resume", run.root, "--set", "train.max_steps=20", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == [f"# run folder: {run.root}", f"# resuming from: {run.checkpoint(6)}"]
    cfg = dry_run_config(result.stdout)
    assert cfg.model.block_out_channels == (8, 16) and cfg.train.max_steps == 20


# ---------------------------------------------------------------- train: bad input


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--recipe", "cifar"], ["unknown recipe 'cifar'; did you mean 'cifar10'?", "difftool recipes list"]),
        (["--set", "model.dropuot=0.1"], ["unknown config key 'model.dropuot'; did you mean 'model.dropout'?"]),
        (["--set", "train.batch_size=big"], ["train.batch_size must be an integer, got 'big'"]),
        (["--set", "train.batch_size"], ["is not key=value"]),
        (["--recipe", "cifar10", "--resolution", "30"],
         ["data.resolution 30 must be divisible by 8 for a UNet with 4 levels; use e.g. 32"]),
        (["--mixed-precision", "fp61"], ["train.mixed_precision must be one of no, fp16, bf16, auto, got 'fp61'"]),
        (["--resume", "no-such-run"], ["cannot resume: no-such-run does not exist", "or 'latest'"]),
        (["--resume", "latest"], ["--resume latest found no run with a checkpoint"]),
    ],
)
def test_train_bad_input_is_one_line_exit_2(args, fragments):
    assert_user_error(invoke("train", *args, "--dry-run"), *fragments)


def test_train_reports_several_errors_in_one_line():
    result = invoke("train", "--set", "model.dropuot=0.1", "--set", "train.lr=fast", "--dry-run")
    assert_user_error(result, "model.dropuot", "train.lr must be a number")


def test_train_resume_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "photos").mkdir()
    assert_user_error(invoke("train", "--resume", tmp_path / "photos", "--dry-run"),
                      "is not a difftool run folder (no config.yaml)")


def test_train_resume_cannot_change_the_recipe(tmp_path):
    run = make_run(tmp_path / "run", 3)
    assert_user_error(invoke("train", "--resume", run.root, "--recipe", "cifar10", "--dry-run"),
                      "--recipe cannot change a resumed run")


def test_error_message_with_brackets_is_printed_verbatim(tmp_path):
    # Regression: messages went through rich markup, so "[x]" vanished and "[/x]" crashed.
    for name in ("runs[x]", "runs[/x]"):
        line = assert_user_error(invoke("train", "--resume", name, "--dry-run"))
        assert f"cannot resume: {name} does not exist" in line


@pytest.mark.parametrize("argv", [["--debug", "train", "--recipe", "cifar", "--dry-run"],
                                  ["train", "--recipe", "cifar", "--dry-run", "--debug"],
                                  ["recipes", "show", "cifar", "--debug"]])
def test_debug_shows_the_exception_before_or_after_the_command(argv):
    result = invoke(*argv)
    assert isinstance(result.exception, UserError)
    assert "unknown recipe 'cifar'" in str(result.exception)
    assert_user_error(invoke(*[a for a in argv if a != "--debug"]), "unknown recipe 'cifar'")  # and off again


def test_every_command_takes_debug():
    for command in (["train"], ["sample"], ["schedulers"], ["inpaint"], ["noise"], ["img2img"], ["interpolate"], ["convert"], ["inspect"], ["evaluate"],
                    ["recipes", "list"], ["recipes", "show"], ["recipes", "cp"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "--debug" in result.output, command


def test_train_refuses_a_non_empty_folder_that_is_not_a_run(tmp_path, tiny_recipe):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not yours to overwrite")
    result = invoke("train", "--recipe", tiny_recipe, "--max-steps", 1, "--output", out, "--quiet")
    assert_user_error(result, f"output folder {out} is not empty and is not a difftool run; choose another --output")
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_train_refuses_an_existing_run_without_overwrite(tmp_path, tiny_recipe):
    run = make_run(tmp_path / "run")
    before = run.config.read_text()
    result = invoke("train", "--recipe", tiny_recipe, "--max-steps", 1, "--output", run.root, "--quiet")
    assert_user_error(result, f"output folder {run.root} already holds a run", f"--resume {run.root}", "--overwrite")
    assert sorted(p.name for p in run.root.iterdir()) == ["config.yaml"]
    assert run.config.read_text() == before


# ---------------------------------------------------------------- multi-process hand-off


def test_num_processes_hands_over_to_accelerate_launch(tmp_path, monkeypatch):
    calls = []

    def fake_launch(module, args, *, num_processes, main_process_port=None):
        calls.append((module, args, num_processes, main_process_port))
        return 3

    monkeypatch.setattr("difftool.cli.train.launch", fake_launch)
    out = tmp_path / "run"
    result = invoke("train", "--recipe", "cifar10", "--num-processes", 2, "--main-process-port", 29555,
                    "--max-steps", 10, "--set", "train.batch_size=64", "--output", out, "--quiet")
    assert result.exit_code == 3  # the launcher's exit code is ours
    [(module, args, num_processes, port)] = calls
    assert (module, num_processes, port) == ("difftool.train", 2, 29555)
    # The arguments as typed, less the launcher's own.
    assert args == ["--recipe", "cifar10", "--max-steps", "10", "--set", "train.batch_size=64", "--output", str(out),
                    "--quiet"]
    assert not out.exists()  # the launched processes write the run, not this one


def _launcher_that_ends_with(error: BaseException, *, accelerate_1_16: bool):
    """`launch_command` whose run ends in `error`, as accelerate before 1.16 lets it out or as 1.16 exits on it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def launch_command(args):
        if not accelerate_1_16:
            raise error
        try:
            raise error
        except KeyboardInterrupt:
            sys.exit(130)
        except SignalException as signalled:
            sys.exit(128 + signalled.sigval)

    return launch_command


@pytest.mark.parametrize("accelerate_1_16", [False, True])
def test_a_signal_the_agent_passed_on_exits_as_one_process_would(monkeypatch, accelerate_1_16):
    """`train`'s workers saved a checkpoint and stopped: 0, as one process exits on Ctrl-C (`sample` 130).
    A Ctrl-C before the agent ran (a plain KeyboardInterrupt) stays 130."""
    import signal

    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    for sig in (signal.SIGINT, signal.SIGTERM):
        stopped = _launcher_that_ends_with(SignalException("stop", sigval=sig), accelerate_1_16=accelerate_1_16)
        monkeypatch.setattr(accelerate_launch, "launch_command", stopped)
        assert launch_mod.launch("difftool.train", [], num_processes=2) == 0
        assert launch_mod.launch("difftool.sample", [], num_processes=2, stopped_code=130) == 130
    early = _launcher_that_ends_with(KeyboardInterrupt(), accelerate_1_16=accelerate_1_16)
    monkeypatch.setattr(accelerate_launch, "launch_command", early)
    with pytest.raises(SystemExit if accelerate_1_16 else KeyboardInterrupt) as raised:
        launch_mod.launch("difftool.train", [], num_processes=2)
    assert not accelerate_1_16 or raised.value.code == 130


def test_workers_get_the_typed_arguments_and_the_plans_choices(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("difftool.cli.train.launch", lambda module, args, **kw: calls.append(args) or 0)
    monkeypatch.delenv("DIFFTOOL_DEBUG", raising=False)
    monkeypatch.setattr("difftool.cli.errors._debug", False)  # --debug below turns it on for this test only
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    assert invoke("train", "--dataset", "imgs", "--num-processes=2", "--debug", "--max-steps", 3).exit_code == 0
    # --num-processes=2 and --debug are dropped (debug travels in the environment); the default folder and
    # the recipe chosen for the data are pinned, so that every worker plans the same run.
    typed, pinned = calls[0][:4], calls[0][4:]
    assert typed == ["--dataset", "imgs", "--max-steps", "3"]
    recipe = config_mod.recipe_for_dataset("imgs", gpu=torch.cuda.is_available())[0]
    assert pinned == ["--output", f"runs/{recipe}-imgs", "--recipe", recipe]


def test_sample_workers_get_every_option_as_typed(tiny_run, monkeypatch):
    calls = []
    monkeypatch.setattr("difftool.cli.sample.launch", lambda module, args, **kw: calls.append((module, args)) or 0)
    typed = [str(tiny_run), "--scheduler", "ddim", "--steps", "3", "-n", "4", "--class", "0", "--class", "1",
             "--guidance-rescale", "0.5", "--resume", "--", ]
    assert invoke("sample", *typed[:1], "--num-processes", 2, "--main-process-port=1234", *typed[1:]).exit_code == 0
    assert calls == [("difftool.sample", typed)]


def test_launch_arguments(monkeypatch):
    monkeypatch.setattr(launch_mod, "_has_accelerate_config", lambda: True)
    monkeypatch.setattr(launch_mod, "usable_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cmd = launch_mod.launch_arguments("difftool.train", ["--output", "runs/x"], num_processes=2, main_process_port=29555)
    assert cmd == ["--num_processes", "2", "--multi_gpu", "--num_cpu_threads_per_process", "1", "--main_process_port",
                   "29555", "-m", "difftool.train", "--output", "runs/x"]
    one = launch_mod.launch_arguments("difftool.train", [], num_processes=1)
    assert one == ["--num_processes", "1", "--num_cpu_threads_per_process", "2", "-m", "difftool.train"]


def test_launch_parses_the_arguments_as_accelerate_launch_does(monkeypatch):
    import accelerate.commands.launch as accelerate_launch

    seen = []
    monkeypatch.setattr(accelerate_launch, "launch_command", lambda parsed: seen.append(parsed))
    assert launch_mod.launch("difftool.train", ["-q"], num_processes=2, main_process_port=1234) == 0
    (parsed,) = seen
    assert (parsed.num_processes, parsed.multi_gpu, parsed.main_process_port) == (2, True, 1234)
    assert (parsed.module, parsed.training_script, parsed.training_script_args) == (True, "difftool.train", ["-q"])
    with pytest.raises(UserError, match="--num-processes must be at least 1, got 0"):
        launch_mod.launch("difftool.train", [], num_processes=0)
    assert len(seen) == 1


def test_launch_without_an_accelerate_config_states_the_defaults(monkeypatch):
    monkeypatch.setattr(launch_mod, "_has_accelerate_config", lambda: False)
    cmd = launch_mod.launch_arguments("difftool.train", [], num_processes=2)
    assert cmd[:8] == ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


# ---------------------------------------------------------------- the installed executable


def difftool_exe() -> list[str]:
    exe = shutil.which("difftool")
    return [exe] if exe else [sys.executable, "-m", "difftool"]


def run_cli(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DIFFTOOL_DEBUG"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_installed_executable_version(tmp_path):
    proc = run_cli(difftool_exe() + ["--version"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"difftool {__version__}"


def test_the_package_builds_without_deprecation_warnings_and_carries_its_licence(tmp_path):
    # setuptools warns of what stops building on a date (a licence as a TOML table: 2027-02-18), and
    # only in pip's build log, which a user never reads.
    root = Path(__file__).resolve().parents[2]
    proc = run_cli([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(root)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "is deprecated" not in log and "SetuptoolsDeprecationWarning" not in log, [
        line for line in log.splitlines() if "deprecat" in line.lower()]
    assert "Package would be ignored" not in log, "every folder of the wheel is a listed package"
    (wheel,) = tmp_path.glob("difftool-*.whl")
    with zipfile.ZipFile(wheel) as built:
        names = built.namelist()
        metadata = next(built.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        licence = [built.read(n).decode() for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    # the expression names the licence; its text travels with the wheel, as Apache-2.0 asks
    assert len(licence) == 1 and "Apache License" in licence[0] and "Version 2.0" in licence[0]
    assert "License-File: LICENSE" in metadata.splitlines()
    assert {"difftool/recipes/folder32.yaml", "difftool/recipes/distill/progressive.yaml",
            "difftool/recipes/distill/consistency.yaml"} <= set(names), "the recipes travel with the wheel"


def test_installed_executable_bad_input(tmp_path):
    proc = run_cli(difftool_exe() + ["train", "--set", "model.dropuot=0.1", "--dry-run"], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["difftool: error: unknown config key 'model.dropuot'; did you mean 'model.dropout'?"]


def test_python_m_difftool_help(tmp_path):
    proc = run_cli([sys.executable, "-m", "difftool", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "recipes" in proc.stdout


def test_launched_module_accepts_the_handed_over_arguments(tmp_path, monkeypatch):
    """What `accelerate launch -m difftool.train ARGS` runs in each process parses ARGS the same way."""
    calls = []
    monkeypatch.setattr("difftool.cli.train.launch", lambda module, args, **kw: calls.append((module, args)) or 0)
    out = tmp_path / "run"
    assert invoke("train", "--recipe", "cifar10", "--num-processes", 2, "--set", "train.batch_size=64",
                  "--max-steps", 10, "--output", out).exit_code == 0
    [(module, args)] = calls
    proc = run_cli([sys.executable, "-m", module, *args, "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"# run folder: {out}"
    assert dry_run_config(proc.stdout) == config_mod.load_config("cifar10", ["train.batch_size=64", "train.max_steps=10"])


@pytest.mark.parametrize("argv, leaves", [(["--help"], True), (["--no-such-option"], False)])
def test_a_worker_leaves_its_process_group_only_after_success(monkeypatch, argv, leaves):
    """Leaving before shutdown keeps gloo's threads from aborting the exit; after a failure it could wait forever."""
    import torch.distributed as dist

    from difftool.cli import worker

    left = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: left.append(True))
    monkeypatch.setattr("sys.argv", ["difftool.sample", *argv])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit):
            worker.run_single_command("sample")
    finally:  # a worker ignores both once its command has ended; later tests' subprocesses would inherit that
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert left == ([True] if leaves else [])
