"""How a data set looks: per-image statistics of intensity, cell borders, texture and cell shapes.

They compare the synthetic generator with real images, per cell type (``bench/synthetic_realism.py``); every
figure is computed from an image and its cells' masks alone:

- ``intensity``: quantiles of the grey values, and their standard deviation;
- ``profile``: mean grey value minus the background's median at each signed distance from the nearest cell
  border (negative inside the cells, 0 the cells' outermost pixels, positive outside: the halo, then the
  background), from :data:`PROFILE_RANGE`;
- ``edge_contrast``: standard deviation of the grey values within :data:`EDGE_BAND` pixels of a cell border
  (either side): how strongly the borders stand out pixel by pixel, where ``profile`` (a mean) averages dark
  and bright pieces and slightly misplaced edges away;
- ``spectrum_slope``: the slope of the radially averaged power spectrum in log-log, between
  :data:`SPECTRUM_BAND` cycles per pixel (white noise 0; smoother images more negative);
- ``texture``: standard deviation of the high-pass image (the image minus its Gaussian blur, sigma 2) inside
  cells and in the background;
- ``background_dark`` and ``background_bright``: the share of background pixels (farther than
  :data:`BACKGROUND_DISTANCE` from any cell) darker or brighter than the background's median by more than
  :data:`OUTLIER_SIGMAS` robust standard deviations: unannotated neurites, debris and dead cells;
- cells: count, share of the image covered, share of covered pixels in two or more masks, and per cell its
  area, elongation (the ratio of the major to the minor axis of its second moments) and solidity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.measure import regionprops_table

PROFILE_RANGE = range(-8, 13)  # signed distances from the cell border, in pixels
SPECTRUM_BAND = (0.02, 0.25)  # cycles per pixel
BACKGROUND_DISTANCE = 8  # pixels from the nearest cell
EDGE_BAND = 2  # pixels either side of a cell border
OUTLIER_SIGMAS = 4.0
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@dataclass(frozen=True)
class Appearance:
    """One image's statistics (see the module docstring): ``image`` holds one value per name, ``cells`` one
    row per cell (area, elongation, solidity)."""

    image: dict[str, float]
    cells: pd.DataFrame


def measure(image: np.ndarray, cells: Sequence[np.ndarray]) -> Appearance:
    """The statistics of a 2-D grey ``image`` and its cells, each given as the flat (row-major) indices of its
    pixels (:func:`cellseg.rle.pixels`)."""
    grey = image.astype(np.float64)
    cover = cover_map(cells, grey.shape)
    foreground = cover > 0
    distance = _signed_distance(foreground)
    background = distance > BACKGROUND_DISTANCE
    outside = grey[background]
    reference = outside if outside.size else grey.ravel()  # the background's grey level and spread
    level, spread = float(np.median(reference)), _robust_std(reference)
    highpass = grey - ndi.gaussian_filter(grey, 2.0)
    stats: dict[str, float] = {f"intensity/q{round(100 * q):02d}": v for q, v in zip(QUANTILES, np.quantile(grey, QUANTILES))}
    stats["intensity/std"] = float(grey.std())
    stats.update(_profile(grey - level, distance))
    edge = np.abs(distance) <= EDGE_BAND
    stats["edge_contrast"] = float(grey[edge].std()) if edge.any() else float("nan")
    stats["spectrum_slope"] = spectrum_slope(grey)
    stats["texture/cells"] = float(highpass[foreground].std()) if foreground.any() else float("nan")
    stats["texture/background"] = float(highpass[background].std()) if outside.size else float("nan")
    stats["background_dark"] = float(np.mean(outside < level - OUTLIER_SIGMAS * spread)) if outside.size else 0.0
    stats["background_bright"] = float(np.mean(outside > level + OUTLIER_SIGMAS * spread)) if outside.size else 0.0
    stats["cells"] = float(len(cells))
    stats["coverage"] = float(foreground.mean())
    stats["overlap"] = float((cover > 1).sum() / max(1, foreground.sum()))
    return Appearance(stats, cell_shapes(cells, grey.shape))


def cover_map(cells: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """How many of ``cells`` (flat pixel indices) hold each pixel of an image of ``shape``."""
    return np.bincount(np.concatenate([*cells, np.zeros(0, np.int64)]), minlength=shape[0] * shape[1]).reshape(shape)


def _signed_distance(foreground: np.ndarray) -> np.ndarray:
    """Integer distance to the nearest cell border: 0 on the cells' outermost pixels, -k k pixels further in,
    +k k pixels outside (Euclidean, rounded)."""
    if not foreground.any():
        return np.full(foreground.shape, np.iinfo(np.int32).max, dtype=np.int32)
    inside = ndi.distance_transform_edt(foreground)
    outside = ndi.distance_transform_edt(~foreground)
    return np.where(foreground, 1 - np.rint(inside), np.rint(outside)).astype(np.int32)


def _profile(centred: np.ndarray, distance: np.ndarray) -> dict[str, float]:
    """Mean of ``centred`` at each distance of :data:`PROFILE_RANGE` (NaN where no pixel lies there)."""
    low, high = PROFILE_RANGE.start, PROFILE_RANGE.stop
    keep = (distance >= low) & (distance < high)
    index = distance[keep] - low
    sums = np.bincount(index, weights=centred[keep], minlength=high - low)
    counts = np.bincount(index, minlength=high - low)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return {f"profile/{d:+d}": float(m) for d, m in zip(PROFILE_RANGE, means)}


def _robust_std(values: np.ndarray) -> float:
    """1.4826 × the median absolute deviation: the standard deviation of a normal sample, unmoved by outliers."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def spectrum_slope(image: np.ndarray) -> float:
    """Log-log slope of the radially averaged power spectrum of ``image`` (mean removed, Hann-windowed) over
    :data:`SPECTRUM_BAND`."""
    h, w = image.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.rfft2((image - image.mean()) * window)) ** 2
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    radius = np.hypot(fy, fx)
    band = (radius >= SPECTRUM_BAND[0]) & (radius <= SPECTRUM_BAND[1])
    bins = np.rint(np.log(radius[band]) * 20).astype(np.int64)  # 20 bins per e-fold
    bins -= bins.min()
    counts = np.bincount(bins)
    used = counts > 0
    log_f = (np.bincount(bins, np.log(radius[band])) / np.maximum(counts, 1))[used]
    log_p = (np.bincount(bins, np.log(power[band] + 1e-12)) / np.maximum(counts, 1))[used]
    return float(np.polyfit(log_f, log_p, 1)[0])


def cell_shapes(cells: Sequence[np.ndarray], shape: tuple[int, int]) -> pd.DataFrame:
    """Area, elongation and solidity of each non-empty cell (one row per cell, in order)."""
    rows = []
    for flat in cells:
        if not flat.size:
            continue
        r, c = np.divmod(flat, shape[1])
        mask = np.zeros((r.max() - r.min() + 1, c.max() - c.min() + 1), dtype=np.uint8)
        mask[r - r.min(), c - c.min()] = 1
        props = regionprops_table(mask, properties=("area", "axis_major_length", "axis_minor_length", "solidity"))
        minor = max(float(props["axis_minor_length"][0]), 1.0)
        rows.append((float(props["area"][0]), float(props["axis_major_length"][0]) / minor, float(props["solidity"][0])))
    return pd.DataFrame(rows, columns=["area", "elongation", "solidity"])
