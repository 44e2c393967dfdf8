"""Inpainting: the RePaint walk, both methods on an analytic model, noise levels of the known region, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from difftool.inpainting.repaint import KnownRegion, RepaintSchedule, blend, repaint
from difftool.sampling.loop import Predictor, image_generators, initial_noise
from difftool.sampling.schedulers import SCHEDULERS, make_scheduler, model_calls
from tests.conftest import assert_user_error
from tests.conftest import invoke as run_cli

T, SHAPE = 50, (3, 16, 16)


def training_config(**overrides) -> dict:
    settings = {"num_train_timesteps": T, "beta_start": 1e-6, "beta_end": 0.2, "clip_sample": True, **overrides}
    return dict(DDPMScheduler(**settings).config)


class KnowsTheAnswer:
    """Predicts the noise that turns any x_t into `answer`; records the inputs it sees."""

    dtype = torch.float32

    def __init__(self, answer: torch.Tensor):
        self.alphas_cumprod = DDPMScheduler.from_config(training_config()).alphas_cumprod
        self.answer, self.calls = answer, []

    def __call__(self, x_t, t, **kwargs):
        alpha_bar = self.alphas_cumprod[round(float(t))]
        self.calls.append((x_t.clone(), alpha_bar))
        eps = (x_t - alpha_bar.sqrt() * self.answer) / (1 - alpha_bar).sqrt()
        return type("Output", (), {"sample": eps})


def answer() -> torch.Tensor:
    return 0.9 * torch.linspace(-1, 1, int(np.prod(SHAPE))).reshape(SHAPE)


def centre_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, *SHAPE[1:])
    mask[..., 4:12, 4:12] = 1
    return mask


def known_image() -> torch.Tensor:
    return -0.5 * torch.ones(2, *SHAPE)  # differs from the answer everywhere


# ---------------------------------------------------------------- the RePaint walk


def test_repaint_schedule_matches_the_paper_count():
    assert RepaintSchedule(250, 10, 10).model_calls() == 250 + 24 * 9 * 10


@pytest.mark.parametrize(("levels", "length", "n"), [(20, 5, 3), (10, 1, 4), (7, 10, 10), (12, 3, 1)])
def test_repaint_schedule_walks_down_to_the_clean_image(levels, length, n):
    moves = list(RepaintSchedule(levels, length, n).moves())
    level = 0
    for move, at in moves:
        assert at == (level if move == "down" else level - 1)
        level += 1 if move == "down" else -1
        assert 0 <= level <= levels
    assert level == levels and moves[-1] == ("down", levels - 1)
    ups = sum(move == "up" for move, _ in moves)
    assert ups == (n - 1) * length * len(range(levels - 1, length - 1, -length))


# ---------------------------------------------------------------- both methods, analytic model


def test_repaint_fills_with_the_answer_and_keeps_the_known_region():
    model = KnowsTheAnswer(answer())
    generators = image_generators(0, [0, 1])
    noise = initial_noise(generators, SHAPE, "cpu")
    out = repaint(Predictor(model), DDPMScheduler.from_config(training_config()), known_image(), centre_mask(), noise,
                  schedule=RepaintSchedule(10, 2, 3), generators=generators)
    inside = centre_mask().bool().expand_as(out)
    torch.testing.assert_close(out[inside], answer().expand_as(out)[inside], atol=1e-4, rtol=0)
    assert torch.equal(out[~inside], known_image()[~inside])


@pytest.mark.parametrize(("spec", "resample"), [(spec, r) for spec in SCHEDULERS for r in ([0, 2] if spec.resamples else [0])],
                         ids=lambda v: v.name if hasattr(v, "name") else str(v))
def test_blend_fills_with_the_answer_with_every_scheduler(spec, resample):
    model = KnowsTheAnswer(answer())
    generators = image_generators(0, [0, 1])
    noise = initial_noise(generators, SHAPE, "cpu")
    out = blend(Predictor(model), make_scheduler(spec.name, training_config(), steps=10),
                KnownRegion(known_image(), centre_mask(), generators, resample), noise, steps=10)
    assert len(model.calls) == model_calls(spec, 10, training_config()) * (1 + resample) - resample
    inside = centre_mask().bool().expand_as(out)
    torch.testing.assert_close(out[inside], answer().expand_as(out)[inside], atol=5e-3, rtol=0)
    assert torch.equal(out[~inside], known_image()[~inside])


def implied_noise_std(calls, known: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Std of (x_t - sqrt(ab) x0) / sqrt(1 - ab) over the known region of each model input: 1 if noised to t."""
    keep = (1 - mask).bool().expand_as(known)
    return [float(((x - ab.sqrt() * known) / (1 - ab).sqrt())[keep].std()) for x, ab in calls]


