"""benchmarks/quality_data.py's letters set: ten capitals in matplotlib's fonts, the same on every call."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from quality_data import LETTERS, letter_fonts, make_set  # noqa: E402


def test_letters_are_ten_balanced_classes_of_coloured_images_the_same_on_every_call():
    images, labels, classes = make_set("letters", resolution=16, num_images=40)
    assert images.shape == (40, 16, 16, 3) and images.dtype == np.uint8
    assert classes == ["A", "B", "E", "G", "K", "M", "Q", "R", "S", "W"] == list(LETTERS)
    assert labels.min() >= 0 and labels.max() <= 9
    assert np.bincount(labels, minlength=10).tolist() == [4] * 10
    again, again_labels, _ = make_set("letters", resolution=16, num_images=40)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    more, _, _ = make_set("letters", resolution=16, num_images=50)
    assert np.array_equal(more[:40], images)  # image i does not depend on the count

    luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert (luma.reshape(40, -1).std(axis=1) > 10).all()  # a letter stands out on every image
    assert (np.ptp(luma.reshape(40, -1), axis=1) > 40).all()
    a, b = images[labels == 0][0], images[labels == 1][0]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10
    assert len({image.tobytes() for image in images}) == 40


def test_letters_come_in_many_text_fonts_and_fit_other_resolutions():
    fonts = [path.name for path in letter_fonts()]
    assert fonts == sorted(fonts) and len(fonts) >= 10
    assert "DejaVuSans.ttf" in fonts
    assert not {"cmex10.ttf", "cmsy10.ttf", "STIXSizFiveSymReg.ttf"} & set(fonts)  # symbols, not letters
    for resolution in (32, 64):
        images, _, _ = make_set("letters", resolution=resolution, num_images=10)
        assert images.shape == (10, resolution, resolution, 3)
