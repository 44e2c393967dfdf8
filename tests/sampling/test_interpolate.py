"""`difftool interpolate` on the tiny run: slerp, the seed ends against `difftool sample` bit for bit, the strip and
the animation, DDIM inversion against a plain reference and its round trip, refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool.images import animation_metadata
from difftool.models.load import load_model
from difftool.sampling.interpolate import InterpolateRequest, interpolate_files, invert, slerp
from difftool.sampling.loop import Predictor, denoise, predicted_x0_and_noise, to_uint8
from difftool.sampling.schedulers import make_scheduler
from tests.conftest import assert_user_error
from tests.conftest import invoke as run_cli

pytestmark = pytest.mark.usefixtures("scratch_cwd")


def invoke(*args):
    return run_cli("interpolate", *args)


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB")).astype(int)


def webp_frames(path: Path, factor: int) -> list[np.ndarray]:
    """The animation's frames, shrunk back by the whole `factor` it was enlarged by (nearest neighbour)."""
    img = Image.open(path)
    out = []
    for k in range(img.n_frames):
        img.seek(k)
        out.append(np.array(img.convert("RGB"))[::factor, ::factor].astype(int))
    return out


# ---------------------------------------------------------------- slerp


def test_slerp_ends_are_exact_and_the_norm_is_kept_between_equal_norms():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    b = b * (a.norm() / b.norm())
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    for w in (0.1, 0.5, 0.9):
        assert math.isclose(float(slerp(a, b, w).norm()), float(a.norm()), rel_tol=1e-5)
    assert float(torch.lerp(a, b, 0.5).norm()) < 0.8 * float(a.norm())  # what slerp avoids
    # the angle moves evenly: halfway, equally far from both ends
    mid = slerp(a, b, 0.5)
    assert math.isclose(float((mid - a).norm()), float((mid - b).norm()), rel_tol=1e-5)


def test_slerp_of_colinear_vectors_falls_back_to_a_straight_line():
    a = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1))
    for b in (2 * a, a + 1e-6):
        assert torch.allclose(slerp(a, b, 0.25), torch.lerp(a, b, 0.25))
        assert torch.isfinite(slerp(a, b, 0.25)).all()


# ---------------------------------------------------------------- seeds mode


@pytest.mark.parametrize(("scheduler", "steps", "extra", "nfe"), [
    ("ddim", 5, [], 10),  # the tiny run's recipe guides, and a guided step runs the network twice
    ("dpm-solver", 4, ["--class", "1", "--guidance-scale", "2"], 8),
    ("ddim", 5, ["--guidance-scale", "1"], 5),
])
def test_the_ends_are_sample_bit_for_bit_and_the_middle_differs(tiny_run, scheduler, steps, extra, nfe):
    common = ["--scheduler", scheduler, "--steps", steps, *extra]
    result = invoke(tiny_run, "--seeds", 3, 11, "--frames", 4, *common, "-o", "walk.png")
    assert result.exit_code == 0, result.output
    assert f"{nfe} model calls each" in result.stderr
    frames = webp_frames(Path("walk.webp"), animation_metadata(Image.open("walk.webp"))["enlarged"])
    assert len(frames) == 4
    for seed, frame in ((3, frames[0]), (11, frames[-1])):
        made = run_cli("sample", tiny_run, "--seed", seed, "-n", 1, *common, "-o", f"s{seed}")
        assert made.exit_code == 0, made.output
        assert np.array_equal(pixels(Path(f"s{seed}/000000.png")), frame), seed
    for middle in frames[1:-1]:
        assert not np.array_equal(middle, frames[0]) and not np.array_equal(middle, frames[-1])


