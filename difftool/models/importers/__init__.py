"""Importers of other toolkits' checkpoints, by `--from` name: each maps a state dict onto UNet2DModel.

Each module has NAME, `detect(checkpoint) -> bool` and `convert(checkpoint, *, weights) -> Imported`.
"""

from __future__ import annotations

from difftool.models.importers import ddpm_original, lucidrains

IMPORTERS = {module.NAME: module for module in (ddpm_original, lucidrains)}
