"""Progress bars written to a log (stderr not a terminal)."""

import io

from rich.console import Console

from difftool import progress


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
