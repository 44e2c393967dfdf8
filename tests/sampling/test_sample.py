"""`difftool sample` end to end on the tiny run: files, metadata, reproducibility, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from difftool.config import read_config
from difftool.errors import UserError
from difftool.models.load import load_model
from difftool.output_rules import Existing
from difftool.sampling.job import SampleRequest, generate
from tests.conftest import assert_user_error, difftool_cmd, free_port
from tests.conftest import invoke as run_cli

pytestmark = pytest.mark.usefixtures("scratch_cwd")


def invoke(*args):
    return run_cli("sample", *args)


def pixels(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.array(Image.open(folder / f"{i:06d}.png")) for i in range(n)])


def test_writes_images_grid_and_settings(tiny_run):
    result = invoke(tiny_run, "-n", "5", "--scheduler", "ddim", "--steps", "3", "-o", "out", "-q")
    assert result.exit_code == 0, result.output
    out = Path("out")
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(5)]
    assert (out / "grid.png").is_file()
    image = Image.open(out / "000003.png")
    assert image.size == (8, 8) and image.mode == "RGB"
    meta = image.text
    assert meta["scheduler"] == "ddim" and meta["steps"] == "3" and meta["seed"] == "0" and meta["index"] == "3"
    assert meta["model_hash"] == load_model(tiny_run).model_hash
    assert meta["class"] == "ring" and meta["class_id"] == "3", "classes are cycled: image i gets class i % 5"
    assert meta["timestep_spacing"] == "trailing"
    settings = json.loads((out / "sample.json").read_text())
    assert settings["num_images"] == 5 and settings["format"] == "png" and settings["weights"] == "ema"


def test_a_long_output_path_stays_whole_on_one_line(tiny_run):
    """In a log (80 columns) rich broke messages at the width, inside a path too: it could not be copied."""
    out = Path("a-folder-with-a-name-long-enough-that-the-message-goes-past-eighty-columns") / "samples"
    result = invoke(tiny_run, "-n", "1", "--steps", "2", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    done = [line for line in result.stderr.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and done[0].endswith(f"in {out}; grid: {out / 'grid.png'}"), result.stderr


def test_defaults_come_from_the_training_recipe(tiny_run):
    result = invoke(tiny_run, "-n", "2", "-q")
    assert result.exit_code == 0, result.output
    out = Path("samples") / f"{tiny_run.name}-ddim-3"
    meta = Image.open(out / "000000.png").text
    guidance = read_config(tiny_run / "config.yaml").sample.guidance_scale
    assert guidance != 1.0, "the check needs a guidance scale other than sample's own default"
    assert (meta["scheduler"], meta["steps"], meta["guidance_scale"]) == ("ddim", "3", str(guidance))


def test_image_depends_only_on_seed_and_index(tiny_run):
    common = ["-n", "5", "--scheduler", "euler-a", "--steps", "4", "-q"]
    assert invoke(tiny_run, *common, "--batch-size", "5", "-o", "a").exit_code == 0
    assert invoke(tiny_run, *common, "--batch-size", "2", "-o", "b").exit_code == 0
    assert invoke(tiny_run, *common, "--batch-size", "2", "--seed", "1", "-o", "c").exit_code == 0
    a, b, c = pixels(Path("a"), 5), pixels(Path("b"), 5), pixels(Path("c"), 5)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, "batch size must not change an image"
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5, "another seed gives other images"


def test_guidance_changes_images_and_class_selects_labels(tiny_run):
    assert invoke(tiny_run, "-n", "2", "--steps", "3", "--class", "square", "-o", "g1", "-q").exit_code == 0
    assert invoke(tiny_run, "-n", "2", "--steps", "3", "--class", "1", "--guidance-scale", "4", "-o", "g4", "-q").exit_code == 0
    one, four = Path("g1"), Path("g4")
    assert {Image.open(one / f"00000{i}.png").text["class"] for i in range(2)} == {"square"}
    assert Image.open(four / "000000.png").text["guidance_scale"] == "4.0"
    assert not np.array_equal(pixels(one, 2), pixels(four, 2))


def test_guidance_rescale_changes_guided_images_and_is_recorded(tiny_run):
    assert invoke(tiny_run, "-n", "2", "--steps", "3", "-o", "plain", "-q").exit_code == 0
    assert invoke(tiny_run, "-n", "2", "--steps", "3", "--guidance-rescale", "0.7", "-o", "rescaled", "-q").exit_code == 0
    assert Image.open("rescaled/000000.png").text["guidance_rescale"] == "0.7"
    assert json.loads(Path("rescaled/sample.json").read_text())["guidance_rescale"] == 0.7
    assert not np.array_equal(pixels(Path("plain"), 2), pixels(Path("rescaled"), 2))


def test_folders_sampled_before_guidance_rescale_existed_still_resume(tiny_run):
    assert invoke(tiny_run, "-n", "3", "--steps", "3", "-o", "old", "-q").exit_code == 0
    settings = json.loads(Path("old/sample.json").read_text())
    del settings["guidance_rescale"]
    Path("old/sample.json").write_text(json.dumps(settings))
    Path("old/000002.png").unlink()
    result = invoke(tiny_run, "-n", "3", "--steps", "3", "-o", "old", "--resume", "-q")
    assert result.exit_code == 0, result.output
    assert Path("old/000002.png").is_file()


def test_npz_holds_the_same_images_in_index_order(tiny_run):
    assert invoke(tiny_run, "-n", "5", "--steps", "3", "--batch-size", "2", "-o", "png", "-q").exit_code == 0
    assert invoke(tiny_run, "-n", "5", "--steps", "3", "--batch-size", "2", "--format", "npz", "-o", "npz", "-q").exit_code == 0
    with np.load("npz/samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(images, pixels(Path("png"), 5))
    np.testing.assert_array_equal(labels, np.arange(5) % 5)
    assert not Path("npz/.parts").exists()
    assert Path("npz/grid.png").is_file()


def test_resume_makes_only_missing_images(tiny_run):
    out = Path("out")
    assert invoke(tiny_run, "-n", "4", "--steps", "3", "--batch-size", "1", "-o", out, "-q").exit_code == 0
    before = pixels(out, 4)
    (out / "000001.png").unlink()
    stamp = (out / "000002.png").stat().st_mtime_ns
    result = invoke(tiny_run, "-n", "6", "--steps", "3", "--batch-size", "1", "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    assert "3 new of 6 images" in result.stderr
    assert (out / "000002.png").stat().st_mtime_ns == stamp, "existing images are not rewritten"
    np.testing.assert_array_equal(pixels(out, 4), before)
    assert (out / "000005.png").is_file()


def test_npz_resume_extends_the_array(tiny_run):
    assert invoke(tiny_run, "-n", "3", "--steps", "3", "--format", "npz", "-o", "out", "-q").exit_code == 0
    first = np.load("out/samples.npz")["arr_0"]
    result = invoke(tiny_run, "-n", "5", "--steps", "3", "--format", "npz", "-o", "out", "--resume", "-q")
    assert result.exit_code == 0, result.output
    both = np.load("out/samples.npz")["arr_0"]
    assert both.shape[0] == 5
    np.testing.assert_array_equal(both[:3], first)


def test_existing_samples_are_never_overwritten_silently(tiny_run):
    assert invoke(tiny_run, "-n", "2", "--steps", "3", "-o", "out", "-q").exit_code == 0
    assert_user_error(invoke(tiny_run, "-n", "2", "--steps", "3", "-o", "out"), "already holds samples", "--resume", "--overwrite")
    assert_user_error(invoke(tiny_run, "-n", "2", "--steps", "4", "-o", "out", "--resume"), "other settings", "steps 3 -> 4")
    result = invoke(tiny_run, "-n", "1", "--steps", "4", "-o", "out", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in Path("out").glob("0*.png")) == ["000000.png"], "--overwrite replaces the old set"


def test_unconditional_foreign_pipeline(unconditional_model):
    result = invoke(unconditional_model, "-n", "3", "--scheduler", "dpm-solver", "--steps", "5", "-o", "out", "-q")
    assert result.exit_code == 0, result.output
    image = Image.open("out/000000.png")
    assert image.mode == "L" and "class" not in image.text
    assert_user_error(invoke(unconditional_model, "--class", "1", "-o", "x"), "class-conditional")
    assert_user_error(invoke(unconditional_model, "--guidance-scale", "3", "-o", "x"), "class-conditional")


def test_bf16_model_gives_close_images(tiny_run):
    assert invoke(tiny_run, "-n", "3", "--steps", "3", "-o", "fp32", "-q").exit_code == 0
    assert invoke(tiny_run, "-n", "3", "--steps", "3", "--dtype", "bf16", "-o", "bf16", "-q").exit_code == 0
    diff = np.abs(pixels(Path("fp32"), 3).astype(int) - pixels(Path("bf16"), 3).astype(int))
    assert diff.mean() < 8, diff.mean()
    assert Image.open("bf16/000000.png").text["dtype"] == "bf16"


@pytest.mark.parametrize(("args", "fragments"), [
    (["--scheduler", "dpm-slover"], ["unknown scheduler 'dpm-slover'", "did you mean 'dpm-solver'"]),
    (["--steps", "0"], ["steps"]),
    (["--steps", "51", "--scheduler", "ddpm"], ["50"]),
    (["--class", "hexagon"], ["unknown class 'hexagon'", "circle"]),
    (["--class", "9"], ["out of range", "0..4"]),
    (["--guidance-scale", "-1"], ["at least 0"]),
    (["--guidance-rescale", "1.5"], ["--guidance-rescale must lie in [0, 1]"]),
    (["--guidance-rescale", "0.7", "--guidance-scale", "1"], ["--guidance-scale above 1"]),
    (["--dtype", "fp16"], ["GPU"]),
    (["--dtype", "fp64"], ["unknown --dtype"]),
    (["--format", "gif"], ["unknown --format"]),
    (["--num-images", "0"], ["at least 1"]),
    (["--weights", "best"], ["ema"]),
    (["--eta", "0.5", "--scheduler", "euler"], ["ddim"]),
    (["--eta", "1.5"], ["--eta must lie between 0", "got 1.5"]),
    (["--resume", "--overwrite"], ["exclude each other"]),
])
def test_bad_input_is_one_line_and_exit_2(tiny_run, args, fragments):
    assert_user_error(invoke(tiny_run, *args, "-o", "out"), *fragments)
    assert not list(Path(".").glob("out/0*.png")), "nothing is written"


def test_nan_samples_are_refused_not_saved_black(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = run / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"][0] = float("nan")  # a diverged model: the first channel turns NaN
    save_file(state, weights)
    assert_user_error(invoke(run, "-n", "3", "--steps", "2", "-o", "out", "-q"), "3 of 3 images came out NaN or infinite",
                      "none of this batch was written")
    assert not list(Path("out").glob("*.png"))


def test_not_a_model_says_what_was_expected(tmp_path, tiny_run):
    (tmp_path / "folder").mkdir()
    assert_user_error(invoke(tmp_path / "folder"), "not a model", "run folder")
    assert_user_error(invoke(tmp_path / "missing"), "does not exist")
    unet = tmp_path / "unet"
    shutil.copytree(tiny_run / "model" / "unet", unet)
    config = json.loads((unet / "config.json").read_text())
    (unet / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 32]}))
    assert_user_error(invoke(unet, "-o", "out"), "do not match its config")


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one(tiny_run, tmp_path):
    common = ["sample", str(tiny_run), "-n", "5", "--steps", "3", "--batch-size", "2", "--scheduler", "ddpm", "-q"]
    assert invoke(*common[1:], "-o", tmp_path / "one").exit_code == 0
    cmd = difftool_cmd() + common + ["-o", str(tmp_path / "two"), "--num-processes", "2",
                                     "--main-process-port", str(free_port()), "--trajectory", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(pixels(tmp_path / "two", 5), pixels(tmp_path / "one", 5))
    assert (tmp_path / "two" / "grid.png").is_file()
    # each process writes the trajectories of its own images
    assert sorted(p.name for p in (tmp_path / "two" / "trajectory").iterdir()) == [
        f"{i:06d}.{kind}" for i in range(5) for kind in ("png", "webp")]


@pytest.mark.slow
def test_ctrl_c_keeps_finished_images_and_resume_completes_them(tiny_run, tmp_path):
    out = tmp_path / "out"
    cmd = difftool_cmd() + ["sample", str(tiny_run), "-n", "100", "--batch-size", "2", "--steps", "10",
                            "--format", "npz", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((out / ".parts").glob("part-*.npz"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    kept = len(list((out / ".parts").glob("part-*.npz")))
    assert 2 <= kept < 50, "finished batches are kept, the request was not complete"
    # The resume runs in-process (a start-up less): the interruption above is the one that needs a real process.
    resumed = invoke(*cmd[len(difftool_cmd()) + 1:], "--resume", "-q")
    assert resumed.exit_code == 0, resumed.output
    assert f"{100 - 2 * kept} new of 100" in resumed.stderr
    reference = tmp_path / "ref"
    assert invoke(tiny_run, "-n", "100", "--batch-size", "2", "--steps", "10", "--format", "npz", "-o", reference, "-q").exit_code == 0
    np.testing.assert_array_equal(np.load(out / "samples.npz")["arr_0"], np.load(reference / "samples.npz")["arr_0"])


def test_runs_as_a_module_for_accelerate_launch():
    proc = subprocess.run([sys.executable, "-m", "difftool.sample", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--num-images" in proc.stdout


def test_library_call_reports_what_it_made(tiny_run, tmp_path):
    request = SampleRequest(num_images=3, scheduler="unipc", steps=4, batch_size=2)
    result = generate(tiny_run, request, tmp_path / "lib")
    assert (result.made, result.total, result.output) == (3, 3, tmp_path / "lib")
    again = generate(tiny_run, request, tmp_path / "lib", existing=Existing(resume=True))
    assert again.made == 0


def test_library_refuses_overwrite_with_resume_before_touching_samples(tiny_run, tmp_path):
    # The check lives in the library (Existing): a script calling generate() gets it too, not only the CLI.
    request = SampleRequest(num_images=2, scheduler="ddim", steps=2)
    generate(tiny_run, request, tmp_path / "lib")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "lib").iterdir()}
    with pytest.raises(UserError, match="exclude each other"):
        generate(tiny_run, request, tmp_path / "lib", existing=Existing(overwrite=True, resume=True))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "lib").iterdir()} == before


def test_a_loaded_model_is_sampled_as_its_source_would_be(tiny_run, tmp_path):
    # evaluate and sweeps load once and pass the model: the images and settings must be those of the source.
    request = SampleRequest(num_images=2, scheduler="ddim", steps=3)
    by_source = generate(tiny_run, request, tmp_path / "a")
    by_model = generate(tiny_run, request, tmp_path / "b", model=load_model(tiny_run))
    assert by_model.settings == by_source.settings
    for name in ("000000.png", "000001.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name)))


def test_compile_gives_the_eager_images_and_compiles_one_batch_size(tiny_run):
    """--compile: images within one level of eager; a last batch of another size runs eagerly, not recompiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    common = ["-n", "3", "--batch-size", "2", "--scheduler", "ddim", "--steps", "3", "-q"]
    assert invoke(tiny_run, *common, "-o", "eager").exit_code == 0
    result = invoke(tiny_run, *common, "--compile", "-o", "compiled")
    assert result.exit_code == 0, result.output
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    diff = np.abs(pixels(Path("eager"), 3).astype(int) - pixels(Path("compiled"), 3).astype(int))
    assert diff.max() <= 1, diff.max()


def test_compile_without_a_cpp_compiler_is_refused_before_any_work(tiny_run):
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        result = invoke(tiny_run, "-n", "2", "--compile", "-o", "out")
    assert_user_error(result, "--compile needs a working C++ compiler", "set CXX")
    assert not Path("out").exists()


def test_a_grid_of_two_classes_is_near_square_with_one_class_per_column():
    from difftool.sampling.job import grid_of

    tiles = torch.stack([torch.full((3, 8, 8), 255 * (i % 2), dtype=torch.uint8) for i in range(64)])
    grid = grid_of(tiles, 2)
    assert grid.shape[1:] == (8 * 66 + 2, 8 * 66 + 2)  # 8 x 8 tiles of 64 px (8 px enlarged), 2 px apart
    centres = grid[0, 2 + 32 :: 66, 2 + 32 :: 66]
    assert centres.shape == (8, 8) and (centres == torch.tensor([0, 255] * 4, dtype=torch.uint8)).all()
