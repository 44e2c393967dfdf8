"""`difftool convert`: every checkpoint users have, into diffusers folders or one safetensors file.

Sources are whatever `models.load.load_model` reads (run folders, checkpoints, pipeline and
unet/ folders, single files, hub ids) plus pickled state dicts: diffusers-layout `.bin` files
beside their config.json, and other toolkits' checkpoints through `difftool.models.importers`. Pickles
are read with `torch.load(weights_only=True)` only, so no file can run code here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import DDPMScheduler

from difftool.models.checkpoints import LoadedModel, place
from difftool.models.export import export_pipeline, save_single_file
from difftool.errors import UserError
from difftool.models.load import DTYPES, load_model
from difftool.output_rules import refuse_inputs_as_output
from difftool.safeio import atomic_dir

TARGETS = ("pipeline", "unet", "single")


@dataclass
class Converted:
    target: Path
    kind: str  # pipeline, unet or single
    model: LoadedModel


def convert(source: str | Path, target: Path, *, source_format: str = "auto", to: str | None = None,
            weights: str | None = None, dtype: str | None = None, resolution: int | None = None,
            overwrite: bool = False) -> Converted:
    """Read `source`, cast to `dtype` if given, and write `target` (never over a file unless `overwrite`)."""
    kind = target_kind(Path(target), to)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown --dtype '{dtype}': use fp32, fp16 or bf16")
    target = Path(target)
    refuse_inputs_as_output(target, {"the source": source}, replaces=True, option="target")
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it or choose another target")
    model = load_model(source, source_format=source_format, weights=weights, resolution=resolution)
    if dtype is not None:
        model.unet = place(model.unet, dtype=DTYPES[dtype])
    _write(model, target, kind)
    if kind == "unet":
        model.notes.append(f"{target} is a bare unet/ folder: it keeps no noise schedule or class names (loading it "
                           f"assumes DDPM defaults); a pipeline folder or a .safetensors file keeps them")
    return Converted(target, kind, model)


def target_kind(target: Path, to: str | None) -> str:
    """A `.safetensors` path is a single file; anything else a folder, a pipeline unless `to` says unet."""
    if to is not None and to not in TARGETS:
        raise UserError(f"unknown --to '{to}': use pipeline, unet or single")
    if target.suffix == ".safetensors":
        if to not in (None, "single"):
            raise UserError(f"{target} ends in .safetensors, a single file; --to {to} needs a folder path")
        return "single"
    if to == "single":
        raise UserError(f"--to single writes one file: give a path ending in .safetensors, not {target}")
    return to or "pipeline"


def _write(model: LoadedModel, target: Path, kind: str) -> None:
    """Written to a temporary name and renamed into place, so a half-written target never exists."""
    if kind == "single":
        save_single_file(target, model.unet, model.scheduler_config, model.info)
        return
    if kind == "pipeline":
        scheduler = DDPMScheduler.from_config(model.scheduler_config)
        export_pipeline(target, unet=model.unet, raw_state=None, scheduler=scheduler, info=model.info)
        return
    with atomic_dir(target) as tmp:
        model.unet.save_pretrained(tmp, safe_serialization=True)
