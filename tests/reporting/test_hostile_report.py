"""difftool report on a run folder from elsewhere: its files are data, never a weapon (issue 37).

Every case ends in a page (with a note naming what was left out) or in one `difftool: error:` line, exit
code 2: never a traceback, exit code 1 or a hang, never a file of the run replaced, never a file from outside
the run put on the page.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from difftool import __version__
from difftool.reporting.charts import eval_figure, literal
from difftool.reporting.history import eval_history, read_history
from difftool.rundir import RunDir, lock_name
from difftool.runlock import run_lock
from difftool.safeio import IMAGE_LIMIT
from tests.conftest import assert_user_error
from tests.reporting.conftest import NESTED, eval_line, page_images, report, reported


@pytest.fixture
def run(tiny_run, tmp_path, scratch_cwd) -> RunDir:
    """A copy of the tiny run (grids at steps 3 and 6) in runs/run, the working folder its parent's parent."""
    return RunDir(shutil.copytree(tiny_run, tmp_path / "runs" / "run"))


def png_bytes(colour=(200, 10, 10), size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(path: Path, side: int) -> None:
    """A real 1-bit `side`×`side` PNG of zeros: a few kB on disk, `side`² pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ---------------------------------------------------------------- 4: where the page may go


@pytest.mark.parametrize("target", ["eval/reference.npz", "config.yaml", "metrics.jsonl", "sessions.jsonl",
                                    "samples/step-000003.png", "checkpoints/step-000006/progress.json",
                                    "logs/new.html", "sample.lock", ".tmp-1-report.html"])
def test_the_page_never_replaces_a_file_of_the_run(run, target):
    path = run.root / target
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(b"the run's own")
    before = path.read_bytes()
    assert_user_error(report(run.root, "--output", path, "--overwrite"), "never writes over the run's files",
                      "--overwrite or not", str(run.report))
    assert path.read_bytes() == before


def test_the_lock_of_a_running_training_is_never_replaced(run):
    """Replaced under a running `train`, RUN/train.lock would be a new, unlocked file: a second `train --resume`
    would take it and train beside the first."""
    with run_lock(run.root) as lock:
        inode = lock.stat().st_ino
        assert_user_error(report(run.root, "--output", lock, "--overwrite"), "train.lock", "never writes over")
        assert lock.stat().st_ino == inode
        with pytest.raises(Exception, match="in use by another difftool train"):
            with run_lock(run.root):
                pass
    absent = run.root / lock_name("train")
    assert not absent.exists()
    assert_user_error(report(run.root, "--output", absent), "never writes over")  # not even a new one


def test_inside_the_run_only_a_new_file_or_a_page_of_report_is_replaced(run, tmp_path):
    page, _ = reported(run)  # the default RUN/report.html, again and again
    reported(run)
    mine = run.root / "team.html"
    assert report(run.root, "-o", mine).exit_code == 0, "a new file in the run"
    assert report(run.root, "-o", mine).exit_code == 0, "a page report wrote"
    notes = run.root / "notes.html"
    notes.write_text("my notes")
    assert_user_error(report(run.root, "-o", notes, "--overwrite"), "not a page difftool report wrote")
    assert notes.read_text() == "my notes"

    elsewhere = tmp_path / "private.html"
    elsewhere.write_text(page)  # a report, but not in the run: a link to it is not the run's page
    run.report.unlink()
    run.report.symlink_to(elsewhere)
    assert_user_error(report(run.root, "--overwrite"), "not a page difftool report wrote")
    assert run.report.is_symlink() and elsewhere.read_text() == page

    outside = tmp_path / "mine.html"
    outside.write_text("mine")
    assert_user_error(report(run.root, "-o", outside), "is not a difftool report", "--overwrite")
    assert report(run.root, "-o", outside, "--overwrite").exit_code == 0, "outside the run: the usual rules"


@pytest.mark.parametrize("special", ["fifo", "loop"])
def test_an_output_that_is_a_fifo_or_a_link_loop_is_one_line(run, special):
    target = run.root / "x.html"
    os.mkfifo(target) if special == "fifo" else os.symlink(target, target)
    assert_user_error(report(run.root, "-o", target), str(target))


# ---------------------------------------------------------------- 5, 6: preview grids


def test_a_grid_that_links_out_of_the_run_is_never_put_on_the_page(run, tmp_path):
    private = tmp_path / "private.png"
    private.write_bytes(png_bytes())
    (run.samples_dir / "step-000030.png").symlink_to(private)
    page, said = reported(run)
    assert base64.b64encode(private.read_bytes()).decode() not in page
    assert "samples/step-000030.png: a symbolic link" in page and "samples/step-000030.png: a symbolic link" in said
    assert len(page_images(page)) == 3 + 2, "the run's own grids are shown"

    shutil.move(run.samples_dir, tmp_path / "elsewhere")  # the samples folder itself a link out of the run
    run.samples_dir.symlink_to(tmp_path / "elsewhere")
    page, said = reported(run)
    assert "step-000003.png: outside" in said and len(page_images(page)) == 3
    assert base64.b64encode(private.read_bytes()).decode() not in page


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge", "bomb-20000", "bomb-9500", "folder", "jpeg",
                                  "empty", "digits"])
def test_a_hostile_file_under_a_grids_name_is_left_out_and_named(run, kind):
    grid = run.samples_dir / "step-000030.png"
    if kind == "fifo":
        os.mkfifo(grid)
    elif kind == "dev-zero":
        grid.symlink_to("/dev/zero")
    elif kind == "huge":
        with grid.open("wb") as f:
            f.truncate(IMAGE_LIMIT + 1)  # sparse: costs no disk
    elif kind.startswith("bomb"):
        png_bomb(grid, int(kind.split("-")[1]))  # 20000²: Pillow refuses; 9500²: Pillow would only warn
    elif kind == "folder":
        grid.mkdir()
    elif kind == "jpeg":
        Image.new("RGB", (8, 8)).save(grid, format="JPEG")
    elif kind == "empty":
        grid.touch()
    else:
        grid = run.samples_dir / f"step-{'9' * 240}.png"  # no step: not a grid's name
        grid.write_bytes(png_bytes())
    page, said = reported(run)
    if kind == "digits":
        assert len(page_images(page)) == 3 + 2
        return
    why = {"fifo": "a FIFO", "dev-zero": "a symbolic link", "huge": "larger than 64 MiB", "folder": "a folder",
           "jpeg": "a JPEG file, not a PNG", "empty": "the file is empty"}.get(kind, "it has more than 89,478,485")
    assert f"samples/step-000030.png: {why}" in page and f"samples/step-000030.png: {why}" in said
    assert len(page_images(page)) == 3 + 2 and "2 of 3 grids:" in page


# ---------------------------------------------------------------- 7: nesting too deep for a parser


def test_nesting_too_deep_in_the_runs_files_is_counted_or_named(run, tmp_path):
    with run.metrics.open("a") as f:
        f.write(NESTED + "\n")
    (run.root / lock_name("train")).write_text(NESTED)
    damaged = tmp_path / "evaluations" / "someone-else"
    damaged.mkdir(parents=True)
    (damaged / "metrics.json").write_text(NESTED)
    (damaged / "results.json").write_text("{not json")
    page, said = reported(run)
    assert "1 line(s) of metrics.jsonl could not be read" in page and "finished at step 6" in page
    for name in ("metrics.json: not JSON (nested too deeply", "results.json: not JSON"):
        assert f"{damaged / name.split(':')[0]}: {name.split(': ', 1)[1]}" in page and name in said


def test_evaluation_files_that_are_fifos_links_or_odd_are_named_not_waited_on(run, tmp_path):
    places = tmp_path / "evaluations"
    for name, make in [("fifo", os.mkfifo), ("link", lambda p: p.symlink_to("/dev/zero")),
                       ("list", lambda p: p.write_text("[1, 2]"))]:
        (places / name).mkdir(parents=True)
        make(places / name / "metrics.json")
    for i, model in enumerate(["x\0y", "~nosuchuser-for-difftool/x", "y" * 5000]):  # ValueError, RuntimeError, OSError
        (places / f"odd{i}").mkdir()
        (places / f"odd{i}" / "metrics.json").write_text(json.dumps({"sampling": {"model": model}, "fid": 1.0}))
    page, said = reported(run)
    for name, why in [("fifo", "a FIFO"), ("link", "a symbolic link"), ("list", "not a JSON object")]:
        assert f"{places / name / 'metrics.json'}: {why}" in said
    assert said.count("left out a damaged evaluation file") == 3, "a record naming another model is not this run's"


# ---------------------------------------------------------------- 8: values that break charts and numbers


def test_dollars_in_names_are_shown_as_written_not_as_math(run, tmp_path):
    with run.metrics.open("a") as f:
        f.write(json.dumps({"step": 3, "eval/$\\foo$": 30.0, "eval/kid": 0.02}) + "\n")
        f.write(json.dumps({"step": 6, "eval/$\\foo$": 20.0, "eval/kid": 0.01, "eval/seconds": float("nan")})
                + "\n")
    sweep = tmp_path / "evaluations" / "run-sweep"
    sweep.mkdir(parents=True)
    rows = [{"scheduler": s, "steps": n, "nfe": n, "fd": 10.0 / n} for s in ("$\\x$", "ddim") for n in (10, 20)]
    rows.append({"scheduler": "big", "steps": 1, "nfe": 10**400, "fd": float("inf")})
    (sweep / "results.json").write_text(json.dumps({"source": str(run.root), "distance": "$\\bad$",
                                                    "rows": rows}))
    page, _ = reported(run)
    assert "Best step 6: $\\FOO$ 20" in page
    assert "Sweep run-sweep" in page and "$\\bad$" in page
    assert len(page_images(page)) == 3 + 1 + 2 + 1  # curves, FID/KID, grids, the sweep's figure


def test_a_sweeps_guidance_column_takes_any_value(run, tmp_path):
    """results.json is anyone's file: a guidance that is no number is shown as written and left off the figure."""
    sweep = tmp_path / "evaluations" / "run-sweep"
    sweep.mkdir(parents=True)
    rows = [{"scheduler": "ddim", "steps": 4, "guidance": g, "nfe": 8, "fd": 1.0 + i}
            for i, g in enumerate([1.5, 3, "$\\x$", 10**400, None, True])]
    (sweep / "results.json").write_text(json.dumps({"source": str(run.root), "rows": rows}))
    page, _ = reported(run)
    assert "<th>guidance</th>" in page and "<td>1.5</td>" in page and "$\\x$" in page
    assert len(page_images(page)) == 3 + 2 + 1  # curves, grids, the sweep's figure


def test_every_label_from_the_run_is_literal_text():
    assert literal("$\\foo$") == "\\$\\foo\\$" and literal("a" * 100).endswith("…")
    assert literal("\udcff$") == "\\udcff\\$"
    history = read_history(RunDir("/nonexistent"))
    history.evaluations = [{"step": 1, "eval/$\\sqrt{$": 2.0}, {"step": 2, "eval/$\\sqrt{$": 1.0}]
    figure = eval_figure(eval_history(history))
    texts = [t.get_text() for ax in figure.axes for t in (ax.title, ax.yaxis.label, *ax.texts)]
    texts += [t.get_text() for ax in figure.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any("SQRT" in t for t in texts)
    for text in texts:  # every $ escaped: matplotlib draws it as a dollar sign
        assert text.count("$") == text.count("\\$"), text
    figure.savefig(io.BytesIO(), format="png")


def test_numbers_no_float_can_hold_are_damage_not_a_crash(run):
    huge = int("9" * 400)
    with run.metrics.open("a") as f:
        f.write(json.dumps({"step": huge, "loss": 0.1}) + "\n")
        f.write(json.dumps({"step": 7, "loss": huge, "lr": float("nan"), "img_per_s": 1e308}) + "\n")
        f.write(eval_line(6, 1.0, 0.1, **{"eval/best_step": huge, "eval/seconds": 1e300}))
    sessions = run.sessions.read_text().splitlines()
    start = json.loads(sessions[0])
    with run.sessions.open("a") as f:
        f.write(json.dumps({**start, "step": huge, "resumed_from": "checkpoints/step-000006"}) + "\n")
        f.write(json.dumps({**start, "time": 1e300}) + "\n")
        f.write(json.dumps({**start, "time": float("nan")}) + "\n")
        f.write(json.dumps({"event": "end", "time": float("inf"), "step": 6, "outcome": "finished"}) + "\n")
    (run.root / lock_name("train")).write_text(json.dumps({"pid": 10**20, "host": "elsewhere"}))
    page, _ = reported(run)
    assert "1 line(s) of metrics.jsonl could not be read" in page and "training now" not in page
    assert "Best step 6: FID 1" in page


@pytest.mark.parametrize("name", ["metrics.jsonl", "sessions.jsonl"])
def test_metrics_or_sessions_that_are_not_files_are_left_out_with_a_note(run, tmp_path, name):
    path = run.root / name
    path.unlink()
    path.mkdir()
    page, said = reported(run)
    assert f"{path} is a folder, not a regular file" in said and "Left out: " in page
    path.rmdir()
    path.symlink_to(tmp_path / "elsewhere.jsonl")
    (tmp_path / "elsewhere.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0, "event": "start",
                                                          "time": 1.0}) + "\n")
    page, said = reported(run)
    assert f"{path} is a symbolic link" in said


@pytest.mark.parametrize("damage", ["nested", "fifo", "link", "alias-bomb", "deep"])
def test_a_config_that_cannot_be_read_is_one_line(run, tmp_path, damage):
    if damage == "nested":
        run.config.write_text(NESTED)
    elif damage == "deep":
        run.config.write_text("a:\n" + "".join(f"{'  ' * i}b{i}:\n" for i in range(1, 40)) + "  " * 40 + "c: 1\n")
    elif damage == "alias-bomb":
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
        run.config.write_text("\n".join(lines) + "\nrecipe: quickstart\n")
    else:
        run.config.unlink()
        os.mkfifo(run.config) if damage == "fifo" else run.config.symlink_to(tmp_path / "x.yaml")
        (tmp_path / "x.yaml").write_text("recipe: quickstart\n")
    assert_user_error(report(run.root), str(run.config))


def test_a_damaged_progress_record_of_an_old_run_is_passed_over(run):
    run.sessions.unlink()  # as in a run of 0.1.0: versions come from the newest checkpoint
    (run.checkpoint(6) / "progress.json").write_text(NESTED)
    page, _ = reported(run)
    assert f"difftool {__version__}" in page
