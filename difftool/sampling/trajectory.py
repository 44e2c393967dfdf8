"""What a sample goes through on its way from noise: the noisy sample x_t and the clean image the model predicts
from it, at chosen model calls of any scheduler, as a strip and an animation (`difftool sample --trajectory K`).

Recording costs no model call: `Trajectory.watch` wraps the predictor `denoise` calls and keeps what that call saw
and returned. The model's input is x_t of the variance-preserving process for every scheduler (Euler-type ones
scale theirs into it), so x_t is shown on the same scale whatever the sampler, and the predicted x0 follows from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from difftool.images import captioned_grid, look_factor, enlarge, save_animation, save_png
from difftool.sampling.loop import predicted_x0_and_noise, to_uint8
from difftool.sampling.schedulers import alpha_bar_now

ROW_NAMES = ["x_t", "pred. x0"]


def chosen_calls(total: int, points: int) -> list[int]:
    """`points` model calls out of `total`, evenly spaced, the first and the last among them."""
    if points <= 1 or total <= 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (points - 1)) for i in range(points)})


class Trajectory:
    """The trajectory of one batch: at the chosen calls, x_t and the predicted x0 (uint8 N×C×H×W each), the
    timestep of the call, and the final images."""

    def __init__(self, points: int):
        self.points = points
        self.noisy: list[torch.Tensor] = []
        self.predicted: list[torch.Tensor] = []
        self.timesteps: list[float] = []
        self.final: torch.Tensor | None = None

    def watch(self, predict, scheduler, total_calls: int):
        """`predict`, recording its chosen calls; `scheduler` is the one `denoise` steps (it knows the noise level)."""
        keep, calls = set(chosen_calls(total_calls, self.points)), iter(range(total_calls + 1))

        def recorded(model_in: torch.Tensor, t) -> torch.Tensor:
            out = predict(model_in, t)
            if next(calls) in keep:
                alpha_bar = alpha_bar_now(scheduler, t, out.device)
                x0 = predicted_x0_and_noise(out, model_in, alpha_bar, scheduler.config.prediction_type)[0]
                self.noisy.append(to_uint8(model_in))
                self.predicted.append(to_uint8(x0))
                self.timesteps.append(float(t))
            return out

        return recorded

    def finish(self, images: torch.Tensor) -> None:
        """The batch's final uint8 images (what `sample` writes)."""
        self.final = images

    def frames(self, j: int) -> torch.Tensor:
        """Image j's x_t at each chosen call, then its final image: F×C×H×W."""
        return torch.stack([x[j] for x in self.noisy] + [self.final[j]])

    def strip(self, j: int) -> Image.Image:
        """Image j's strip: x_t above, the predicted x0 below, the timestep under each column; the last column is
        the final image (t = 0, where x_t and x0 are the image)."""
        columns = len(self.noisy) + 1
        tiles = torch.stack([x[j] for x in self.noisy] + [self.final[j]]
                            + [x[j] for x in self.predicted] + [self.final[j]])
        captions = [f"t={t:g}" for t in self.timesteps] + ["t=0"]
        return captioned_grid(tiles, columns, captions, ROW_NAMES)

    def write(self, folder: Path, indices: list[int], metadata) -> None:
        """NNNNNN.png (strip) and NNNNNN.webp (animation, enlarged to be looked at) in `folder` for image `indices[j]`,
        each with `metadata(index)` and the timesteps shown."""
        folder.mkdir(parents=True, exist_ok=True)
        factor = look_factor(self.final.shape[-1])
        for j, index in enumerate(indices):
            about = {**metadata(index), "trajectory_timesteps": ",".join(f"{t:g}" for t in self.timesteps)}
            save_png(self.strip(j), folder / f"{index:06d}.png", about)
            save_animation(enlarge(self.frames(j), factor), folder / f"{index:06d}.webp",
                           {**about, "enlarged": factor})
