"""Writing models: the run's model/ pipeline folder and single .safetensors files, with what samplers need."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import safetensors.torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from difftool import __version__
from difftool.safeio import atomic_dir, atomic_path

INFO_FILE = "difftool.json"  # beside model_index.json: labels, null class, recipe, step
SINGLE_FILE_FORMAT = "unet/1"


def model_info(cfg, data, num_classes: int | None) -> dict:
    """What a sampler needs beyond the diffusers configs: labels for `--class`, the null class for CFG."""
    return {
        "difftool_version": __version__,
        "recipe": cfg.recipe,
        "dataset": cfg.data.dataset,
        "resolution": cfg.data.resolution,
        "channels": data.channels,
        "num_classes": num_classes,
        "label_names": data.label_names if num_classes else None,
        "null_class": num_classes,
        # How the model is meant to be sampled, for copies of model/ away from the run (a distilled one: ddim or lcm, 4)
        "sample": {key: getattr(cfg.sample, key) for key in ("scheduler", "steps", "guidance_scale", "guidance_rescale",
                                                            "eta")},
    }


def export_pipeline(dest: Path, *, unet: UNet2DModel, raw_state: dict | None, scheduler: DDPMScheduler, info: dict) -> None:
    """A plain diffusers pipeline folder that `DDPMPipeline.from_pretrained` loads as it is.

    `unet/` holds the weights to sample with (EMA when there is one); `unet_raw/` the raw
    training weights, which diffusers ignores as it is not listed in model_index.json.
    """
    with atomic_dir(Path(dest)) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        if raw_state is not None:
            raw = UNet2DModel.from_config(unet.config)
            raw.load_state_dict(raw_state)
            raw.save_pretrained(tmp / "unet_raw", safe_serialization=True)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))


def save_single_file(path: Path, unet: UNet2DModel, scheduler_config: dict, info: dict) -> None:
    """One .safetensors file that `load_native` reads on its own: the configs travel in its metadata."""
    accepted = inspect.signature(UNet2DModel.__init__).parameters
    metadata = {
        "format": "pt",
        "difftool_format": SINGLE_FILE_FORMAT,
        "unet_config": json.dumps({k: v for k, v in unet.config.items() if k in accepted}),
        "scheduler_config": json.dumps(scheduler_config),
        "difftool": json.dumps(info),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata=metadata)
