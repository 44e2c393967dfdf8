"""lucidrains/denoising-diffusion-pytorch Trainer checkpoints (`results/model-N.pt`): recognised, then refused.

No `Unet` that package has released is a UNet2DModel, whatever its arguments, and neither renaming
nor folding weights can make one (read in 0.2, 0.14, 0.27, 1.0, 1.5, 2.0 and 2.3.4, against diffusers 0.42):

- the stem `init_conv` is 7x7 (since 0.14); UNet2DModel's conv_in is always 3x3;
- its resnet blocks are post-norm (conv, norm, scale/shift, SiLU; the residual is added after the
  last activation) where ResnetBlock2D is pre-norm (norm, SiLU, conv), so the residual streams differ;
- the time MLP uses GELU (Mish in 0.2); UNet2DModel's TimestepEmbedding uses SiLU;
- every level attends, by default linearly (diffusers has no linear attention) but the innermost,
  pre-normed per pixel (LayerNorm, then RMSNorm), with learned memory key/values since 2.0;
- since 0.27 widths change in the downsample, and a final resnet block reads the stem's output again.

Weight standardization (1.x) and the pixel-unshuffle downsample would fold into plain convs, but the
points above would not. So this importer only recognises the layout, to refuse it with the keys
that carry the differences instead of calling the file unknown.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from difftool.errors import UserError
from difftool.models.importers.base import Imported

NAME = "lucidrains"
DIFFUSION_BUFFERS = ("betas", "alphas_cumprod")
UNET_PREFIXES = ("model.", "denoise_fn.")  # GaussianDiffusion's attribute for the Unet: `model` since 0.27
SHOWN_KEYS = 5

# (what does not map, whether a Unet key and its tensor show it); one key is named per difference found.
DIFFERENCES: tuple[tuple[str, Callable[[str, torch.Tensor], bool]], ...] = (
    ("a 7x7 stem where conv_in is 3x3", lambda key, tensor: key == "init_conv.weight" and tensor.shape[-1] != 3),
    ("post-norm resnet blocks where ResnetBlock2D is pre-norm",
     lambda key, tensor: re.search(r"\.block1\.(norm|block\.1)\.", key) is not None),
    ("a GELU time MLP where UNet2DModel's is SiLU", lambda key, tensor: key == "time_mlp.1.weight"),
    ("linear attention", lambda key, tensor: ".to_out.1." in key),
    ("attention memory key/values", lambda key, tensor: key.endswith("mem_kv")),
    ("a final resnet block over the stem", lambda key, tensor: key.startswith("final_res_block.")),
)


def detect(checkpoint) -> bool:
    """True for the Trainer's dict: the GaussianDiffusion state dict (Unet keys and its buffers) under "model"."""
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    return (isinstance(state, dict) and all(buffer in state for buffer in DIFFUSION_BUFFERS)
            and any(key.startswith(UNET_PREFIXES) for key in state))


def convert(checkpoint: dict, *, weights: str | None = None) -> Imported:
    """Always refuses, naming what does not map; `weights` changes nothing, EMA and raw share the Unet."""
    if not detect(checkpoint):
        raise UserError(f"not a {NAME} Trainer checkpoint: it has no \"model\" dict of Unet weights and "
                        f"{', '.join(DIFFUSION_BUFFERS)}; force another format with --from")
    differences = unmappable(_unet_state(checkpoint["model"]))
    found = "; ".join(f"{what} ({key})" for what, key in differences) or "a Unet unlike UNet2DModel"
    raise UserError(f"a {NAME}/denoising-diffusion-pytorch checkpoint cannot become a UNet2DModel: it has {found}; "
                    f"no Unet of that package maps exactly, so sample it with denoising-diffusion-pytorch itself")


def unmappable(unet_state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(difference, first key showing it) for each difference in DIFFERENCES, at most SHOWN_KEYS."""
    found = []
    for what, shows in DIFFERENCES:
        key = next((key for key, tensor in unet_state.items() if shows(key, tensor)), None)
        if key is not None:
            found.append((what, key))
    return found[:SHOWN_KEYS]


def _unet_state(diffusion_state: dict) -> dict[str, torch.Tensor]:
    """The Unet's own keys: GaussianDiffusion's prefix stripped, its schedule buffers left out."""
    return {key.split(".", 1)[1]: tensor for key, tensor in diffusion_state.items() if key.startswith(UNET_PREFIXES)}
