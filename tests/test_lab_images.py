"""A lab's image files for ``cellseg predict``: formats, depths, colour, and the refusals (:mod:`cellseg.lab_images`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellseg.errors import DataError
from cellseg.lab_images import TRAINING_MEAN, TRAINING_STD, image_shape, read_image, to_model_input


@pytest.fixture(scope="module")
def grey(sartorius_dir: Path) -> np.ndarray:
    """A real public test image (8-bit grey, 704×520)."""
    return np.asarray(Image.open(sorted((sartorius_dir / "test").glob("*.png"))[0]))


def test_the_training_statistics_are_the_competition_images(sartorius_dir: Path) -> None:
    """Every real training image has mean 128; :data:`TRAINING_STD` is the median of their standard deviations."""
    ids = pd.read_csv(sartorius_dir / "train.csv", usecols=["id"])["id"].unique()
    stats = np.array([
        (image.mean(), image.std())
        for image in (np.asarray(Image.open(sartorius_dir / "train" / f"{i}.png"), np.float64) for i in ids[::6])
    ])
    assert np.abs(stats[:, 0] - TRAINING_MEAN).max() < 0.5
    assert np.median(stats[:, 1]) == pytest.approx(TRAINING_STD, abs=1.0)


def test_eight_bit_grey_is_used_as_it_is(grey: np.ndarray, tmp_path: Path) -> None:
    Image.fromarray(grey).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", grey)
    for name in ("a.png", "a.tif"):
        image = read_image(tmp_path / name)
        assert image.kind == "8-bit grey" and image.model_input is image.grey
        assert np.array_equal(image.model_input, grey)
    assert image_shape(tmp_path / "a.png") == grey.shape


@pytest.mark.parametrize("save", ["png", "tif", "planar_tif", "palette"])
def test_a_colour_export_of_a_grey_image_gives_it_back(grey: np.ndarray, tmp_path: Path, save: str) -> None:
    rgb = np.stack([grey] * 3, axis=-1)
    path = tmp_path / f"rgb.{'png' if save in ('png', 'palette') else 'tif'}"
    if save == "png":
        Image.fromarray(rgb).save(path)
    elif save == "palette":
        Image.fromarray(grey).convert("P").save(path)
    else:
        tifffile.imwrite(path, np.moveaxis(rgb, -1, 0) if save == "planar_tif" else rgb, photometric="rgb",
                         planarconfig="separate" if save == "planar_tif" else "contig")
    image = read_image(path)
    assert image.kind == "8-bit colour" and np.array_equal(image.model_input, grey)


def test_colour_becomes_its_bt709_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 4), np.uint8)
    rgb[..., 0], rgb[..., 3] = 200, 7  # pure red, nearly transparent: alpha is dropped
    Image.fromarray(rgb, "RGBA").save(tmp_path / "red.png")
    assert np.all(read_image(tmp_path / "red.png").grey == round(0.2125 * 200))


@pytest.mark.parametrize(("dtype", "gain", "offset"), [(np.uint16, 16, 300), (np.uint16, 257, 0), (np.float32, 1 / 255, 0.0)])
def test_deeper_images_are_standardised_to_the_training_statistics(
    grey: np.ndarray, tmp_path: Path, dtype: type, gain: float, offset: float
) -> None:
    """A 12-bit camera image in 16 bits, a full-range 16-bit one and a float one: the model input is the image
    moved to mean 128 and the training standard deviation, whatever the gain; the grey keeps the file's units."""
    deep = (grey.astype(np.float64) * gain + offset).astype(dtype)
    tifffile.imwrite(tmp_path / "deep.tif", deep)
    image = read_image(tmp_path / "deep.tif")
    assert image.grey.dtype == dtype and np.array_equal(image.grey, deep)
    expected = np.clip(np.rint(TRAINING_MEAN + (grey - grey.mean()) * TRAINING_STD / grey.std()), 0, 255)
    assert np.abs(image.model_input.astype(int) - expected).max() <= 1
    assert image.model_input.mean() == pytest.approx(TRAINING_MEAN, abs=1.0)
    if dtype == np.uint16:
        Image.fromarray(deep).save(tmp_path / "deep.png")  # a 16-bit PNG reads the same
        assert np.array_equal(read_image(tmp_path / "deep.png").model_input, image.model_input)


def test_a_flat_deep_image_is_mid_grey() -> None:
    assert np.all(to_model_input(np.full((3, 3), 4000, np.uint16)) == 128)


def test_jpeg_is_read(grey: np.ndarray, tmp_path: Path) -> None:
    Image.fromarray(grey).save(tmp_path / "a.jpg", quality=95)
    image = read_image(tmp_path / "a.jpg")
    assert image.kind == "8-bit grey" and np.abs(image.grey.astype(int) - grey).mean() < 2


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: tifffile.imwrite(p, np.zeros((5, 8, 9), np.uint16)), "a multi-page TIFF \\(5 pages"),
        (lambda p: tifffile.imwrite(p, np.zeros((3, 8, 9), np.uint8), photometric="minisblack"), "Stack to Images"),
        (lambda p: tifffile.imwrite(p, np.zeros((2, 1, 8, 9), np.uint8), imagej=True), "a multi-page TIFF"),
        (lambda p: p.write_bytes(b"II*\x00garbage"), "not a readable image"),
        (lambda p: p.write_bytes(b""), "image file is empty"),
        (lambda p: tifffile.imwrite(p, np.array([[np.nan, 1.0]], np.float32)), "not finite"),
    ],
)
def test_what_cannot_be_one_image_is_refused_naming_the_file(tmp_path: Path, write, message: str) -> None:
    path = tmp_path / "bad.tif"
    write(path)
    with pytest.raises(DataError, match=f"^{path}: .*{message}"):
        read_image(path)


def test_an_animated_png_is_refused(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((8, 9), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "movie.png", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match="movie.png: 2 frames; cellseg segments one 2-D image a file"):
        image_shape(tmp_path / "movie.png")
