"""`difftool img2img` (SDEdit) on the tiny run: strength as diffusers means it, the two ends against the image and
`difftool sample`, model calls, every kind of scheduler, folders, resume, refusals."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from difftool.data.decode import training_view
from difftool.models.load import load_model
from difftool.progress import SamplingProgress
from difftool.runlock import run_lock
from difftool.sampling.img2img import Img2ImgRequest, img2img_files, start_index, start_sample
from difftool.sampling.schedulers import make_scheduler
from tests.conftest import assert_user_error, difftool_cmd, free_port
from tests.conftest import invoke as run_cli

pytestmark = pytest.mark.usefixtures("scratch_cwd")

RESOLUTION = 8


def invoke(*args):
    return run_cli("img2img", *args)


def sample(*args):
    return run_cli("sample", *args)


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path)).astype(int)


def photo(path: Path, seed: int = 0) -> Path:
    """A 12×10 RGB image (another size than the 8-px model): smooth colour ramps with a little noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 12)[None, :, None] * np.linspace(0.2, 1, 10)[:, None, None]
    colours = ramp * rng.uniform(80, 255, size=(1, 1, 3)) + rng.normal(0, 8, size=(10, 12, 3))
    Image.fromarray(np.clip(colours, 0, 255).astype(np.uint8)).save(path)
    return path


def as_the_model_sees(path: Path) -> np.ndarray:
    return training_view(path, RESOLUTION, 3).permute(1, 2, 0).numpy().astype(int)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """One entry per UNet call (the batch size it saw)."""
    seen: list[int] = []
    forward = UNet2DModel.forward

    def counted(self, sample, *args, **kwargs):
        seen.append(len(sample))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", counted)
    return seen


# ---------------------------------------------------------------- the maths of the start


@pytest.mark.parametrize(("steps", "strength", "init"), [(10, 0.5, 5), (10, 0.3, 3), (10, 0.29, 2), (7, 1.0, 7),
                                                         (7, 0.99, 6), (3, 0.2, 0), (10, 0.0, 0)])
@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpm-solver", "pndm"])
def test_start_index_is_diffusers_get_timesteps(name, steps, strength, init):
    """diffusers' img2img: init = min(int(N S), N), t_start = N - init, timesteps from t_start × order; none left
    at init 0 (PLMS lists one timestep more than its steps: it still runs nothing)."""
    scheduler = make_scheduler(name, dict(DDPMScheduler(num_train_timesteps=50).config), steps=steps)
    scheduler.set_timesteps(steps)
    start = start_index(scheduler, steps, strength)
    assert start == (len(scheduler.timesteps) if init == 0 else (steps - init) * scheduler.order)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun"])
def test_the_start_is_the_image_noised_to_the_first_timestep_run(tiny_run, name):
    config = load_model(tiny_run).scheduler_config
    scheduler = make_scheduler(name, config, steps=6)
    scheduler.set_timesteps(6)
    x0, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    start = start_index(scheduler, 6, 0.5)
    x = start_sample(scheduler, x0, noise, start)
    t = int(scheduler.timesteps[start])
    alpha_bar = make_scheduler("ddpm", config, steps=6).alphas_cumprod[t]
    if name == "ddim":
        expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    else:  # sigma space, at the sigma of the begin index the scheduler was given
        assert scheduler.begin_index == start
        expected = x0 + scheduler.sigmas[start] * noise
        torch.testing.assert_close(scheduler.sigmas[start] ** 2, (1 - alpha_bar) / alpha_bar, rtol=1e-4, atol=0)
    torch.testing.assert_close(x, expected)
    assert torch.equal(start_sample(scheduler, x0, noise, 0), noise * scheduler.init_noise_sigma)
    assert torch.equal(start_sample(scheduler, x0, noise, len(scheduler.timesteps)), x0)


# ---------------------------------------------------------------- the two ends


def test_strength_0_gives_the_image_back_as_the_model_sees_it_without_a_model_call(tiny_run, calls):
    result = invoke(photo(Path("photo.png")), "--model", tiny_run, "--strength", "0", "-n", "2", "-q")
    assert result.exit_code == 0, result.output
    assert calls == []
    for k in range(2):
        np.testing.assert_array_equal(pixels(Path(f"photo-img2img-{k}.png")), as_the_model_sees(Path("photo.png")))


