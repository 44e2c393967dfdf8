"""`difftool convert`: every checkpoint users have, into diffusers folders or one safetensors file.

Sources are whatever `checkpoints.load_model` reads (run folders, checkpoints, pipeline and
unet/ folders, single files, hub ids) plus pickled state dicts: diffusers-layout `.bin` files
beside their config.json, and other toolkits' checkpoints through `difftool.models.importers`. Pickles
are read with `torch.load(weights_only=True)` only, so no file can run code here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from difftool.models.checkpoints import (
    LoadedModel,
    export_pipeline,
    load_model,
    load_pickle,
    place,
    save_single_file,
    state_dict_hash,
)
from difftool.errors import UserError, first_line
from difftool.models.importers import IMPORTERS
from difftool.rundir import atomic_dir, refuse_inputs_as_output

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TARGETS = ("pipeline", "unet", "single")
SOURCE_FORMATS = ("auto", "difftool", *IMPORTERS)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    model = read_source(source, source_format=source_format, weights=weights, resolution=resolution)
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


def read_source(source: str | Path, *, source_format: str = "auto", weights: str | None = None,
                resolution: int | None = None) -> LoadedModel:
    """Any source as a LoadedModel; pickled files go through the importers.

    `resolution` is for checkpoints that do not record it (ddpm-original); others refuse it.
    """
    if source_format not in SOURCE_FORMATS:
        raise UserError(f"unknown --from '{source_format}': use one of {', '.join(SOURCE_FORMATS)}")
    path = Path(source)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        if source_format == "auto" and (path.parent / "config.json").is_file():
            return load_model(path.parent, weights=weights)  # a diffusers unet folder with .bin weights
        return _import(path, source_format, weights, resolution)
    if resolution is not None:
        raise UserError(f"--resolution is for checkpoints that do not record it (--from ddpm-original); "
                        f"{source} has its own")
    if source_format not in ("auto", "difftool"):
        raise UserError(f"--from {source_format} reads a pickled checkpoint file ({', '.join(PICKLE_SUFFIXES)}), "
                        f"not {source}")
    return load_model(source, weights=weights)


def _import(path: Path, source_format: str, weights: str | None, resolution: int | None) -> LoadedModel:
    checkpoint = load_pickle(path)
    if source_format in ("auto", "difftool"):
        found = [name for name, importer in IMPORTERS.items() if importer.detect(checkpoint)]
        if not found:
            raise UserError(f"{path} is not a checkpoint difftool knows: not a diffusers state dict with a config.json "
                            f"beside it, nor a checkpoint of {', '.join(IMPORTERS)} (force one with --from)")
        source_format = found[0]
    options = {"resolution": resolution} if resolution is not None else {}
    if options and "resolution" not in inspect.signature(IMPORTERS[source_format].convert).parameters:
        raise UserError(f"--resolution does not apply to {source_format} checkpoints")
    imported = IMPORTERS[source_format].convert(checkpoint, weights=weights, **options)
    unet = UNet2DModel.from_config(imported.unet_config)
    try:
        unet.load_state_dict(imported.state, strict=True, assign=True)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the {source_format} layout: {first_line(err)}") from err
    info = {"resolution": unet.config.sample_size, "channels": unet.config.in_channels,
            "num_classes": unet.config.num_class_embeds, "label_names": None, "null_class": None,
            "converted_from": f"{source_format}:{path.name}"}
    return LoadedModel(unet.eval(), imported.scheduler_config, info, f"{path} ({source_format})",
                       weights or "ema", state_dict_hash(unet.state_dict()), imported.notes)


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
