"""The forward process on the user's own image (`difftool noise`): x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps at chosen
timesteps of a model's own training schedule, as one captioned strip: the picture every diffusion tutorial draws,
made from the user's data and the schedule their model was trained with.

One noise draw serves every timestep, so the strip shows the same noise growing over the image rather than a new
pattern in each column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from difftool.data.decode import training_view
from difftool.errors import UserError
from difftool.images import captioned_grid, printable, save_png
from difftool.progress import show_notes
from difftool.models.load import load_model
from difftool.output_rules import refuse_inputs_as_output
from difftool.sampling.loop import to_uint8

DEFAULT_POINTS = 6


@dataclass
class ForwardStrip:
    output: Path
    timesteps: list[int]
    alpha_bars: list[float]  # the signal fraction of each timestep: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps


def pick_timesteps(spec: str | None, points: int, total: int) -> list[int]:
    """The timesteps to show: those listed in `spec` ("0,250,999"), else `points` evenly spaced from 0 to T-1."""
    if spec is None:
        if points < 2:
            raise UserError(f"--points must be at least 2 (the image and the end of the schedule), got {points}")
        return sorted({round(i * (total - 1) / (points - 1)) for i in range(points)})
    try:
        chosen = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--timesteps takes whole numbers separated by commas (e.g. 0,250,999), got {spec!r}") from None
    wrong = [t for t in chosen if not 0 <= t < total]
    if not chosen or wrong:
        raise UserError(f"--timesteps must lie in 0..{total - 1} (the model's schedule has {total} timesteps)"
                        + (f", got {wrong[0]}" if wrong else ", got none"))
    return chosen


def noised(image: torch.Tensor, scheduler_config: dict, timesteps: list[int], seed: int) -> tuple[torch.Tensor, list]:
    """uint8 C×H×W `image` at each of `timesteps` of the training schedule (uint8 N×C×H×W), and the schedule's
    signal fraction at each."""
    schedule = DDPMScheduler.from_config(scheduler_config)  # the betas, T and zero-SNR rescaling it was trained with
    x0 = image.float().div(127.5).sub(1).expand(len(timesteps), *image.shape)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)).expand_as(x0)
    at = torch.tensor(timesteps)
    return to_uint8(schedule.add_noise(x0, noise, at)), schedule.alphas_cumprod[at].tolist()


def forward_strip(model_source: str | Path, image: Path, output: Path | None = None, *, timesteps: str | None = None,
                  points: int = DEFAULT_POINTS, seed: int = 0, overwrite: bool = False) -> ForwardStrip:
    """Write the strip of `image` noised by the schedule of the model at `model_source` (no model call)."""
    image = Path(image)
    if not image.is_file():
        raise UserError(f"image {printable(image)} {'is a folder' if image.is_dir() else 'does not exist'}; "
                        "give the path of an image file")
    output = Path(output) if output else Path(f"{image.stem}-noise.png")
    refuse_inputs_as_output(output, {"the image": image, "the model": model_source})
    if output.is_dir():
        raise UserError(f"{printable(output)} is a folder; give --output a .png file name")
    if output.exists() and not overwrite:
        raise UserError(f"{printable(output)} exists; pass --overwrite to replace it, or choose another --output")
    model = load_model(model_source)
    show_notes(model.notes)
    info, config = model.info, model.scheduler_config
    chosen = pick_timesteps(timesteps, points, config["num_train_timesteps"])
    view = training_view(image, info["resolution"], info["channels"])
    frames, alpha_bars = noised(view, config, chosen, seed)
    strip = captioned_grid(frames, len(chosen), [f"t={t}" for t in chosen], ["x_t"])
    about = {"image": printable(image), "model": model.source, "model_hash": model.model_hash, "seed": str(seed),
             "timesteps": ",".join(map(str, chosen)), "alpha_bars": ",".join(f"{a:.6g}" for a in alpha_bars)}
    save_png(strip, output, about)
    return ForwardStrip(output, chosen, alpha_bars)