def test_repaint_noises_the_known_region_to_the_level_of_each_model_call():
    """The off-by-one of diffusers' RePaintScheduler would show here as a wrong noise level."""
    model = KnowsTheAnswer(answer())
    known = known_image().repeat(4, 1, 1, 1)
    generators = image_generators(0, range(8))
    repaint(Predictor(model), DDPMScheduler.from_config(training_config()), known, centre_mask(),
            initial_noise(generators, SHAPE, "cpu"), schedule=RepaintSchedule(10, 2, 2), generators=generators)
    stds = implied_noise_std(model.calls[1:], known, centre_mask())  # the first input is pure noise by design
    assert min(stds) > 0.9 and max(stds) < 1.1, stds


@pytest.mark.parametrize("resample", [0, 2])
@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler-a", "dpm-solver", "unipc"])
def test_blend_noises_the_known_region_to_the_level_of_each_model_call(name, resample):
    model = KnowsTheAnswer(answer())
    known = known_image().repeat(4, 1, 1, 1)
    generators = image_generators(0, range(8))
    scheduler = make_scheduler(name, training_config(), steps=10)
    blend(Predictor(model), scheduler, KnownRegion(known, centre_mask(), generators, resample),
          initial_noise(generators, SHAPE, "cpu"), steps=10)
    stds = implied_noise_std(model.calls, known, centre_mask())
    assert min(stds) > 0.9 and max(stds) < 1.1, stds


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm-solver", "deis"])
def test_resampling_noises_the_whole_sample_back_to_its_level(name):
    """After a resampling round the generated region too must sit at the level of t again."""
    model = KnowsTheAnswer(answer())
    known = known_image().repeat(4, 1, 1, 1)
    generators = image_generators(0, range(8))
    scheduler = make_scheduler(name, training_config(), steps=10)
    blend(Predictor(model), scheduler, KnownRegion(known, torch.ones(1, 1, *SHAPE[1:]), generators, resample=1),
          initial_noise(generators, SHAPE, "cpu"), steps=10)
    target = answer().expand_as(known)
    stds = [float(((x - ab.sqrt() * target) / (1 - ab).sqrt()).std()) for x, ab in model.calls[1:]]
    assert min(stds) > 0.85 and max(stds) < 1.15, stds