@pytest.mark.parametrize("args", [
    ["--class", "circle", "--class", "ring"],  # the recipe's sampler, steps and guidance, classes in turn
    ["--scheduler", "ddpm", "--steps", "4", "--class", "ring", "--guidance-scale", "2"],  # stochastic steps, guided
    ["--scheduler", "heun", "--steps", "3", "--class", "square"],  # second order
], ids=["recipe", "ddpm-guided", "heun"])
def test_strength_1_is_difftool_sample_bit_for_bit(tiny_run, args):
    assert sample(tiny_run, "-n", "3", "--seed", "5", "-o", "sampled", "-q", *args).exit_code == 0
    result = invoke(photo(Path("photo.png")), "--model", tiny_run, "--strength", "1", "-n", "3", "--seed", "5",
                    "-o", "out", *args)
    assert result.exit_code == 0, result.output
    assert "image is not used" in result.stderr
    for k in range(3):
        np.testing.assert_array_equal(pixels(Path(f"out/photo-{k}.png")), pixels(Path(f"sampled/{k:06d}.png")))
    ours, theirs = Image.open("out/photo-0.png").text, Image.open("sampled/000000.png").text
    for key in ("scheduler", "steps", "seed", "guidance_scale", "class", "model_hash"):
        assert ours[key] == theirs[key], key


def test_without_a_class_the_image_decides(tiny_run):
    """A class-conditional model redraws the image as its null class, unguided (as inpaint fills in), rather than
    pulling sample k towards class k; guidance then has nothing to guide towards and is refused."""
    assert invoke(photo(Path("photo.png")), "--model", tiny_run, "-n", "2", "--steps", "4", "-q").exit_code == 0
    for k in range(2):
        meta = Image.open(f"photo-img2img-{k}.png").text
        assert (meta["class"], meta["guidance_scale"]) == ("none", "1.0")
    assert_user_error(invoke(photo(Path("photo.png")), "--model", tiny_run, "--guidance-scale", "3", "-o", "g.png"),
                      "--guidance-scale needs --class")


def test_a_middle_strength_changes_the_image_but_stays_closer_to_it_than_sampling(tiny_run):
    common = ["--scheduler", "ddim", "--steps", "10", "-n", "4", "-q"]
    assert invoke(photo(Path("photo.png")), "--model", tiny_run, "--strength", "0.4", "-o", "out", *common).exit_code == 0
    assert sample(tiny_run, "-o", "sampled", *common).exit_code == 0
    source = as_the_model_sees(Path("photo.png"))
    edited = np.stack([pixels(Path(f"out/photo-{k}.png")) for k in range(4)])
    sampled = np.stack([pixels(Path(f"sampled/{k:06d}.png")) for k in range(4)])
    assert np.abs(edited - source).mean() > 1, "strength 0.4 must change the image"
    assert np.abs(edited - source).mean() < np.abs(sampled - source).mean()
    assert not np.array_equal(edited[0], edited[1]), "each sample has its own noise"


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpm-solver"])
def test_model_calls_are_the_timesteps_left_for_every_kind_of_scheduler(tiny_run, calls, name):
    scheduler = make_scheduler(name, load_model(tiny_run).scheduler_config, steps=6)
    scheduler.set_timesteps(6)
    left = len(scheduler.timesteps) - (6 - int(6 * 0.5)) * scheduler.order
    result = invoke(photo(Path("photo.png")), "--model", tiny_run, "--strength", "0.5", "--scheduler", name,
                    "--steps", "6", "-n", "2", "--guidance-scale", "1")
    assert result.exit_code == 0, result.output
    assert calls == [2] * left, "one call per timestep left, both samples in one batch (no guidance: no halves)"
    assert f"{left} model calls each" in result.stderr
    meta = Image.open("photo-img2img-0.png").text
    assert (meta["scheduler"], meta["steps"], meta["strength"]) == (name, "6", "0.5")
    assert float(meta["start_timestep"]) == pytest.approx(float(scheduler.timesteps[-left]))
    assert np.abs(pixels(Path("photo-img2img-0.png")) - as_the_model_sees(Path("photo.png"))).mean() > 0


def test_a_guided_step_counts_two_model_calls(tiny_run, calls):
    result = invoke(photo(Path("photo.png")), "--model", tiny_run, "--strength", "0.5", "--scheduler", "ddim",
                    "--steps", "6", "-n", "1", "--class", "square", "--guidance-scale", "3")
    assert result.exit_code == 0, result.output
    assert calls == [2] * 3, "three steps left, each one batch of the conditional and the null-class half"
    assert "6 model calls each" in result.stderr


