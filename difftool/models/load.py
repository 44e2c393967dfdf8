"""Loading a model: one function for every source `difftool` reads, importers included."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import UNet2DModel

from difftool.errors import UserError, first_line
from difftool.models.checkpoints import LoadedModel, load_native, load_pickle, state_dict_hash
from difftool.models.importers import IMPORTERS

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SOURCE_FORMATS = ("auto", "difftool", *IMPORTERS)
# --dtype of `sample`, `evaluate` and `convert`.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(source: str | Path, *, source_format: str = "auto", weights: str | None = None,
                resolution: int | None = None) -> LoadedModel:
    """The one door for every model source: `difftool sample`, `inpaint`, `evaluate`, `inspect`, `convert`
    and training's `init_from` all load through here.

    Run folders, checkpoints, pipeline and unet/ folders, single files and hub ids are difftool's own
    (`checkpoints.load_native`); pickled files (.bin/.pt/.pth/.ckpt) go through the importers, or are
    a diffusers unet folder's .bin weights when a config.json lies beside them. `weights` None means EMA
    where there is a separate EMA copy.

    `resolution` is for checkpoints that do not record it (ddpm-original); others refuse it.
    """
    if source_format not in SOURCE_FORMATS:
        raise UserError(f"unknown --from '{source_format}': use one of {', '.join(SOURCE_FORMATS)}")
    path = Path(source)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        if source_format == "auto" and (path.parent / "config.json").is_file():
            return load_native(path.parent, weights=weights)  # a diffusers unet folder with .bin weights
        return _import(path, source_format, weights, resolution)
    if resolution is not None:
        raise UserError(f"--resolution is for checkpoints that do not record it (--from ddpm-original); "
                        f"{source} has its own")
    if source_format not in ("auto", "difftool"):
        raise UserError(f"--from {source_format} reads a pickled checkpoint file ({', '.join(PICKLE_SUFFIXES)}), "
                        f"not {source}")
    return load_native(source, weights=weights)


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
