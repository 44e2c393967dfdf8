"""The sampler settings a model brings with it: its run's recipe, or what its exported folder records."""

from __future__ import annotations

import contextlib
from pathlib import Path

from difftool.config import config_from_dict, read_config
from difftool.errors import UserError
from difftool.rundir import RunDir, run_of


def sampling_defaults(source: str | Path, info: dict):
    """The recipe's `sample` settings (a SampleConfig) when `source` is a run folder or inside one, else those its
    model records (`info`, the model's difftool.json: a distilled model's sampler travels with it), else None."""
    run = run_of(source)
    if run is not None:
        with contextlib.suppress(UserError):
            return read_config(RunDir(run).config).sample
        return None
    recorded = info.get("sample")
    if not isinstance(recorded, dict):
        return None
    with contextlib.suppress(UserError):
        return config_from_dict({"sample": recorded}).sample
    return None