def test_the_progress_bar_advances_per_model_step_to_the_number_of_samples(tiny_run, calls, monkeypatch):
    advanced: list[float] = []
    monkeypatch.setattr(SamplingProgress, "advance", lambda self, images: advanced.append(images))
    request = Img2ImgRequest(strength=0.5, scheduler="ddim", steps=6, num_samples=3, batch_size=2)
    result = img2img_files(tiny_run, photo(Path("photo.png")), Path("out"), request)
    assert len(advanced) == len(calls) == 2 * result.model_calls == 6
    assert sum(advanced) == pytest.approx(3)


def test_metadata_records_the_settings_strength_and_source(tiny_run):
    result = invoke(photo(Path("photo.png")), "--model", tiny_run, "--strength", "0.7", "--class", "square",
                    "--seed", "3", "-o", "edited.png", "-q")
    assert result.exit_code == 0, result.output
    image = Image.open("edited.png")
    assert image.size == (RESOLUTION, RESOLUTION) and image.mode == "RGB"
    meta = image.text
    assert meta["strength"] == "0.7" and meta["image"] == "photo.png" and meta["seed"] == "3"
    assert meta["class"] == "square" and meta["index"] == "0" and meta["model_hash"] == load_model(tiny_run).model_hash
    assert meta["scheduler"] and meta["steps"] and meta["guidance_scale"]


# ---------------------------------------------------------------- outputs


def test_outputs_are_named_like_inpaints(tiny_run):
    image = photo(Path("photo.png"))
    common = ["--model", tiny_run, "--steps", "2", "-q"]
    assert invoke(image, *common).exit_code == 0
    assert Path("photo-img2img.png").is_file()
    assert invoke(image, *common, "-o", "made/here.png").exit_code == 0
    assert Path("made/here.png").is_file()
    assert invoke(image, *common, "-o", "variants", "-n", "2").exit_code == 0
    assert sorted(p.name for p in Path("variants").iterdir()) == ["photo-0.png", "photo-1.png"]


def test_a_folder_with_samples_per_image_and_resume(tiny_run, calls):
    images = Path("photos")
    images.mkdir()
    photo(images / "a.png", 1)
    Image.open(photo(images / "b.png", 2)).save(images / "b.jpg")
    (images / "b.png").unlink()
    (images / "notes.txt").write_text("not an image")
    common = ["--model", tiny_run, "--strength", "0.5", "--steps", "4", "--scheduler", "ddim", "-n", "2", "-q"]
    result = invoke(images, *common)
    assert result.exit_code == 0, result.output
    out = Path("img2img")
    names = ["a-0.png", "a-1.png", "b-0.png", "b-1.png"]
    assert sorted(p.name for p in out.iterdir()) == names, "no lock file left behind"
    assert Image.open(out / "b-1.png").text["image"] == "b.jpg"
    assert Image.open(out / "b-1.png").text["index"] == "1"
    before = {name: pixels(out / name) for name in names}
    stamp = (out / "a-0.png").stat().st_mtime_ns

    (out / "b-0.png").unlink()
    calls.clear()
    result = run_cli("img2img", images, *common[:-1], "--resume")
    assert result.exit_code == 0, result.output
    assert "3 kept from before" in result.stderr and len(calls) == 2, "only b-0 is made again"
    assert (out / "a-0.png").stat().st_mtime_ns == stamp
    for name in names:
        np.testing.assert_array_equal(pixels(out / name), before[name])

    assert_user_error(invoke(images, *common), "already exist", "--overwrite", "--resume")
    assert_user_error(invoke(images, *common[:3], "0.6", *common[4:], "--resume"), "other settings",
                      "strength '0.5' -> '0.6'")
    assert invoke(images, *common, "--overwrite").exit_code == 0


def test_a_folder_job_holds_the_output_folder(tiny_run):
    images = Path("photos")
    images.mkdir()
    photo(images / "a.png")
    with run_lock(Path("img2img"), "img2img"):
        assert_user_error(invoke(images, "--model", tiny_run, "--steps", "2"), "in use by another difftool img2img")
    assert not Path("img2img").exists()


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("strength", "fragment"), [("-0.1", "--strength"), ("1.5", "--strength"),
                                                    ("nan", "--strength must lie in [0, 1]")])