def test_strip_and_animation_carry_the_settings(tiny_run):
    result = invoke(tiny_run, "--seeds", 0, 1, "--frames", 5, "--steps", 4, "--class", "1")
    assert result.exit_code == 0, result.output
    strip, animation = Path("interpolate-0-1.png"), Path("interpolate-0-1.webp")
    meta = Image.open(strip).info
    assert meta["scheduler"] == "ddim" and meta["steps"] == "4" and meta["frames"] == "5"
    assert meta["seeds"] == "[0, 1]" and meta["class_id"] == "1" and meta["model_hash"]
    assert meta["interpolation_weights"] == "[0.0, 0.25, 0.5, 0.75, 1.0]"
    assert Image.open(animation).n_frames == 5
    about = animation_metadata(Image.open(animation))
    assert about["seeds"] == "[0, 1]" and about["guidance_scale"] == meta["guidance_scale"]
    # one row of five frames, captions under them: wider than tall
    width, height = Image.open(strip).size
    assert width > 4 * height
    again = invoke(tiny_run, "--seeds", 0, 1, "--frames", 5, "--steps", 4, "--class", "1")
    assert_user_error(again, "already exists", "--overwrite")
    assert invoke(tiny_run, "--seeds", 0, 1, "--frames", 5, "--steps", 4, "--overwrite", "-q").exit_code == 0


# ---------------------------------------------------------------- images mode


