"""`difftool sample --trajectory K` (sampling/trajectory.py): what each image went through, at no model call more."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.images import animation_metadata
from difftool.sampling.trajectory import chosen_calls
from tests.conftest import invoke

pytestmark = pytest.mark.usefixtures("scratch_cwd")


def frames_of(path: Path) -> list[np.ndarray]:
    with Image.open(path) as img:
        frames = []
        for i in range(img.n_frames):
            img.seek(i)
            frames.append(np.array(img.convert("RGB")))
        return frames


def shrink(frame: np.ndarray, factor: int) -> np.ndarray:
    """Undo a nearest-neighbour enlargement, checking that it was one."""
    small = frame[::factor, ::factor]
    np.testing.assert_array_equal(small.repeat(factor, 0).repeat(factor, 1), frame)
    return small


def counting_model_calls(monkeypatch) -> list[int]:
    from diffusers import UNet2DModel

    calls = [0]
    forward = UNet2DModel.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", counted)
    return calls


def test_chosen_calls_are_evenly_spaced_from_the_first_to_the_last():
    assert chosen_calls(50, 5) == [0, 12, 24, 37, 49]
    assert chosen_calls(3, 8) == [0, 1, 2]  # never more points than calls
    assert chosen_calls(10, 1) == [9]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "heun", "dpm-solver"])
def test_the_last_frame_is_the_image_and_images_are_unchanged(tiny_run, monkeypatch, scheduler):
    """Every scheduler: the animation ends on the very image `sample` writes (lossless WebP, enlarged by a whole
    factor), recording changes no image and costs no model call, and the strip has a column per point and the end."""
    calls = counting_model_calls(monkeypatch)
    common = [tiny_run, "-n", "3", "--steps", "6", "--scheduler", scheduler, "-q"]
    assert invoke("sample", *common, "-o", "plain").exit_code == 0
    plain_calls, calls[0] = calls[0], 0
    result = invoke("sample", *common, "-o", "traced", "--trajectory", "4")
    assert result.exit_code == 0, result.output
    assert calls[0] == plain_calls
    for i in range(3):
        image = np.array(Image.open(f"traced/{i:06d}.png"))
        np.testing.assert_array_equal(image, np.array(Image.open(f"plain/{i:06d}.png")))
        frames = frames_of(Path(f"traced/trajectory/{i:06d}.webp"))
        meta = animation_metadata(Image.open(f"traced/trajectory/{i:06d}.webp"))
        assert len(frames) == 5  # 4 points, then the image
        np.testing.assert_array_equal(shrink(frames[-1], meta["enlarged"]), image)
        assert meta["scheduler"] == scheduler and meta["index"] == str(i)
        strip = Image.open(f"traced/trajectory/{i:06d}.png")
        timesteps = strip.text["trajectory_timesteps"].split(",")
        assert len(timesteps) == 4 and float(timesteps[0]) > float(timesteps[-1])
        assert strip.text["scheduler"] == scheduler and strip.width > strip.height  # 5 columns, 2 rows


def test_overwrite_replaces_old_trajectories_and_resume_adds_those_of_new_images(tiny_run):
    base = [tiny_run, "--steps", "2", "-o", "out", "-q", "--trajectory", "2"]
    assert invoke("sample", *base, "-n", "2").exit_code == 0
    assert invoke("sample", *base, "-n", "3", "--resume").exit_code == 0
    assert sorted(p.name for p in Path("out/trajectory").glob("*.webp")) == [f"{i:06d}.webp" for i in range(3)]
    assert invoke("sample", tiny_run, "--steps", "2", "-o", "out", "-q", "-n", "1", "--overwrite").exit_code == 0
    assert not Path("out/trajectory").exists()
    settings = json.loads(Path("out/sample.json").read_text())
    assert "trajectory" not in settings  # it changes no image, so a resume may ask for it or not


def test_a_negative_trajectory_is_refused_in_one_line(tiny_run):
    from tests.conftest import assert_user_error

    assert_user_error(invoke("sample", tiny_run, "--trajectory", "-1"), "--trajectory")


def traced_batch(run, scheduler: str, steps: int, points: int):
    """`sample_batch` with a Trajectory, as training's previews use it: (images, trajectory)."""
    from difftool.models.load import load_model
    from difftool.sampling.defaults import sampling_defaults
    from difftool.sampling.job import sample_batch
    from difftool.sampling.settings import resolve_sampler
    from difftool.sampling.trajectory import Trajectory

    model = load_model(run)
    sampler = resolve_sampler(model.info, model.scheduler_config, sampling_defaults(run, model.info),
                              scheduler=scheduler, steps=steps)
    traced = Trajectory(points)
    images = sample_batch(model.unet, model.scheduler_config, model.info, sampler, [0, 1], device="cpu",
                          trajectory=traced)
    return images, traced


def test_the_library_records_a_trajectory_without_a_folder(tiny_run):
    images, traced = traced_batch(tiny_run, "ddim", 4, 3)
    assert len(traced.noisy) == len(traced.predicted) == len(traced.timesteps) == 3
    assert torch.equal(traced.frames(1)[-1], images[1]) and traced.frames(1).shape[0] == 4


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_the_prediction_at_the_last_call_is_the_image(tiny_run, scheduler):
    """Both samplers end on the x0 their last model call implies (DDIM at alpha_bar(0) ~ 1, Euler at sigma 0), which
    checks the prediction's conversion in both frames (variance-preserving and sigma): within 1 level."""
    images, traced = traced_batch(tiny_run, scheduler, 5, 5)
    assert (traced.predicted[-1].int() - images.int()).abs().max() <= 1
    assert (traced.predicted[0].int() - images.int()).abs().max() > 1  # the first prediction is still far off


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_an_epsilon_model_ends_on_its_last_prediction_too(unconditional_model, scheduler):
    """A diffusers pipeline that predicts epsilon, unconditional and grayscale (the run fixture predicts v)."""
    images, traced = traced_batch(unconditional_model, scheduler, 5, 5)
    assert (traced.predicted[-1].int() - images.int()).abs().max() <= 1