def test_each_sample_depends_only_on_seed_and_index():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, add_attention=False).eval()

    def fill(indices):
        generators = image_generators(5, indices)
        noise = initial_noise(generators, SHAPE, "cpu")
        known = known_image()[:1].expand(len(indices), -1, -1, -1)
        return repaint(Predictor(unet), DDPMScheduler.from_config(training_config()), known, centre_mask(), noise,
                       schedule=RepaintSchedule(6, 2, 2), generators=generators)

    batch = fill([0, 1, 2])
    torch.testing.assert_close(batch[2], fill([2])[0], atol=1e-5, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


# ---------------------------------------------------------------- the command


@pytest.fixture
def photo(tmp_path) -> tuple[Path, Path]:
    """A 12x10 RGB image (another size than the 8-px model) and a mask with a white block."""
    rng = np.random.default_rng(0)
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(image)
    block = np.zeros((10, 12), dtype=np.uint8)
    block[3:7, 4:9] = 255
    Image.fromarray(block).save(mask)
    return image, mask


def invoke(*args):
    return run_cli("inpaint", *args)


def far_from_mask(mask_path: Path, margin: int = 3) -> np.ndarray:
    """Pixels at least `margin` away from the white region: the paste-back leaves them untouched."""
    white = np.array(Image.open(mask_path)) > 127
    near = np.zeros_like(white)
    for y, x in zip(*np.nonzero(white), strict=True):
        near[max(0, y - margin) : y + margin + 1, max(0, x - margin) : x + margin + 1] = True
    return ~near


@pytest.mark.parametrize("method_args", [["--method", "blend", "--scheduler", "dpm-solver", "--steps", "4"],
                                         ["--steps", "4", "--jump-length", "2", "--jump-n-sample", "2"]])
def test_fills_the_mask_and_keeps_the_rest(tiny_run, photo, tmp_path, method_args):
    image, mask = photo
    out = tmp_path / "filled.png"
    result = invoke(image, mask, "--model", tiny_run, "-o", out, "--comparison", "-q", *method_args)
    assert result.exit_code == 0, result.output
    filled, original = np.array(Image.open(out)), np.array(Image.open(image))
    assert filled.shape == original.shape
    keep = far_from_mask(mask)
    assert np.array_equal(filled[keep], original[keep]), "the known region is the input"
    assert not np.array_equal(filled[~keep], original[~keep]), "the masked region was generated"
    assert Image.open(out).text["method"] == ("blend" if "blend" in method_args else "repaint")
    assert Image.open(tmp_path / "filled-comparison.png").size[0] > 3 * Image.open(tmp_path / "filled-comparison.png").size[1] - 10


def test_several_samples_and_folders(tiny_run, photo, tmp_path):
    image, mask = photo
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for name in ("a", "b"):
        Image.open(image).save(images / f"{name}.png")
        Image.open(mask).save(masks / f"{name}.png")
    result = invoke(images, masks, "--model", tiny_run, "-o", tmp_path / "out", "-n", "2", "--method", "blend",
                    "--steps", "3", "-q")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["a-0.png", "a-1.png", "b-0.png", "b-1.png"]
    a0, a1, b0 = (np.array(Image.open(tmp_path / "out" / n)) for n in ("a-0.png", "a-1.png", "b-0.png"))
    assert not np.array_equal(a0, a1), "samples 0 and 1 come from different seeds"
    assert np.array_equal(a0, b0), "the same image, mask and (seed, index) give the same filling"


def test_class_conditional_models_fill_in_without_a_class_unless_asked(tiny_run, photo, tmp_path):
    image, mask = photo
    common = ["--model", tiny_run, "--method", "blend", "--steps", "3", "-q"]
    assert invoke(image, mask, *common, "-o", tmp_path / "free.png").exit_code == 0
    assert invoke(image, mask, *common, "-o", tmp_path / "ring.png", "--class", "ring", "--guidance-scale", "2").exit_code == 0
    free, ring = Image.open(tmp_path / "free.png"), Image.open(tmp_path / "ring.png")
    assert (free.text["class"], free.text["class_id"], free.text["guidance_scale"]) == ("none", "5", "1.0")
    assert (ring.text["class"], ring.text["guidance_scale"]) == ("ring", "2.0")
    assert not np.array_equal(np.array(free), np.array(ring))


def test_existing_outputs_are_kept_unless_overwrite(tiny_run, photo, tmp_path):
    image, mask = photo
    out = tmp_path / "filled.png"
    out.write_bytes(b"precious")
    assert_user_error(invoke(image, mask, "--model", tiny_run, "-o", out, "--method", "blend", "--steps", "2"),
                      "already exist", "--overwrite")
    assert out.read_bytes() == b"precious"
    result = invoke(image, mask, "--model", tiny_run, "-o", out, "--method", "blend", "--steps", "2", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (12, 10)


def test_all_black_mask_copies_and_all_white_mask_samples(tiny_run, photo, tmp_path):
    image, _ = photo
    black, white = tmp_path / "black.png", tmp_path / "white.png"
    Image.new("L", (12, 10), 0).save(black)
    Image.new("L", (12, 10), 255).save(white)
    result = invoke(image, black, "--model", tiny_run, "-o", tmp_path / "same.png", "--method", "blend", "--steps", "2", "-q")
    assert result.exit_code == 0 and "nothing to generate" in result.stderr
    assert np.array_equal(np.array(Image.open(tmp_path / "same.png")), np.array(Image.open(image)))
    result = invoke(image, white, "--model", tiny_run, "-o", tmp_path / "new.png", "--method", "blend", "--steps", "2", "-q")
    assert result.exit_code == 0 and "plain sampling" in result.stderr


@pytest.mark.parametrize(("args", "fragments"), [
    (["--method", "paint"], ["unknown --method 'paint'", "repaint or blend"]),
    (["--scheduler", "ddim"], ["--scheduler and --resample apply to --method blend"]),
    (["--method", "blend", "--scheduler", "lms", "--resample", "2"], ["--resample does not work with lms", "ddim"]),
    (["--method", "blend", "--scheduler", "ddmi"], ["did you mean 'ddim'"]),
    (["--steps", "0"], ["between 1 and 50"]),
    (["--num-samples", "0"], ["--num-samples must be at least 1"]),
    (["--grow", "-1"], ["--grow"]),
    (["--class", "hexagon"], ["unknown class 'hexagon'"]),
    (["--guidance-scale", "3"], ["--guidance-scale needs --class"]),
])
def test_bad_options(tiny_run, photo, tmp_path, args, fragments):
    image, mask = photo
    assert_user_error(invoke(image, mask, "--model", tiny_run, "-o", tmp_path / "x.png", *args), *fragments)
    assert not (tmp_path / "x.png").exists()


def test_bad_files(tiny_run, photo, tmp_path):
    image, mask = photo
    assert_user_error(invoke(tmp_path / "nope.png", mask, "--model", tiny_run), "nope.png does not exist")
    assert_user_error(invoke(image, tmp_path, "--model", tiny_run), "give one mask file")
    assert_user_error(invoke(tmp_path, mask, "--model", tiny_run), "masks must be a folder")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert_user_error(invoke(image, broken, "--model", tiny_run, "-o", tmp_path / "y.png"), "broken.png")
