"""difftool evaluate: features, image sets, reference statistics, scoring, sweeps and the CLI.

Every test runs offline with the stand-in extractors of conftest.py (a TorchScript file with the
Inception file's calling convention, and a plain one returning (features, probs)).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from difftool.evaluation import features as features_mod
from difftool.evaluation import reference as reference_mod
from difftool.cli.app import app
from difftool.errors import UserError
from difftool.output_rules import Existing
from difftool.evaluation.evaluate import (
    MetricOptions,
    build_stats,
    default_output,
    evaluate,
    score,
)
from difftool.evaluation.features import (
    Dinov2Extractor,
    InceptionExtractor,
    TorchScriptExtractor,
    load_extractor,
)
from difftool.sampling.job import SampleRequest
from difftool.evaluation.imagesets import from_tensor, is_image_source, open_images
from difftool.evaluation.metrics import frechet_distance, gaussian_stats
from difftool.evaluation.sweep import (
    PLOT_FILE,
    RESULTS_CSV,
    RESULTS_JSON,
    parse_sweep,
    plot_fd_vs_nfe,
    sweep,
)
from tests.conftest import assert_user_error

runner = CliRunner()


def write_images(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


def shapes(n: int, resolution: int = 8, seed_offset: int = 0) -> torch.Tensor:
    from difftool.data import make_shapes

    return make_shapes(n + seed_offset, resolution).images[seed_offset:]


# ---------------------------------------------------------------- feature extractors


def test_inception_file_gives_features_and_probabilities(fake_inception):
    extractor = load_extractor("inception", inception_weights=fake_inception, device="cpu")
    assert isinstance(extractor, InceptionExtractor)
    assert extractor.name.startswith("inception-2015-12-05:") and extractor.distance_name == "FID"
    images = shapes(6)
    feats, probs = extractor(images)
    module = torch.jit.load(str(fake_inception))
    # features from return_features=True, probabilities from the bias-free softmax
    torch.testing.assert_close(feats, module(images, return_features=True))
    torch.testing.assert_close(probs, module(images, no_output_bias=True))
    assert not torch.allclose(probs, module(images))


@pytest.mark.parametrize("spec", ["inception", "file"])
def test_the_network_is_moved_to_the_extractor_device(spec, extractor_file, fake_inception):
    """TorchScript loads onto the CPU; on a GPU the images go to CUDA, so the network must follow them
    (the meta device stands in for CUDA here; tests/test_gpu.py runs the real pass)."""
    extractor = (load_extractor("inception", inception_weights=fake_inception, device="meta", probe_resolution=None)
                 if spec == "inception" else load_extractor(str(extractor_file), device="meta", probe_resolution=None))
    assert {b.device.type for b in extractor.module.buffers()} == {"meta"}


def test_grayscale_images_are_seen_as_gray_rgb(extractor_file):
    extractor = load_extractor(str(extractor_file), device="cpu")
    gray = shapes(4)[:, :1]
    torch.testing.assert_close(extractor(gray)[0], extractor(gray.expand(-1, 3, -1, -1))[0])


def test_torchscript_extractor_name_follows_the_file_content(extractor_file, tmp_path):
    first = load_extractor(str(extractor_file), device="cpu")
    assert isinstance(first, TorchScriptExtractor) and first.distance_name == "FD"
    copy = tmp_path / "other" / extractor_file.name
    copy.parent.mkdir()
    shutil.copy(extractor_file, copy)
    assert load_extractor(str(copy), device="cpu").name == first.name

    class Wider(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().mean(dim=(2, 3)) * 2

    torch.jit.save(torch.jit.script(Wider()), str(copy))
    assert load_extractor(str(copy), device="cpu").name != first.name


def test_extractor_with_wrong_output_is_refused(tmp_path):
    class Flat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().flatten()

    path = tmp_path / "flat.pt"
    torch.jit.save(torch.jit.script(Flat()), str(path))
    with pytest.raises(UserError, match="returned features of shape .384,. for 2 images .an N×D tensor is needed"):
        load_extractor(str(path), device="cpu", probe_resolution=None)(shapes(2))
    with pytest.raises(UserError, match="shape .6144,. for 2 images"):
        load_extractor(str(path), device="cpu")  # the check pass, at 32 px


def test_not_a_torchscript_file_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="not a TorchScript file"):
        load_extractor(str(path))
    with pytest.raises(UserError, match="unknown --features 'incepton'"):
        load_extractor("incepton")


def test_missing_inception_weights_say_which_file_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, progress=True):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        load_extractor("inception")
    message = str(err.value)
    assert features_mod.INCEPTION_URL in message
    assert str(tmp_path / "hub" / "checkpoints" / "inception-2015-12-05.pt") in message
    assert "--inception-weights" in message and "\n" not in message


def test_inception_weights_found_in_the_hub_cache(hub_inception, fake_inception):
    assert load_extractor("inception", device="cpu").name == load_extractor(
        "inception", inception_weights=fake_inception, device="cpu").name


def test_dinov2_features_are_the_normalised_cls_token(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          patch_size=14, image_size=224)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    extractor = load_extractor(f"dinov2:{tmp_path / 'dino'}", device="cpu")
    assert isinstance(extractor, Dinov2Extractor) and extractor.distance_name == "FD_DINOv2"
    images = shapes(3)
    feats, probs = extractor(images)
    assert feats.shape == (3, 16) and probs is None
    model = Dinov2Model.from_pretrained(tmp_path / "dino").eval()
    x = torch.nn.functional.interpolate(images.float() / 255, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    mean, std = torch.tensor(features_mod.IMAGENET_MEAN), torch.tensor(features_mod.IMAGENET_STD)
    with torch.no_grad():
        expected = model(pixel_values=(x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).pooler_output
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- image sets


def test_folder_of_mixed_sizes_is_resized_to_the_common_size_with_a_note(tmp_path):
    folder = write_images(tmp_path / "imgs", shapes(5, resolution=8))
    Image.new("RGB", (12, 10), (255, 0, 0)).save(folder / "odd.png")
    (folder / "broken.png").write_bytes(b"not a png")
    images = open_images(folder)
    assert images.count == 6 and images.size == (8, 8)
    batches = list(images.batches(4))
    assert [len(b) for b in batches] == [4, 2] and all(b.shape[1:] == (3, 8, 8) for b in batches)
    assert any("1 of 6 images" in note and "resized" in note for note in images.notes)
    assert any("skipped 1 of 7 images" in note and "broken.png" in note for note in images.notes)
    # files in name order: 0000..0004 then odd.png, which became solid red
    assert torch.equal(batches[1][1], torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8))
    torch.testing.assert_close(torch.cat(batches)[:5], shapes(5, resolution=8))


def test_folder_images_are_turned_upright_per_exif_as_training_reads_them(tmp_path):
    """A camera photo stored sideways (EXIF orientation 6: turn 90° clockwise to view)."""
    stored = np.zeros((4, 6, 3), np.uint8)
    stored[:, :3] = (255, 0, 0)  # left half red: after the turn it is the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(stored).save(tmp_path / "imgs" / name, exif=exif)
    images = open_images(tmp_path / "imgs")
    assert images.size == (6, 4)
    upright = next(images.batches(2))[0]
    assert upright[0, :3].eq(255).all() and upright[0, 3:].eq(0).all()


def test_npz_of_samples_reads_in_index_order(tmp_path):
    images = shapes(5)
    np.savez(tmp_path / "samples.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    opened = open_images(tmp_path / "samples.npz")
    assert torch.equal(torch.cat(list(opened.batches(2))), images)
    assert is_image_source(tmp_path / "samples.npz")


def test_bad_image_sets_are_refused(tmp_path):
    write_images(tmp_path / "one", shapes(1))
    with pytest.raises(UserError, match="holds 1 image; the metrics need at least 2"):
        open_images(tmp_path / "one")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="must be uint8 N×H×W×C"):
        open_images(tmp_path / "float.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="not a readable .npz"):
        open_images(tmp_path / "junk.npz")
    with pytest.raises(UserError, match="does not exist"):
        open_images(tmp_path / "nowhere")


def test_files_of_a_folder_that_are_not_scored_are_named(tmp_path):
    folder = write_images(tmp_path / "imgs", shapes(3))
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    (folder / "sub" / "clip.gif").write_bytes(b"GIF89a")
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are not looked at
    images = open_images(folder)
    assert images.count == 3
    assert [n for n in images.notes if "left out" in n] == [
        f"left out 2 files in {folder} (not .png/.jpg/.jpeg/.webp/.bmp/.tif/.tiff images): notes.txt, sub/clip.gif"]


@pytest.mark.parametrize("image_format", ["png", "npz"])
def test_a_folder_written_by_sample_is_the_samples_it_lists_not_its_grid(tiny_run, tmp_path, extractor_file,
                                                                         image_format):
    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", str(tiny_run), "-n", "5", "--steps", "2", "--format", image_format,
                                 "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    Image.open(out / "grid.png").save(out / "000009.png")  # an image the sampling did not make
    assert is_image_source(out)
    images = open_images(out)
    assert images.count == 5 and images.size == (8, 8)
    assert [n for n in images.notes if "left out" in n] == [
        f"left out 2 files in {out} (not among the samples its sample.json lists): 000009.png, grid.png"]
    result = runner.invoke(app, ["evaluate", str(out), "--features", str(extractor_file), "-o", str(tmp_path / "ev"),
                                 "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_images"] == 5
    # As the reference too: the same five samples, so the distance is zero up to float error.
    result = runner.invoke(app, ["evaluate", str(out), "--reference", str(out), "--features", str(extractor_file),
                                 "-o", str(tmp_path / "ev2"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["reference_images"] == 5 and abs(scores["fd"]) < 1e-3, scores


def test_an_unfinished_sample_folder_is_refused_with_the_remedy(tiny_run, tmp_path):
    out = tmp_path / "samples"
    assert runner.invoke(app, ["sample", str(tiny_run), "-n", "4", "--steps", "2", "-o", str(out), "-q"]).exit_code == 0
    (out / "000001.png").unlink()
    (out / "000003.png").unlink()
    with pytest.raises(UserError, match=f"{out} was written by difftool sample and its sample.json lists 4 samples, but "
                                        r"000001.png and 1 more are missing; finish it with difftool sample MODEL "
                                        f"--resume --output {out}"):
        open_images(out)
    (out / "sample.json").write_text("[]")
    with pytest.raises(UserError, match="sample.json is damaged .*remove sample.json to score the image files"):
        open_images(out)


def test_a_run_folder_is_not_an_image_source(tiny_run):
    assert not is_image_source(tiny_run) and not is_image_source(tiny_run / "model")
    assert is_image_source(tiny_run / "samples")  # training's preview grids are images


# ---------------------------------------------------------------- reference statistics


class CountingExtractor:
    """Wraps an extractor to count the images it saw."""

    def __init__(self, inner):
        self.inner, self.seen = inner, 0
        self.name, self.distance_name = inner.name, inner.distance_name

    def __call__(self, images):
        self.seen += len(images)
        return self.inner(images)


def test_reference_statistics_are_cached_and_rebuilt_when_the_data_changes(tmp_path, extractor_file):
    folder = write_images(tmp_path / "real", shapes(12))
    extractor = CountingExtractor(load_extractor(str(extractor_file), device="cpu"))
    first = reference_mod.resolve(str(folder), extractor, resolution=8, batch_size=5)
    assert extractor.seen == 12 and first.count == 12
    again = reference_mod.resolve(str(folder), extractor, resolution=8, batch_size=5)
    assert extractor.seen == 12  # from the cache
    np.testing.assert_allclose(again.stats.mu, first.stats.mu)
    np.testing.assert_allclose(again.features, first.features, rtol=1e-3)  # stored as float16
    write_images(folder, shapes(1, seed_offset=20))  # 0000.png replaced by another shape
    changed = reference_mod.resolve(str(folder), extractor, resolution=8, batch_size=5)
    assert extractor.seen == 24
    assert not np.allclose(changed.stats.mu, first.stats.mu)


def test_statistics_file_round_trip_and_refusals(tmp_path, extractor_file, fake_inception):
    extractor = load_extractor(str(extractor_file), device="cpu")
    options = MetricOptions(features=str(extractor_file), batch_size=7)
    built = build_stats("shapes", tmp_path / "ref.npz", resolution=8, options=options)
    loaded = reference_mod.load(tmp_path / "ref.npz")
    assert loaded.extractor == extractor.name and loaded.resolution == 8 and loaded.count == 10_000
    np.testing.assert_array_equal(loaded.stats.sigma, built.stats.sigma)
    assert loaded.features.shape == (10_000, 16)
    with pytest.raises(UserError, match="already exists"):
        build_stats("shapes", tmp_path / "ref.npz", resolution=8, options=options)
    with pytest.raises(UserError, match="made from 8-px images, these are 16 px"):
        reference_mod.check_compatible(loaded, extractor, 16, "ref.npz")
    inception = load_extractor("inception", inception_weights=fake_inception, device="cpu")
    with pytest.raises(UserError, match=f"made with the feature extractor {extractor.name}"):
        reference_mod.check_compatible(loaded, inception, 8, "ref.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable"):
        reference_mod.resolve(str(tmp_path / "bad.npz"), extractor, resolution=8, batch_size=4)


def test_more_reference_features_than_stored_are_subsampled(monkeypatch, extractor_file):
    monkeypatch.setattr(reference_mod, "MAX_STORED_FEATURES", 10)
    extractor = load_extractor(str(extractor_file), device="cpu")
    ref = reference_mod.from_images(from_tensor(shapes(30), "thirty"), extractor, batch_size=8)
    all_features = extractor(shapes(30))[0].numpy()
    assert ref.count == 30 and len(ref.features) == 10
    np.testing.assert_allclose(ref.stats.mu, all_features.mean(0), rtol=1e-5, atol=1e-6)  # moments use all 30
    assert all(any(np.allclose(row, other) for other in all_features) for row in ref.features)


def test_cifar10_reference_loads_the_hub_data_set_at_the_samples_resolution(monkeypatch, extractor_file):
    """The real loading path of `--reference cifar10`, fed a local data set shaped like uoft-cs/cifar10."""
    import datasets

    pictures = shapes(6, resolution=32)
    local = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pictures], "label": [0, 1, 2, 3, 4, 5]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=6)}))
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: asked.append((name, split)) or local)
    extractor = load_extractor(str(extractor_file), device="cpu")
    ref = reference_mod.resolve("cifar10", extractor, resolution=8, batch_size=4)
    assert asked == [("uoft-cs/cifar10", "train")] and ref.count == 6 and ref.resolution == 8
    expected = extractor(torch.nn.functional.interpolate(pictures.float(), size=8, mode="area").round().byte())[0]
    # decoded with Lanczos, not area averaging: close, not equal
    np.testing.assert_allclose(ref.stats.mu, expected.numpy().mean(0), rtol=0.05, atol=0.1)


def test_unknown_reference_name_is_a_clear_error(monkeypatch, extractor_file):
    import datasets

    def no_such_dataset(*args, **kwargs):
        raise FileNotFoundError("Dataset 'cifar11' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_such_dataset)
    extractor = load_extractor(str(extractor_file), device="cpu")
    with pytest.raises(UserError, match="--reference cifar11: could not load data set 'cifar11'.*a reference is"):
        reference_mod.resolve("cifar11", extractor, resolution=8, batch_size=4)


# ---------------------------------------------------------------- scoring


def test_a_set_scored_against_itself(extractor_file):
    images = from_tensor(shapes(64), "shapes")
    extractor = load_extractor(str(extractor_file), device="cpu")
    ref = reference_mod.from_images(images, extractor, batch_size=16)
    record = score(images, ref, extractor, MetricOptions(kid_subset_size=32))
    assert abs(record["fd"]) < 1e-3  # float16 is only used for the stored features, not mu and sigma
    assert record["precision"] == 1.0 and record["recall"] == 1.0
    assert abs(record["kid_mean"]) < 3 * record["kid_std"] + 1e-6
    assert record["num_images"] == 64 and "is_mean" in record
    assert any("N = 64 images" in w for w in record["warnings"])


def test_score_matches_the_metric_functions(extractor_file):
    extractor = load_extractor(str(extractor_file), device="cpu")
    real, fake = from_tensor(shapes(64), "real"), from_tensor(shapes(40, seed_offset=100).flip(-1).roll(1, 1), "fake")
    ref = reference_mod.from_images(real, extractor, batch_size=64)
    record = score(fake, ref, extractor, MetricOptions())
    fake_features = extractor(torch.cat(list(fake.batches(64))))[0].numpy()
    expected = frechet_distance(gaussian_stats(fake_features), gaussian_stats(extractor(shapes(64))[0].numpy()))
    assert record["fd"] == pytest.approx(expected, rel=1e-6)
    assert record["fd"] > 0.1


# ---------------------------------------------------------------- evaluate / sweep on a model


def test_evaluate_a_model_samples_scores_and_resumes(tiny_run, tmp_path, extractor_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = MetricOptions(features=str(extractor_file), kid_subset_size=8)
    request = SampleRequest(num_images=12, steps=3, batch_size=5)
    result = evaluate(str(tiny_run), reference="shapes", options=options, request=request)
    assert result.output == Path("evaluations/run")
    record = json.loads((result.output / "metrics.json").read_text())
    assert record["num_images"] == 12 and record["sampling"]["steps"] == 3 and record["resolution"] == 8
    assert record["sampling"]["model_calls"] == 3 and record["reference_images"] == 10_000
    assert {"fd", "kid_mean", "kid_std", "precision", "recall", "is_mean", "is_std"} <= set(record)
    with np.load(result.output / "samples" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (12, 8, 8, 3)
    with pytest.raises(UserError, match="already holds an evaluation"):
        evaluate(str(tiny_run), reference="shapes", options=options, request=request)
    again = evaluate(str(tiny_run), reference="shapes", options=options, request=request, existing=Existing(resume=True))
    assert again.record["fd"] == pytest.approx(record["fd"], rel=1e-9)  # same samples, same score


def test_statistics_of_another_resolution_stop_before_sampling(tiny_run, tmp_path, extractor_file, monkeypatch):
    options = MetricOptions(features=str(extractor_file))
    build_stats("shapes", tmp_path / "ref16.npz", resolution=16, options=options)
    with pytest.raises(UserError, match="made from 16-px images, these are 8 px"):
        evaluate(str(tiny_run), reference=str(tmp_path / "ref16.npz"), options=options,
                 request=SampleRequest(num_images=4, steps=2), output=tmp_path / "ev")
    assert not (tmp_path / "ev" / "samples").exists()


def test_sweep_writes_table_csv_json_and_plot(tiny_run, tmp_path, extractor_file):
    options = MetricOptions(features=str(extractor_file), kid_subset_size=8)
    rows = sweep(str(tiny_run), "ddim:2,4;dpm-solver:3;heun:2", reference="shapes", options=options,
                 request=SampleRequest(num_images=10, batch_size=10), output=tmp_path / "sw")
    assert [(r["scheduler"], r["steps"], r["nfe"]) for r in rows] == [
        ("ddim", 2, 2), ("ddim", 4, 4), ("dpm-solver", 3, 3), ("heun", 2, 3)]
    with (tmp_path / "sw" / RESULTS_CSV).open() as f:
        table = list(csv.DictReader(f))
    assert [float(r["fd"]) for r in table] == pytest.approx([r["fd"] for r in rows])
    assert all(float(r["img_per_s"]) > 0 and int(r["num_images"]) == 10 for r in table)
    saved = json.loads((tmp_path / "sw" / RESULTS_JSON).read_text())
    assert saved["distance"] == "FD" and len(saved["rows"]) == 4
    with Image.open(tmp_path / "sw" / PLOT_FILE) as plot:
        assert plot.format == "PNG" and plot.width > 300
    # each setting saw the same seeds: image 0 of ddim-2 and ddim-4 start from the same noise
    for name in ("ddim-2", "ddim-4", "dpm-solver-3", "heun-2"):
        assert (tmp_path / "sw" / "samples" / name / "samples.npz").is_file()


def test_plot_has_one_line_per_scheduler(tmp_path, monkeypatch):
    import matplotlib.axes

    lines = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: lines.append((a, k["label"])) or original(self, *a, **k))
    rows = [{"scheduler": s, "steps": n, "nfe": n, "fd": f} for s, n, f in
            [("ddim", 10, 30.0), ("ddim", 20, 20.0), ("unipc", 10, 25.0)]]
    plot_fd_vs_nfe(rows, tmp_path / "p.png")
    assert [label for _, label in lines] == ["ddim", "unipc"]
    assert lines[0][0] == ((10, 20), (30.0, 20.0))


@pytest.mark.parametrize("spec, message", [
    ("ddim", "needs the form SCHEDULER:STEPS"),
    ("ddim:10,x", "'x' for ddim is not a positive whole number"),
    ("ddmi:10", "unknown scheduler 'ddmi'; did you mean 'ddim'"),
    (" ; ", "--sweep is empty"),
])
def test_bad_sweep_specs(spec, message):
    with pytest.raises(UserError, match=message):
        parse_sweep(spec)


def test_sweep_spec_parses_aliases_and_drops_repeats():
    assert parse_sweep("dpmpp-2m:10,20; ddim:5 ;dpm-solver:10") == [("dpm-solver", 10), ("dpm-solver", 20),
                                                                      ("ddim", 5)]


def test_default_output_names():
    assert default_output("runs/cifar") == Path("evaluations/cifar")
    assert default_output("runs/cifar/model") == Path("evaluations/cifar")
    assert default_output("runs/cifar/checkpoints/step-000500") == Path("evaluations/cifar-step-000500")
    assert default_output("out/samples/ddim-50/samples.npz") == Path("evaluations/ddim-50")
    assert default_output("model.safetensors") == Path("evaluations/model")


# ---------------------------------------------------------------- the CLI


def test_cli_evaluate_folder_against_itself(tmp_path, extractor_file):
    folder = write_images(tmp_path / "imgs", shapes(20))
    out = tmp_path / "ev"
    result = runner.invoke(app, ["evaluate", str(folder), "--reference", str(folder), "--features", str(extractor_file),
                                 "--kid-subset-size", "10", "--output", str(out), "--json", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert abs(record["fd"]) < 1e-3 and record["precision"] == 1.0 and record["num_images"] == 20
    assert "N = 20 images" in result.stderr
    assert json.loads((out / "metrics.json").read_text())["fd"] == record["fd"]


def test_cli_stats_then_evaluate_with_the_file(tmp_path, extractor_file):
    stats = tmp_path / "real.npz"
    result = runner.invoke(app, ["stats", "shapes", "--output", str(stats), "--resolution", "8",
                                 "--features", str(extractor_file), "-q"])
    assert result.exit_code == 0, result.output
    assert "statistics of 10000 images" in result.stderr
    folder = write_images(tmp_path / "imgs", shapes(10))
    result = runner.invoke(app, ["evaluate", str(folder), "-r", str(stats), "--features", str(extractor_file),
                                 "-o", str(tmp_path / "ev"), "-q"])
    assert result.exit_code == 0, result.output
    assert "FD" in result.stdout and "precision / recall" in result.stdout


def test_the_0_1_0_spelling_evaluate_stats_still_works_and_a_folder_called_stats_is_evaluated(
        tmp_path, extractor_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate", "stats", "shapes", "--output", "real.npz", "--resolution", "8",
                                 "--features", str(extractor_file), "-q"])
    assert result.exit_code == 0, result.output
    assert "`difftool stats` now" in result.stderr and Path("real.npz").is_file()
    write_images(tmp_path / "stats", shapes(10))  # no ./ needed any more
    result = runner.invoke(app, ["evaluate", "stats", "-r", "real.npz", "--features", str(extractor_file), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(Path("evaluations/stats/metrics.json").read_text())["num_images"] == 10


@pytest.mark.parametrize("args, fragments", [
    (["evaluate", "{one}", "--features", "{ext}"], ["holds 1 image"]),
    (["evaluate", "{imgs}", "--features", "bogus"], ["unknown --features 'bogus'"]),
    (["evaluate", "{imgs}", "-r", "{stats16}", "--features", "{ext}"], ["made from 16-px images, these are 8 px"]),
    (["evaluate", "{imgs}", "-r", "{stats16}", "--features", "inception", "--inception-weights", "{incep}"],
     ["made with the feature extractor torchscript"]),
    (["evaluate", "{imgs}", "--scheduler", "ddim", "--features", "{ext}"], ["holds images, not a model"]),
    (["stats", "shapes"], ["Missing option '--output'"]),
    (["stats", "--output", "x.npz"], ["Missing argument 'DATA'"]),
    (["evaluate", "{imgs}", "extra"], ["unexpected extra argument (extra)"]),
    (["evaluate", "{imgs}", "--sweep", "ddim:2", "--features", "{ext}"], ["--sweep samples a model"]),
    (["evaluate", "{imgs}", "--features", "{ext}", "--inception-weights", "{incep}"], ["--inception-weights applies"]),
    (["evaluate", "{imgs}", "--num-samples", "0"], ["'--num-samples'", "1<=x"]),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, extractor_file, fake_inception, args, fragments):
    paths = {"one": write_images(tmp_path / "one", shapes(1)), "imgs": write_images(tmp_path / "imgs", shapes(6)),
             "ext": extractor_file, "incep": fake_inception, "stats16": tmp_path / "s16.npz"}
    build_stats("shapes", paths["stats16"], resolution=16, options=MetricOptions(features=str(extractor_file)))
    argv = [a.format(**paths) for a in args] + ([] if "stats" in args else ["-o", str(tmp_path / "out")])
    assert_user_error(runner.invoke(app, argv), *fragments)


def test_cli_sweep_table(tiny_run, tmp_path, extractor_file):
    result = runner.invoke(app, ["evaluate", str(tiny_run), "-r", "shapes", "--sweep", "ddim:2;euler:2", "-n", "6",
                                 "--features", str(extractor_file), "--kid-subset-size", "4", "-o",
                                 str(tmp_path / "sw"), "-q"])
    assert result.exit_code == 0, result.output
    for word in ("scheduler", "NFE", "FD", "img/s", "ddim", "euler", "N = 6 samples per setting"):
        assert word in result.stdout
    assert "N = 6 samples per setting: FID is biased" in result.stderr.replace("\n", " ")


@pytest.mark.slow
def test_evaluate_under_two_processes_scores_once(tiny_run, tmp_path, extractor_file):
    import subprocess

    from tests.conftest import difftool_cmd, free_port

    out = tmp_path / "ev"
    cmd = difftool_cmd() + ["evaluate", str(tiny_run), "-r", "shapes", "-n", "10", "--steps", "2", "--batch-size", "3",
                            "--features", str(extractor_file), "--kid-subset-size", "5", "-o", str(out),
                            "--num-processes", "2", "--main-process-port", str(free_port()), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("precision / recall") == 1  # rank 0 alone reports
    single = evaluate(str(tiny_run), reference="shapes", output=tmp_path / "one",
                      options=MetricOptions(features=str(extractor_file), kid_subset_size=5),
                      request=SampleRequest(num_images=10, steps=2, batch_size=3))
    with np.load(out / "samples" / "samples.npz") as a, np.load(tmp_path / "one" / "samples" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    # the same images; features may differ in the last float32 bits with another thread count
    assert json.loads((out / "metrics.json").read_text())["fd"] == pytest.approx(single.record["fd"], rel=1e-6)


def test_cli_evaluate_compile_samples_as_eager_does(tiny_run, tmp_path, extractor_file):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    base = ["evaluate", str(tiny_run), "-r", "shapes", "-n", "4", "--batch-size", "2", "--steps", "2",
            "--features", str(extractor_file), "--kid-subset-size", "2", "-q"]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = runner.invoke(app, [*base, *extra, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert counters["stats"]["unique_graphs"] == 1, "the UNet was compiled once"
    eager, compiled = (np.load(tmp_path / name / "samples" / "samples.npz")["arr_0"].astype(int)
                       for name in ("eager", "compiled"))
    assert np.abs(eager - compiled).max() <= 1
