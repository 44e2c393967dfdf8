"""The preview grids of a run (samples/step-NNNNNN.png) as a timeline: every one, or an even selection.

The page is meant to be shared, and the run folder may come from someone else: a grid is read only when it is
a regular file that lies inside the run (never through a link: `ln -s ~/private.png RUN/samples/...` must not
put the user's picture on the page), of bounded size, and decodes as a PNG within Pillow's pixel limit. Any
other file under a grid's name is left out, and the timeline says which and why.
"""

from __future__ import annotations

import base64
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from difftool.rundir import RunDir
from difftool.safeio import IMAGE_LIMIT, UnsafeFile, kind_of, read_bounded

# step-NNNNNN.png; more digits than any run has steps is not a grid's name (and int() of 5,000 digits fails)
GRID_NAME = re.compile(r"step-(\d{1,15})\.png")
TRAJECTORY_NAME = re.compile(r"step-(\d{1,15})-trajectory\.png")  # sample.trajectory: the grid's first image


@dataclass
class Timeline:
    shown: list[tuple[int, str]]  # (step, PNG data URI), oldest first
    total: int  # grids in the run
    skipped: list[str]  # "samples/step-000030.png: a symbolic link", one per grid picked but left out
    trajectory: tuple[int, str] | None = None  # (step, data URI) of the newest trajectory strip, if any


def preview_timeline(run: RunDir, limit: int) -> Timeline:
    """At most `limit` grids, spread evenly over the run, always with the first and the newest."""
    entries = _entries(run.samples_dir)
    grids = sorted((int(m[1]), p) for p in entries if (m := GRID_NAME.fullmatch(p.name)))
    strips = sorted((int(m[1]), p) for p in entries if (m := TRAJECTORY_NAME.fullmatch(p.name)))
    shown, skipped = [], []
    for step, path in pick_evenly(grids, limit):
        try:
            shown.append((step, _png_data_uri(path, run.root)))
        except FileNotFoundError:  # removed since it was listed (a checkpoint rotation): nothing to say
            continue
        except _Skipped as why:
            skipped.append(f"{path.relative_to(run.root)}: {why}")
    trajectory = None
    for step, path in strips[-1:]:
        try:
            trajectory = (step, _png_data_uri(path, run.root))
        except FileNotFoundError:
            continue
        except _Skipped as why:
            skipped.append(f"{path.relative_to(run.root)}: {why}")
    return Timeline(shown, len(grids), skipped, trajectory)


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir()) if folder.is_dir() else []
    except OSError:  # unreadable: the page says there are no grids
        return []


def pick_evenly(items: list, limit: int) -> list:
    """`limit` of `items` at even spacing, the first and the last included (all of them if they fit)."""
    if len(items) <= limit:
        return list(items)
    if limit <= 1:
        return items[-1:] if limit == 1 else []
    indices = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in indices]


class _Skipped(Exception):
    """Why a file under a grid's name is not on the page."""


def _png_data_uri(path: Path, root: Path) -> str:
    """The grid at `path` as a data URI, if it is a regular file in `root` that decodes completely as a PNG."""
    # The one decoder that enforces Pillow's pixel limit; it brings torch, so only a run with grids waits for it.
    from difftool.images import open_image, printable, why_unreadable

    try:
        data = read_bounded(path, IMAGE_LIMIT, inside=root)
    except UnsafeFile:
        raise _Skipped(kind_of(path) or (f"larger than {IMAGE_LIMIT >> 20} MiB" if _inside(path, root)
                                         else f"outside {printable(root)} (through a linked folder)")) from None
    except FileNotFoundError:
        raise
    except OSError as err:
        raise _Skipped(err.strerror or type(err).__name__) from None
    try:
        with open_image(io.BytesIO(data)) as image:
            kind = image.format
            image.load()
    except Exception as err:  # noqa: BLE001 - Pillow's decoders fail on hostile bytes in many ways; left out
        reason = why_unreadable(err) if isinstance(err, Image.DecompressionBombError) else (
            f"not a whole PNG ({why_unreadable(err)})" if data else "the file is empty")
        raise _Skipped(reason) from None
    if kind != "PNG":
        raise _Skipped(f"a {kind} file, not a PNG")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _inside(path: Path, root: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
