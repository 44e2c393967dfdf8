"""The preview grids of a run (samples/step-NNNNNN.png) as a timeline: every one, or an even selection."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from difftool.rundir import RunDir, checkpoint_step, is_checkpoint_name


@dataclass
class Timeline:
    shown: list[tuple[int, str]]  # (step, PNG data URI), oldest first
    total: int  # grids in the run


def preview_timeline(run: RunDir, limit: int) -> Timeline:
    """At most `limit` grids, spread evenly over the run, always with the first and the newest."""
    grids = sorted((p for p in run.samples_dir.glob("step-*.png") if is_checkpoint_name(p.with_suffix(""))),
                   key=lambda p: checkpoint_step(p.with_suffix(""))) if run.samples_dir.is_dir() else []
    shown = []
    for path in pick_evenly(grids, limit):
        uri = _png_data_uri(path)
        if uri is not None:
            shown.append((checkpoint_step(path.with_suffix("")), uri))
    return Timeline(shown, len(grids))


def pick_evenly(items: list, limit: int) -> list:
    """`limit` of `items` at even spacing, the first and the last included (all of them if they fit)."""
    if len(items) <= limit:
        return list(items)
    if limit <= 1:
        return items[-1:] if limit == 1 else []
    indices = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in indices]


def _png_data_uri(path: Path) -> str | None:
    """None for a file that is gone or is not a whole PNG (damaged): the page shows only images that decode."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.load()
    except (OSError, ValueError, SyntaxError):  # PIL reports broken files with any of these
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
