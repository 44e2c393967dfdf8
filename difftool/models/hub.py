"""Models on the Hugging Face Hub: only what a UNet needs is downloaded."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from difftool.errors import UserError, first_line
from difftool.models.export import INFO_FILE

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HUB_CONFIGS = ["model_index.json", INFO_FILE, "config.json", "unet/config.json", "scheduler/scheduler_config.json"]


def download_unet(ref: str) -> Path:
    """`owner/name[@revision]` -> a local snapshot holding only what a UNet needs.

    A pipeline's other parts (VAE, text encoder) stay on the Hub, and so do .bin weights
    where there are safetensors.
    """
    repo_id, _, revision = ref.partition("@")

    def snapshot(weights_format: str) -> Path:
        weights = [f"{sub}diffusion_pytorch_model.{weights_format}" for sub in ("", "unet/")]
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                                      allow_patterns=HUB_CONFIGS + weights))

    try:
        folder = snapshot("safetensors")
        if not any((folder / sub / WEIGHT_FILES[0]).is_file() for sub in ("", "unet")):
            folder = snapshot("bin")
    except (OSError, ValueError) as err:
        if hub_constants.is_offline_mode():
            reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
        elif isinstance(err, RevisionNotFoundError):
            reason = f"no revision '{revision}'"
        elif isinstance(err, RepositoryNotFoundError):
            reason = "no such repository, or it is private or gated: log in with `hf auth login`"
        else:
            reason = first_line(err)
        raise UserError(f"cannot download '{ref}' from the Hugging Face Hub ({reason}); "
                        f"check the id and your connection, or give a local path") from err
    return folder