def test_a_strength_outside_0_1_is_refused(tiny_run, strength, fragment):
    assert_user_error(invoke(photo(Path("photo.png")), "--model", tiny_run, "--strength", strength), fragment)
    assert not Path("photo-img2img.png").exists()


def test_existing_outputs_are_refused_and_replaced_only_with_overwrite(tiny_run):
    image = photo(Path("photo.png"))
    assert invoke(image, "--model", tiny_run, "--steps", "2", "-q").exit_code == 0
    stamp = Path("photo-img2img.png").stat().st_mtime_ns
    assert_user_error(invoke(image, "--model", tiny_run, "--steps", "2"), "photo-img2img.png already exist",
                      "--overwrite")
    assert Path("photo-img2img.png").stat().st_mtime_ns == stamp
    assert invoke(image, "--model", tiny_run, "--steps", "2", "--overwrite", "-q").exit_code == 0
    assert_user_error(invoke(image, "--model", tiny_run, "--overwrite", "--resume"), "exclude each other")


def test_the_input_is_never_an_output(tiny_run):
    image = photo(Path("photo.png"))
    original = image.read_bytes()
    assert_user_error(invoke(image, "--model", tiny_run, "-o", image, "--overwrite"), "is the image itself")
    Path("photos").mkdir()
    photo(Path("photos/a.png"))
    assert_user_error(invoke("photos", "--model", tiny_run, "-o", "photos", "--overwrite"), "the image folder")
    assert_user_error(invoke("photos", "--model", tiny_run, "-o", "photos/out"), "inside the image folder")
    assert image.read_bytes() == original and sorted(Path("photos").iterdir()) == [Path("photos/a.png")]


def test_an_unreadable_image_is_named_in_one_line(tiny_run, calls):
    Path("photos").mkdir()
    photo(Path("photos/a.png"))
    Path("photos/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    line = assert_user_error(invoke("photos", "--model", tiny_run, "--steps", "2"), "cannot read image",
                             "broken.png")
    assert "a.png" not in line and calls == [], "every image is read before any work"
    assert not Path("img2img").exists()


def test_a_fifo_is_refused_not_waited_on(tiny_run):
    os.mkfifo("pipe.png")
    assert_user_error(invoke("pipe.png", "--model", tiny_run), "pipe.png is not a regular file")


@pytest.mark.parametrize(("args", "fragments"), [
    (["missing.png"], ["missing.png does not exist"]),
    (["empty"], ["no images found in empty"]),
    (["photo.png", "-n", "0"], ["--num-samples must be at least 1"]),
    (["photo.png", "--batch-size", "0"], ["--batch-size must be at least 1"]),
    (["photo.png", "--scheduler", "dpm-slover"], ["did you mean 'dpm-solver'"]),
    (["photo.png", "--class", "hexagon"], ["unknown class 'hexagon'"]),
    (["photo.png", "--steps", "51"], ["--steps must be between 1 and 50"]),
    (["photo.png", "--eta", "0.5", "--scheduler", "euler"], ["--eta applies to"]),
    (["empty", "-o", "out.png"], ["--output is a folder"]),
])
def test_bad_input_is_one_line(tiny_run, args, fragments):
    photo(Path("photo.png"))
    Path("empty").mkdir()
    assert_user_error(invoke(*args, "--model", tiny_run), *fragments)


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one(tiny_run):
    """The batches of every image are dealt out whole, so two processes make each sample in the same batch as one
    does: the same files, bit for bit, and the main process's line counts them all."""
    images = Path("photos")
    images.mkdir()
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        photo(images / f"{name}.png", seed)
    common = ["img2img", str(images), "--model", str(tiny_run), "--strength", "0.5", "--steps", "4", "-n", "3",
              "--batch-size", "2", "-q"]
    assert run_cli(*common, "-o", "one").exit_code == 0
    cmd = difftool_cmd() + common + ["-o", "two", "--num-processes", "2", "--main-process-port", str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in Path("one").iterdir())
    assert len(names) == 9 and sorted(p.name for p in Path("two").iterdir()) == names
    for name in names:
        np.testing.assert_array_equal(pixels(Path("two") / name), pixels(Path("one") / name))
    assert proc.stderr.count("done:") == 1 and "(+8 more)" in proc.stderr
