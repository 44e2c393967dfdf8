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
