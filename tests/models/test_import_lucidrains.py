"""The lucidrains importer: it must recognise the Trainer's checkpoints and refuse them, naming what does not map.

`LucidrainsUnet` lays out the parameters of denoising-diffusion-pytorch 2.3's `Unet` under the same
names, so its state dict has the format's keys and shapes. It has no forward: no UNet2DModel can
reproduce that Unet (see the importer's docstring), so there is no output to compare.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn
from typer.testing import CliRunner

from difftool.errors import UserError
from difftool.models.importers import ddpm_original, lucidrains
from tests.conftest import assert_user_error
from tests.models.ddpm_reference import SMALL, reference


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))


class Block(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = RMSNorm(dim_out)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.block1, self.block2 = Block(dim, dim_out), Block(dim_out, dim_out)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()


class Attention(nn.Module):
    """Both of its attention layers: linear ones (keys on a memory of size num_mem_kv last, output
    RMS-normed) and full ones differ only in those two parameter layouts."""

    def __init__(self, dim: int, linear: bool = False, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4):
        super().__init__()
        self.norm = RMSNorm(dim)
        memory = (2, heads, dim_head, num_mem_kv) if linear else (2, heads, num_mem_kv, dim_head)
        self.mem_kv = nn.Parameter(torch.zeros(*memory))
        self.to_qkv = nn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)
        out = nn.Conv2d(heads * dim_head, dim, 1)
        self.to_out = nn.Sequential(out, RMSNorm(dim)) if linear else out


class LucidrainsUnet(nn.Module):
    """`Unet(dim, dim_mults, channels, full_attn)` of 2.3: the default puts full attention on the last level only."""

    def __init__(self, dim: int = 16, dim_mults=(1, 2), channels: int = 3, full_attn=None):
        super().__init__()
        full_attn = full_attn or (False,) * (len(dim_mults) - 1) + (True,)
        time_dim = dim * 4
        self.init_conv = nn.Conv2d(channels, dim, 7, padding=3)
        self.time_mlp = nn.Sequential(nn.Identity(), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))
        dims = [dim, *(dim * m for m in dim_mults)]
        in_out = list(itertools.pairwise(dims))
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for level, ((dim_in, dim_out), full) in enumerate(zip(in_out, full_attn)):
            last = level == len(in_out) - 1
            down = nn.Conv2d(dim_in, dim_out, 3, padding=1) if last else nn.Sequential(
                nn.PixelUnshuffle(2), nn.Conv2d(dim_in * 4, dim_out, 1))
            self.downs.append(nn.ModuleList([ResnetBlock(dim_in, dim_in, time_dim), ResnetBlock(dim_in, dim_in, time_dim),
                                             Attention(dim_in, linear=not full), down]))
        self.mid_block1 = ResnetBlock(dims[-1], dims[-1], time_dim)
        self.mid_attn = Attention(dims[-1])
        self.mid_block2 = ResnetBlock(dims[-1], dims[-1], time_dim)
        for level, ((dim_in, dim_out), full) in enumerate(zip(reversed(in_out), reversed(full_attn))):
            last = level == len(in_out) - 1
            up = nn.Conv2d(dim_out, dim_in, 3, padding=1) if last else nn.Sequential(
                nn.Upsample(scale_factor=2), nn.Conv2d(dim_out, dim_in, 3, padding=1))
            self.ups.append(nn.ModuleList([ResnetBlock(dim_out + dim_in, dim_out, time_dim),
                                           ResnetBlock(dim_out + dim_in, dim_out, time_dim),
                                           Attention(dim_out, linear=not full), up]))
        self.final_res_block = ResnetBlock(dim * 2, dim, time_dim)
        self.final_conv = nn.Conv2d(dim, channels, 1)


def trainer_checkpoint(unet: nn.Module, timesteps: int = 10) -> dict:
    """What the Trainer's `save` writes: GaussianDiffusion's state dict raw and inside an ema_pytorch EMA."""
    betas = torch.linspace(1e-4, 0.02, timesteps)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    diffusion = {"betas": betas, "alphas_cumprod": alphas_cumprod,
                 "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1]]),
                 **{f"model.{key}": tensor for key, tensor in unet.state_dict().items()}}
    ema = {"initted": torch.tensor(True), "step": torch.tensor(7),
           **{f"ema_model.{key}": tensor.clone() for key, tensor in diffusion.items()}}
    return {"step": 7, "model": diffusion, "opt": {}, "ema": ema, "scaler": None, "version": "2.3.4"}


def refusal(checkpoint: dict, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        lucidrains.convert(checkpoint, **kwargs)
    return str(caught.value)


def test_detects_the_trainer_checkpoint_as_torch_load_returns_it(tmp_path):
    torch.save(trainer_checkpoint(LucidrainsUnet()), tmp_path / "model-1.pt")
    assert lucidrains.detect(torch.load(tmp_path / "model-1.pt", weights_only=True, map_location="cpu"))


def test_detects_checkpoints_from_before_0_27():
    checkpoint = trainer_checkpoint(LucidrainsUnet())
    checkpoint["model"] = {key.replace("model.", "denoise_fn.", 1): t for key, t in checkpoint["model"].items()}
    assert lucidrains.detect(checkpoint)


def test_detect_rejects_other_layouts():
    unet_state = LucidrainsUnet().state_dict()
    assert not lucidrains.detect(unet_state)
    assert not lucidrains.detect({"model": unet_state})  # no schedule buffers
    assert not lucidrains.detect(reference(SMALL).state_dict())
    assert not lucidrains.detect(UNet2DModel(block_out_channels=(4, 8), norm_num_groups=2, down_block_types=("DownBlock2D",) * 2,
                                              up_block_types=("UpBlock2D",) * 2).state_dict())
    assert not lucidrains.detect([torch.zeros(1)])
    assert not ddpm_original.detect(trainer_checkpoint(LucidrainsUnet()))


def test_default_unet_is_refused_in_one_line_naming_each_difference():
    message = refusal(trainer_checkpoint(LucidrainsUnet()))
    assert "\n" not in message
    for fragment in ("7x7 stem where conv_in is 3x3 (init_conv.weight)", "pre-norm (downs.0.0.block1.norm.g)",
                     "SiLU (time_mlp.1.weight)", "linear attention (downs.0.2.to_out.1.g)",
                     "memory key/values (downs.0.2.mem_kv)"):
        assert fragment in message
    assert message.count("(") == lucidrains.SHOWN_KEYS


def test_full_attention_everywhere_is_refused_too():
    message = refusal(trainer_checkpoint(LucidrainsUnet(full_attn=(True, True))))
    assert "linear attention" not in message
    assert "memory key/values (downs.0.2.mem_kv)" in message


def test_another_format_forced_on_it_is_named():
    with pytest.raises(UserError, match="not a lucidrains Trainer checkpoint"):
        lucidrains.convert(reference(SMALL).state_dict())


@pytest.mark.parametrize("weights", [None, "ema", "raw"])
def test_the_weights_choice_changes_nothing(weights):
    checkpoint = trainer_checkpoint(LucidrainsUnet())
    assert refusal(checkpoint, weights=weights) == refusal(checkpoint)


def test_the_command_detects_and_refuses_with_exit_code_2(tmp_path, monkeypatch):
    from difftool.cli.app import app

    monkeypatch.chdir(tmp_path)
    torch.save(trainer_checkpoint(LucidrainsUnet()), "model-1.pt")
    result = CliRunner().invoke(app, ["convert", "model-1.pt", "out"])
    assert_user_error(result, "lucidrains", "cannot become a UNet2DModel", "init_conv.weight")
    assert not (tmp_path / "out").exists()
