"""The report as a person sees it: a tiny run's page in headless Chromium (Debian's `chromium` package).

Chromium loads the page and takes a screenshot; every console message it logs fails the test. The page has
no script and a Content-Security-Policy that allows nothing but inline images and style, so a reference to
anything outside the page shows up as a console message. Chromium logs no message for an image that does
not decode, so each inline image is decoded here instead (tests/test_report.py: `page_images`). Without
Chromium the test is skipped, except in CI (CI=true), where `.ci/run` installs it and its absence fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftool.reporting.page import make_report
from tests.reporting.conftest import (
    assert_self_contained,
    copy_run,
    eval_line,
    page_images,
)

WINDOW = (1280, 3200)  # tall enough for every section of a tiny run's page
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]\s*(.*)")  # Chromium's log line of a console message


def chromium() -> str:
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing in CI: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("needs Chromium to render the report (apt-get install chromium); CI runs it")
    return found


def render(page: Path, screenshot: Path, profile: Path) -> list[str]:
    """Load `page` in headless Chromium, save a screenshot; the console messages it logged."""
    cmd = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={screenshot}", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and screenshot.is_file(), proc.stderr[-3000:]
    return [m.group(1) for m in map(CONSOLE.search, proc.stderr.splitlines()) if m]


def test_the_console_check_sees_a_blocked_load(tmp_path):
    """The detector itself: a page like the report's that reaches outside gets a console message."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                    'content="default-src \'none\'; img-src data:"></head>'
                    '<body><img src="https://example.com/x.png" alt=""></body></html>')
    messages = render(page, tmp_path / "leaky.png", tmp_path / "profile")
    assert any("example.com/x.png" in m for m in messages), messages


def test_the_page_of_a_tiny_run_loads_cleanly_and_shows_its_images(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    with run.metrics.open("a") as f:
        f.write(eval_line(3, 30.0, 0.02, **{"eval/best_step": 3}))
        f.write(eval_line(6, 20.0, 0.01, **{"eval/best_step": 6}))
    report = make_report(run.root, places=[]).path
    html = report.read_text()
    assert_self_contained(html)
    assert len(page_images(html)) == 3 + 1 + 2  # curves, FID/KID, grids: each decodes

    messages = render(report, tmp_path / "page.png", tmp_path / "profile")
    assert messages == [], messages

    with Image.open(tmp_path / "page.png") as shot:
        pixels = np.asarray(shot.convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    top = pixels[: WINDOW[1] // 2]
    # Measured: the page of a tiny run has a std of about 23 and 1,400 colours, a page of text alone 5 and 160.
    assert top.std() > 10, "the screenshot is blank"
    colours = len(np.unique(top.reshape(-1, 3).astype(np.uint8), axis=0))
    assert colours > 500, f"only {colours} colours: charts and grids are not drawn"
