"""Telling a local model path from a Hub id without importing the model stack.

Commands check their model argument with `locate` before they import torch and diffusers, so a
mistyped path is reported at once instead of after the 10 seconds those imports take on a small CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

from difftool.errors import UserError

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(@\S+)?")


def locate(source: str, *, give: str | None = None) -> Path | None:
    """The existing local path `source` names, or None for a Hub id to download; a UserError for a missing path.

    `give` ends the error with what the command takes instead ("give a folder of images, ...").
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    remedy = f"; give {give}" if give else ""
    if not HUB_ID.fullmatch(source):
        raise UserError(f"{source} does not exist{remedy}")
    owner = source.split("/")[0]
    if Path(owner).is_dir():  # `runs/typo` is a mistyped path, not a repository of user "runs"
        raise UserError(f"{source} does not exist (./{owner} is a local folder, so it is not taken for a Hub id)"
                        f"{remedy}")
    return None