def reference_inversion(unet, config: dict, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM run backwards, written out: at the timesteps t of DDIM (trailing, eta 0) from the lowest, the model asked
    at t about the sample one level below, its output read at that lower level (as diffusers' inversion reads it),
    x0 clipped as training's clip_sample says, and the sample moved up to t."""
    decoder = make_scheduler("ddim", config, steps=steps)
    decoder.set_timesteps(steps)
    alphas, ratio = decoder.alphas_cumprod, config["num_train_timesteps"] // steps
    x = x0
    for t in decoder.timesteps.flip(0):
        below = int(t) - ratio
        a_now = alphas[below] if below >= 0 else torch.tensor(1.0)
        out = unet(x, t, class_labels=torch.tensor([0])).sample
        clean, eps = predicted_x0_and_noise(out, x, a_now, config["prediction_type"])
        clean = clean.clamp(-1, 1)
        x = alphas[t].sqrt() * clean + (1 - alphas[t]).sqrt() * eps
    return x


def round_trip(model, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0 sampled with DDIM, its inversion, the inversion decoded again), the last as uint8."""
    predict = Predictor(model.unet.eval(), class_labels=torch.tensor([0]))
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    image = to_uint8(denoise(predict, make_scheduler("ddim", model.scheduler_config, steps=steps), noise, steps=steps))
    decoder = make_scheduler("ddim", model.scheduler_config, steps=steps)
    decoder.set_timesteps(steps)
    inverted = invert(predict, decoder, image.float().div(127.5).sub(1))
    again = to_uint8(denoise(predict, make_scheduler("ddim", model.scheduler_config, steps=steps), inverted,
                             steps=steps))
    return image, inverted, again


def test_inversion_is_ddim_backwards_written_out(tiny_run):
    model = load_model(tiny_run)
    x0 = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    decoder = make_scheduler("ddim", model.scheduler_config, steps=7)
    decoder.set_timesteps(7)
    predict = Predictor(model.unet.eval(), class_labels=torch.tensor([0]))
    with torch.inference_mode():
        expected = reference_inversion(model.unet, model.scheduler_config, x0, 7)
    torch.testing.assert_close(invert(predict, decoder, x0), expected, rtol=1e-5, atol=1e-5)


# Mean absolute error (levels of 0-255) of sample -> invert -> decode on the tiny test model (6 training steps,
# v-prediction, T = 50), class 0, no guidance, over 4 seeds. Measured on CPU: 10 steps 17.2, 25 steps 7.6, 50
# steps 3.9 (the test prints them: pytest -s -k round_trip); the bounds leave about 1.5x margin.
ROUND_TRIP_BOUND = {10: 26.0, 25: 11.5, 50: 6.0}


@pytest.mark.parametrize("steps", sorted(ROUND_TRIP_BOUND))
def test_inversion_round_trip_error(tiny_run, steps):
    model = load_model(tiny_run)
    errors = []
    for seed in range(4):
        image, _, again = round_trip(model, steps, seed)
        errors.append(float((image.int() - again.int()).abs().float().mean()))
    mean = sum(errors) / len(errors)
    print(f"round trip at {steps} steps: {mean:.3f} levels")
    assert mean < ROUND_TRIP_BOUND[steps]


def test_images_mode_writes_frames_between_the_two_images(tiny_run):
    made = run_cli("sample", tiny_run, "-n", 2, "--scheduler", "ddim", "--steps", 10, "-o", "s")
    assert made.exit_code == 0, made.output
    result = invoke(tiny_run, "s/000000.png", "s/000001.png", "--frames", 3, "--steps", 10)
    assert result.exit_code == 0, result.output
    meta = Image.open("interpolate-000000-000001.png").info
    assert meta["images"] == '["000000.png", "000001.png"]' and meta["class"] == "none"
    assert Image.open("interpolate-000000-000001.webp").n_frames == 3


def test_images_mode_library_ends_come_back_close(tiny_run):
    run_cli("sample", tiny_run, "-n", 2, "--scheduler", "ddim", "--steps", 25, "--class", "0", "-o", "s")
    request = InterpolateRequest(images=(Path("s/000000.png"), Path("s/000001.png")), frames=3, steps=25,
                                 classes=["0"])
    result = interpolate_files(tiny_run, request, Path("out.png"))
    for frame, path in ((result.frames[0], "s/000000.png"), (result.frames[-1], "s/000001.png")):
        error = np.abs(frame.permute(1, 2, 0).numpy().astype(int) - pixels(Path(path))).mean()
        assert error < 12.0, error  # measured 7.7


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("args", "fragments"), [
    (["--seeds", 0, 1, 2], ["--seeds takes two seeds, got 3"]),
    (["--seeds", 0], ["--seeds"]),
    (["a.png", "--seeds", 0, 1], ["not both"]),
    ([], ["give --seeds A B"]),
    (["only.png"], ["two images, got 1"]),
    (["--seeds", 0, 1, "--frames", 1], ["--frames"]),
    (["--seeds", 0, 1, "--scheduler", "ddpm"], ["deterministic sampler", "ddpm adds fresh noise", "ddim"]),
    (["--seeds", 0, 1, "--scheduler", "euler-a"], ["deterministic sampler"]),
    (["--seeds", 0, 1, "--scheduler", "dpm-solver-sde"], ["deterministic sampler"]),
    (["--seeds", 0, 1, "--eta", 0.5], ["--eta 0.5 adds noise"]),
    (["--seeds", 0, 1, "--scheduler", "lcm", "--steps", 4], ["deterministic sampler"]),
    (["--seeds", 0, 1, "--scheduler", "tcd", "--steps", 4], ["deterministic sampler"]),
    (["--seeds", 0, 1, "--class", "0", "--class", "1"], ["one --class"]),
    (["--seeds", 0, 1, "-o", "walk.gif"], [".png"]),
    (["missing.png", "other.png"], ["missing.png does not exist"]),
    (["broken.png", "broken.png"], ["cannot read image broken.png"]),
    (["broken.png", "broken.png", "--scheduler", "dpm-solver"], ["decodes with ddim"]),
])
def test_bad_requests_are_one_line(tiny_run, args, fragments):
    Path("broken.png").write_bytes(b"not a png")
    assert_user_error(invoke(tiny_run, *args), *fragments)
    assert not list(Path().glob("interpolate-*"))


def test_an_input_is_never_the_output(tiny_run):
    run_cli("sample", tiny_run, "-n", 2, "--steps", 3, "-o", "s")
    result = invoke(tiny_run, "s/000000.png", "s/000001.png", "-o", "s/000000.png", "--overwrite")
    assert_user_error(result, "is the first image itself")
