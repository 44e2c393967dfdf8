"""Progress bars and status lines (rich, on stderr so stdout stays clean for results)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

console = Console(stderr=True)
_quiet = False  # --quiet: held here, where bars are drawn, so that the work between does not carry it


@contextlib.contextmanager
def quieted(quiet: bool = True) -> Iterator[None]:
    """No bar is drawn inside, however deep below the caller (each command's --quiet holds this while it runs)."""
    global _quiet
    before, _quiet = _quiet, quiet
    try:
        yield
    finally:
        _quiet = before


def say(message: str, **options) -> None:
    """A message on stderr, one line however long: rich would break it at the width (80 in a log), a path
    in it too, which could then not be copied. The terminal still wraps it for the eye."""
    console.print(message, soft_wrap=True, **options)


class _Bar(Progress):
    """rich's Progress, less the empty line a bar inside another prints on stop when stderr is not a
    terminal (in a training log, one per evaluation). The outermost bar still ends its line."""

    _open = 0  # bars started and not yet stopped

    def start(self) -> None:
        super().start()
        if not self.disable:
            _Bar._open += 1

    def stop(self) -> None:
        if self.disable:
            return
        _Bar._open -= 1
        if _Bar._open:
            self.live.stop()
        else:
            super().stop()


def show_notes(notes) -> None:
    """Things assumed or chosen for the user, one line each (escaped: paths may hold [brackets])."""
    for note in notes:
        say(f"[yellow]note:[/] {escape(note)}", highlight=False)


class TrainingProgress:
    """Steps done / total with loss, lr, img/s and ETA; a no-op on non-main processes."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        """`enabled`: whether this process draws (the main one); `quieted` turns every bar off."""
        self.enabled = enabled
        # The line is wider than a log's 80 columns: the numbers may not be cut (rich made 2000/2000 "2000/20…"),
        # so where it is too narrow the bar shrinks instead.
        self.progress = _Bar(
            TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s",
                       table_column=Column(no_wrap=True)),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=_quiet or not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=done, loss="-", lr="-", ips="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def advance(self) -> None:
        self.progress.advance(self.task)

    def set_total(self, total: int) -> None:
        """A new end (train.until: plateau decided where the run stops)."""
        self.progress.update(self.task, total=total)

    def show_metrics(self, record: dict) -> None:
        loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"  # None: every step skipped as non-finite
        self.progress.update(self.task, loss=loss, lr=f"{record['lr']:.2e}", ips=f"{record['img_per_s']:.0f}")

    def finish(self, step: int, total: int, run: Path, finished: bool, command: str = "train") -> None:
        if finished:
            say(f"[green]done[/]: {total} steps; model in {run / 'model'}, sample grids in {run / 'samples'}")
        else:
            say(f"[yellow]stopped at step {step}[/]: checkpoint saved; continue with "
                f"difftool {command} --resume {run}")
        say(f"curves, sample grids and evaluations on one page: difftool report {run}")


class SamplingProgress:
    """Images done / total with img/s and ETA, advanced in fractions of a batch per model step."""

    def __init__(self, total: int, enabled: bool = True, label: str = "sample", unit: str = "images"):
        rate = "img" if unit == "images" else unit
        self.progress = _Bar(
            TextColumn(f"[bold blue]{label}"), BarColumn(), TextColumn(f"{{task.completed:.0f}}/{{task.total:.0f}} {unit}"),
            TextColumn(f"{{task.fields[ips]}} {rate}/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=_quiet or not enabled,
        )
        self.task = self.progress.add_task(label, total=total, ips="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def advance(self, images: float) -> None:
        self.progress.advance(self.task, images)
        speed = self.progress.tasks[0].speed
        if speed:
            self.progress.update(self.task, ips=f"{speed:.1f}" if speed >= 1 else f"{speed:.3f}")
