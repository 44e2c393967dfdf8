"""The thread policy: a fair share of the cores among the user's difftool jobs (difftool/threads.py).

The choice is tested, not the speed (benchmarks/contention.py measures that): which share a job takes among
live and dead registrations, fixed counts and ceilings, and that a running job takes its new share when
another starts or ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difftool import threads
from difftool.cli.launch import launch_arguments
from difftool.threads import Job, cpu_share, fair_share, live_jobs, rebalance
from difftool.training.guards import Slowdown
from tests.conftest import assert_user_error, invoke


@pytest.fixture(autouse=True)
def private_jobs(tmp_path, monkeypatch):
    """A registration folder of this test's own, four cores whatever the machine, no fixed counts."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("DIFFTOOL_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    before = torch.get_num_threads()
    yield tmp_path / "difftool-jobs"
    torch.set_num_threads(before)


def other_job(folder: Path, pid: int, since: float, fixed: int | None = None, *, alive: bool = True) -> int | None:
    """A registration as another process leaves it: held (alive) by an open, locked descriptor, or not (dead)."""
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{pid}.json"
    path.write_text(json.dumps({"pid": pid, "since": since, "fixed": fixed}))
    if not alive:
        return None
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a second open file description conflicts even within one process
    return fd


@pytest.mark.parametrize("cores, jobs, me, expected", [
    (4, [Job(1, 0.0, None)], Job(1, 0.0, None), 4),  # alone: every core
    (4, [Job(1, 0.0, None), Job(2, 1.0, None)], Job(2, 1.0, None), 2),
    (3, [Job(1, 0.0, None), Job(2, 1.0, None)], Job(1, 0.0, None), 2),  # the earliest takes what does not divide
    (3, [Job(1, 0.0, None), Job(2, 1.0, None)], Job(2, 1.0, None), 1),
    (2, [Job(i, float(i), None) for i in range(5)], Job(4, 4.0, None), 1),  # more jobs than cores: one each
    (8, [Job(1, 0.0, 6), Job(2, 1.0, None)], Job(2, 1.0, None), 2),  # a fixed job's threads are taken out first
    (8, [Job(1, 0.0, 16), Job(2, 1.0, None)], Job(2, 1.0, None), 1),
    (8, [Job(1, 0.0, None), Job(2, 1.0, 3)], Job(2, 1.0, 3), 3),  # a fixed job keeps its count
])
def test_fair_share(cores, jobs, me, expected):
    assert fair_share(cores, jobs, me) == expected


def test_live_registrations_count_and_dead_ones_are_removed(private_jobs):
    fd = other_job(private_jobs, 11, 1.0)
    other_job(private_jobs, 12, 2.0, alive=False)
    (private_jobs / "13.json").symlink_to(private_jobs / "11.json")  # never followed
    for name, age in ((".14-1.json.tmp", 3600), (".15-1.json.tmp", 0)):  # died before its rename; being written
        (private_jobs / name).write_text("")
        os.utime(private_jobs / name, (time.time() - age, time.time() - age))
    try:
        assert live_jobs(private_jobs) == [Job(11, 1.0, None)]
        assert not (private_jobs / "12.json").exists()
        assert sorted(p.name for p in private_jobs.glob(".*")) == [".15-1.json.tmp"]
    finally:
        os.close(fd)


def test_a_job_alone_takes_every_core_and_gives_them_back(private_jobs):
    torch.set_num_threads(1)
    with cpu_share() as share:
        assert torch.get_num_threads() == 4 and share.why() is None
        assert [job.pid for job in live_jobs(private_jobs)] == [os.getpid()]
    assert torch.get_num_threads() == 1
    assert list(private_jobs.glob("*.json")) == []


def test_a_running_job_takes_its_new_share_when_another_starts_and_ends(private_jobs, monkeypatch):
    monkeypatch.setattr(threads, "REBALANCE_SECONDS", 0.0)
    with cpu_share() as share:
        assert torch.get_num_threads() == 4
        fd = other_job(private_jobs, 99_999_999, time.time() + 1)  # registered after us
        rebalance()
        assert torch.get_num_threads() == 2
        assert share.why() == "2 of 4 cores: 1 other difftool job running"
        os.close(fd)  # the other job ends (its process dies: the kernel drops the lock)
        rebalance()
        assert torch.get_num_threads() == 4


def test_rebalancing_looks_again_only_every_few_seconds(private_jobs):
    with cpu_share():
        fd = other_job(private_jobs, 99_999_999, time.time() + 1)
        rebalance()  # too soon after the start: still the share it took
        assert torch.get_num_threads() == 4
        os.close(fd)


