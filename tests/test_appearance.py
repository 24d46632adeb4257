"""Appearance statistics (cellseg.appearance) on images whose answers are known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from cellseg import rle
from cellseg.appearance import PROFILE_RANGE, cell_shapes, measure, spectrum_slope
from cellseg.io import read_gray
from cellseg.sources.kaggle import read_kaggle
from cellseg.sources.synthetic import synthesize

REPO = Path(__file__).resolve().parents[1]

SHAPE = (120, 160)


def flat(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask)


def disc(radius: float, centre: tuple[float, float] = (60, 80)) -> np.ndarray:
    yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1]]
    return np.hypot(yy - centre[0], xx - centre[1]) <= radius


def test_border_profile_of_a_dark_disc_with_a_bright_halo() -> None:
    cell = disc(20)
    outside = np.rint(ndi.distance_transform_edt(~cell))
    ring = (outside >= 1) & (outside <= 2)  # 1 and 2 px outside
    image = np.where(cell, 100.0, 130.0) + np.where(ring, 10.0, 0.0)
    stats = measure(image, [flat(cell)]).image
    for d in PROFILE_RANGE:
        expected = -30.0 if d <= 0 else 10.0 if d in (1, 2) else 0.0
        assert stats[f"profile/{d:+d}"] == pytest.approx(expected, abs=1e-9), d
    assert stats["intensity/q50"] == 130.0 and stats["cells"] == 1


def test_edge_contrast_reads_only_the_pixels_near_a_border() -> None:
    """A 20 × 20 square cell (grey 100) on grey 130: within 2 px of its border lie its 3 outer rings
    (400 − 14² = 204 px) and the 24 × 24 square around it less the cell and the 4 corner pixels 2√2 px away
    (576 − 400 − 4 = 172 px); a dark centre and a bright speck 6 px out change nothing."""
    cell = np.zeros(SHAPE, dtype=bool)
    cell[50:70, 70:90] = True
    image = np.where(cell, 100.0, 130.0)
    share = 204 / (204 + 172)
    expected = 30.0 * np.sqrt(share * (1 - share))
    assert measure(image, [flat(cell)]).image["edge_contrast"] == pytest.approx(expected, rel=1e-9)
    image[60, 80], image[44, 80] = 0.0, 255.0
    assert measure(image, [flat(cell)]).image["edge_contrast"] == pytest.approx(expected, rel=1e-9)


def test_cells_coverage_and_overlap() -> None:
    a = np.zeros(SHAPE, dtype=bool)
    a[10:30, 10:50] = True  # 800 px
    b = np.zeros(SHAPE, dtype=bool)
    b[20:40, 40:60] = True  # 400 px, 100 of them shared with a
    stats = measure(np.full(SHAPE, 128, dtype=np.uint8), [flat(a), flat(b)]).image
    assert stats["cells"] == 2
    assert stats["coverage"] == pytest.approx(1100 / (SHAPE[0] * SHAPE[1]))
    assert stats["overlap"] == pytest.approx(100 / 1100)


def test_cell_shapes_area_elongation_solidity() -> None:
    bar = np.zeros(SHAPE, dtype=bool)
    bar[10:20, 10:50] = True  # 10 × 40
    ell = np.zeros(SHAPE, dtype=bool)
    ell[50:90, 50:60] = True
    ell[80:90, 60:90] = True  # an L: 700 px, its hull larger
    shapes = cell_shapes([flat(bar), flat(ell), np.zeros(0, dtype=np.int64)], SHAPE)
    assert len(shapes) == 2  # the empty cell is left out
    assert shapes["area"].tolist() == [400.0, 700.0]
    assert shapes["elongation"][0] == pytest.approx(4.0, rel=0.02)
    assert shapes["solidity"][0] == pytest.approx(1.0) and shapes["solidity"][1] < 0.75


def test_background_outliers() -> None:
    rng = np.random.default_rng(0)
    image = 128 + rng.normal(0, 2, SHAPE)
    cell = disc(10, (20, 20))
    background = np.rint(ndi.distance_transform_edt(~cell)) > 8  # farther than 8 px from the cell
    where = np.flatnonzero(background)
    dark, bright = rng.choice(where, size=(2, 96), replace=False)
    image.flat[dark] = 60
    image.flat[bright] = 200
    stats = measure(image, [flat(cell)]).image
    assert stats["background_dark"] == pytest.approx(96 / where.size)
    assert stats["background_bright"] == pytest.approx(96 / where.size)


def test_spectrum_slope_of_white_and_brown_noise() -> None:
    rng = np.random.default_rng(0)
    white = rng.normal(size=(256, 256))
    assert abs(spectrum_slope(white)) < 0.2
    fy, fx = np.fft.fftfreq(256)[:, None], np.fft.rfftfreq(256)[None, :]
    radius = np.hypot(fy, fx)
    radius[0, 0] = 1.0
    brown = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(256, 256))) / radius, s=(256, 256))  # power ∝ f^-2
    assert spectrum_slope(brown) == pytest.approx(-2.0, abs=0.25)


def test_realism_benchmark_on_the_generators_own_output(tmp_path: Path) -> None:
    """``bench/synthetic_realism.py`` given the generator's own images as the "real" set (same seed and count)
    reports identical figures for both, every statistic present, and writes its figure."""
    synthesize(tmp_path / "own", n_images=3, seed=0)
    out, figure = tmp_path / "realism.json", tmp_path / "crops.png"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "synthetic_realism.py"), "--real", str(tmp_path / "own"), "--images", "3",
         "--out", str(out), "--figure", str(figure)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["real"] == summary["synthetic"]
    assert {"profile/-6", "profile/+2", "spectrum_slope", "coverage", "overlap", "area", "solidity/q75"} <= set(summary["real"]["cort"])
    assert summary["real"]["astro"]["images"] == 1 and "| cell area (px) |" in done.stdout
    assert figure.stat().st_size > 10_000


def test_recorded_real_figures_are_those_of_the_real_set(sartorius_dir: Path) -> None:
    """``bench/synthetic_realism.json`` holds what the statistics give on the real images (here its shsy5y
    column, recomputed from the 24 shsy5y images of ``../shared/sartorius``)."""
    recorded = json.loads((REPO / "bench" / "synthetic_realism.json").read_text())["summary"]["real"]["shsy5y"]
    data = read_kaggle(sartorius_dir)
    images = data.images[data.images["cell_type"] == "shsy5y"]
    by_image = data.annotations.groupby("image_id")["annotation"]
    measured = []
    for row in images.itertuples():
        grey = read_gray(sartorius_dir / row.file_name)
        measured.append(measure(grey, [rle.pixels(a, grey.shape) for a in by_image.get_group(row.image_id)]))
    assert recorded["images"] == len(images) == 24
    for key in ("profile/-3", "profile/+0", "profile/+2", "spectrum_slope", "cells", "coverage", "background_dark"):
        assert np.median([m.image[key] for m in measured]) == pytest.approx(recorded[key]), key
    areas = np.concatenate([m.cells["area"].to_numpy() for m in measured])
    assert np.median(areas) == pytest.approx(recorded["area"])
