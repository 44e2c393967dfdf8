"""Progress bars written to a log (stderr not a terminal)."""

import io

from rich.console import Console

from difftool import progress
from tests.conftest import invoke


def test_bars_in_a_log_leave_no_empty_lines(monkeypatch):
    """A training run's evaluations nest a sampling bar in the training bar; a log gets each once, no gaps."""
    log = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=log, force_terminal=False, width=100))
    with progress.TrainingProgress(4, 0) as train:
        for step in range(4):
            train.advance()
            if step % 2:
                with progress.SamplingProgress(3, label="sample") as bar:
                    bar.advance(3)
    progress.console.print("done")
    lines = log.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["sample", "sample", "train", "done"], lines
    assert "3/3 images" in lines[0] and "4/4" in lines[2]


def test_the_training_bar_keeps_its_numbers_in_an_80_column_log(monkeypatch):
    """A log is 80 columns to rich; the training line is wider, and rich cut its step count ('2000/20…')."""
    log = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=log, force_terminal=False, width=80))
    with progress.TrainingProgress(2000, 1999) as train:
        train.advance()
        train.show_metrics({"loss": 0.0261, "lr": 1e-3, "img_per_s": 117.2})
    line = log.getvalue().strip()
    assert "…" not in line and len(line) <= 80, line
    assert "2000/2000" in line and "loss 0.0261  lr 1.00e-03  117 img/s" in line, line


def _bars_drawn(monkeypatch, *args) -> list[str]:
    """The bar lines one in-process command draws into a log."""
    log = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=log, force_terminal=False, width=100))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return [line for line in log.getvalue().splitlines() if line.split()[:1] in (["sample"], ["features"])]


def test_quiet_turns_off_the_bars_drawn_deep_below_the_command(monkeypatch, tiny_run, tmp_path, extractor_file):
    """--quiet is held where bars are drawn: evaluate's sampling bar and its feature bar (two modules down) stay
    off, and the next command in the same process draws again (the flag is set by every parse, not only once)."""
    evaluate = ["evaluate", tiny_run, "-n", "2", "--steps", "2", "--features", extractor_file]
    assert _bars_drawn(monkeypatch, *evaluate, "-o", tmp_path / "quiet", "--quiet") == []
    drawn = _bars_drawn(monkeypatch, *evaluate, "-o", tmp_path / "loud")
    assert [line.split()[0] for line in drawn] == ["sample", "features"], drawn
    assert _bars_drawn(monkeypatch, "sample", tiny_run, "-n", "2", "--steps", "2", "-o", tmp_path / "s", "-q") == []
    with progress.SamplingProgress(1) as bar:  # the library, after a quiet command in the same process
        bar.advance(1)
    assert "1/1 images" in progress.console.file.getvalue()


def test_a_quiet_command_that_fails_to_parse_leaves_the_bars_on(monkeypatch, tiny_run):
    """-q before a bad value: the parse fails after -q was read, and nothing may keep the next bars off."""
    result = invoke("sample", tiny_run, "-q", "--trajectory", "-1")
    assert result.exit_code == 2
    log = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=log, force_terminal=False, width=100))
    with progress.SamplingProgress(1) as bar:
        bar.advance(1)
    assert "1/1 images" in log.getvalue()