def test_difftool_threads_fixes_the_count_and_omp_num_threads_caps_it(private_jobs, monkeypatch):
    monkeypatch.setenv("DIFFTOOL_THREADS", "3")
    with cpu_share() as share:
        assert torch.get_num_threads() == 3 and share.why() == "3 of 4 cores: DIFFTOOL_THREADS=3"
        assert live_jobs(private_jobs)[0].fixed == 3  # others count it as fixed
    monkeypatch.delenv("DIFFTOOL_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with cpu_share() as share:
        assert torch.get_num_threads() == 1 and share.why() == "1 of 4 cores: OMP_NUM_THREADS=1"


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_difftool_threads_is_one_line(value, monkeypatch, scratch_cwd, tiny_run):
    monkeypatch.setenv("DIFFTOOL_THREADS", value)
    assert_user_error(invoke("sample", tiny_run, "-n", 1, "--steps", 2), "DIFFTOOL_THREADS", "whole number")


def test_a_registration_folder_that_is_a_link_is_never_used(tmp_path, monkeypatch):
    """Another user's /tmp link must not make us write into their folder: the job runs as if alone."""
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(threads.tempfile, "gettempdir", lambda: str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / f"difftool-jobs-{os.getuid()}").symlink_to(elsewhere)
    with cpu_share():
        assert torch.get_num_threads() == 4
    assert list(elsewhere.iterdir()) == []


def test_sample_says_how_many_threads_and_why(private_jobs, monkeypatch, scratch_cwd, tiny_run):
    fd = other_job(private_jobs, 99_999_999, 0.0)
    try:
        result = invoke("sample", tiny_run, "-n", 1, "--steps", 2, "-q")
    finally:
        os.close(fd)
    assert result.exit_code == 0, result.output
    assert "note: computing with 2 of 4 cores: 1 other difftool job running" in result.stderr


def test_train_says_it_in_its_first_line(private_jobs, tiny_recipe, scratch_cwd, tmp_path):
    fd = other_job(private_jobs, 99_999_999, 0.0)
    try:
        result = invoke("train", "--recipe", tiny_recipe, "--output", tmp_path / "run", "--max-steps", 1, "-q")
    finally:
        os.close(fd)
    assert result.exit_code == 0, result.output
    first = result.stderr.splitlines()[0]
    assert first.startswith("training") and "(fp32; 2 of 4 cores: 1 other difftool job running)" in first


def test_two_real_processes_see_each_other(private_jobs, tmp_path):
    """A registration made by another process, as the policy's users make them."""
    code = ("import time, torch; from difftool.threads import cpu_share\n"
            "with cpu_share():\n    print('registered', flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "XDG_RUNTIME_DIR": str(private_jobs.parent)})
    try:
        assert child.stdout.readline().strip() == "registered"
        assert [job.pid for job in live_jobs(private_jobs)] == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert live_jobs(private_jobs) == []


def test_launched_processes_divide_the_cores(monkeypatch):
    monkeypatch.setattr("difftool.cli.launch.usable_cores", lambda: 16)
    monkeypatch.setattr("difftool.cli.launch._has_accelerate_config", lambda: True)
    args = launch_arguments("difftool.train", [], num_processes=4)
    assert args[args.index("--num_cpu_threads_per_process") + 1] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice is left to accelerate
    assert "--num_cpu_threads_per_process" not in launch_arguments("difftool.train", [], num_processes=4)


def test_a_training_much_slower_than_before_says_so_once():
    slow = Slowdown()
    said = [slow.observe(rate, steps) for rate, steps in
            [(100.0, 10), (110.0, 10), (5.0, 1), (60.0, 10), (20.0, 10), (90.0, 10), (25.0, 10), (20.0, 10),
             (10.0, 10), (1.0, 10)]]
    # a window of one step is not compared; half the speed is a second job; one slow window is a blip
    assert said[:7] == [None] * 7
    assert said[7] is not None and "20 img/s" in said[7] and "110 img/s" in said[7]
    assert said[8:] == [None, None]


def test_a_command_is_registered_before_it_imports_torch_unless_it_launches_processes(private_jobs):
    """A running training makes room while a new command starts up, not only once it computes."""
    seen = {}

    @threads.registered_early
    def command(num_processes: int = 1) -> None:
        seen[num_processes] = [job.pid for job in live_jobs(private_jobs)]

    command(num_processes=1)
    command(num_processes=2)  # the launcher itself computes nothing: its processes register
    assert seen == {1: [os.getpid()], 2: []}
    assert live_jobs(private_jobs) == []


@pytest.mark.parametrize("argv", [["sample", "missing"], ["evaluate", "missing"], ["stats", ".", "--output", "x.txt"],
                                  ["inpaint", "a.png", "a.png", "--model", "missing"], ["train", "--dataset", "missing"]])
def test_the_computing_commands_register_before_anything_else(argv, monkeypatch, scratch_cwd):
    from PIL import Image

    Image.new("RGB", (8, 8)).save("a.png")
    registered = []
    monkeypatch.setattr(threads, "_register", lambda me: registered.append(me.pid) or (None, None))
    assert_user_error(invoke(*argv))  # refused at once (nothing there), but registered first
    assert registered == [os.getpid()]


def test_a_registration_of_deep_json_is_passed_over(private_jobs):
    private_jobs.mkdir(mode=0o700)
    (private_jobs / "7-1.json").write_text("[" * 4000)
    fd = os.open(private_jobs / "7-1.json", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert live_jobs(private_jobs) == []
    finally:
        os.close(fd)
