"""Helpers the report tests share: a page's pictures, its self-containment, eval lines, a working report."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import threading
from pathlib import Path

from PIL import Image

from difftool.rundir import RunDir
from tests.conftest import invoke

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')



def page_images(page: str) -> list[Image.Image]:
    """Every image of the page, decoded (a broken one raises); all must be inline PNGs."""
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in sources), [s[:40] for s in sources]
    images = []
    for encoded in DATA_URI.findall(page):
        image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)), formats=["PNG"])
        image.load()
        images.append(image)
    assert len(images) == len(sources)
    return images


def assert_self_contained(page: str) -> None:
    """Nothing to fetch: no script at all, no link, style or image from a URL, no @import."""
    assert "<script" not in page.lower()
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:|#)', page), "a reference that is not inline or an anchor"
    assert not re.search(r"https?://|url\(|@import|<link", page, re.IGNORECASE)


def copy_run(tiny_run: Path, tmp_path: Path) -> RunDir:
    return RunDir(shutil.copytree(tiny_run, tmp_path / "runs" / "run"))


def eval_line(step: int, fid: float, kid: float, **more) -> str:
    return json.dumps({"step": step, "eval/fid": fid, "eval/kid": kid, "eval/kid_std": kid / 10,
                       "eval/num_samples": 64, "eval/seconds": 3.5, **more}) + "\n"


NESTED = "[" * 5000  # RecursionError in json.loads and in a YAML parser


def reported(run: RunDir, *args) -> tuple[str, str]:
    """The page and the command's messages (stderr, joined into one line per message) of a report that works."""
    result = report(run.root, *args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    page = run.report.read_text()
    assert_self_contained(page)
    page_images(page)
    return page, result.stderr


def report(*args, seconds: float = 120):
    """`difftool report ARGS` in-process, failing (not hanging) when it does not finish within `seconds`."""
    done = {}
    worker = threading.Thread(target=lambda: done.update(result=invoke("report", *args)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"difftool report {args} did not finish in {seconds} s"
    return done["result"]
