"""Helpers the training tests share (and the report's and the GPU's tests): losses, weights, interrupts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from difftool.rundir import RunDir
from difftool.training import loop as train_mod


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in RunDir(run).metrics.read_text().splitlines()]


def interrupt_at(monkeypatch, step: int) -> None:
    """Behave as if Ctrl-C arrived during `step` (the loop then checkpoints and stops)."""
    monkeypatch.setattr(train_mod._Trainer, "_agree_to_stop", lambda self, s: s == step)


def all_finite(folder, name="model.safetensors") -> bool:
    return all(torch.isfinite(w).all() for w in load_file(folder / name).values())


def model_weights(run: Path) -> dict[str, torch.Tensor]:
    return {f"{sub}/{k}": v for sub in ("unet", "unet_raw")
            for k, v in load_file(run / "model" / sub / "diffusion_pytorch_model.safetensors").items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=0, msg=key)
