"""Image sets (evaluation/imagesets.py): folders, .npz files and sample folders read as the images to score.

Every test runs offline with the stand-in extractors of tests/conftest.py (a TorchScript file with the
Inception file's calling convention, and a plain one returning (features, probs)).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from difftool.cli.app import app
from difftool.errors import UserError
from difftool.evaluation.imagesets import is_image_source, open_images
from tests.evaluation.conftest import shapes, write_images

runner = CliRunner()


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
