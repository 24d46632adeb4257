"""Synthetic stand-in for the Sartorius "Cell Instance Segmentation" training download.

:func:`synthesize` writes ``train.csv`` (one row per cell, the competition's columns and RLE) and
``train/<id>.png`` (704×520, 8-bit grey) exactly as the Kaggle download lays them out.

Everything follows from the seed; image ``k`` is drawn from its own generator
(``SeedSequence(seed, spawn_key=(0, k))``) and its metadata from per-type and per-well streams, so image
``k`` is byte-identical whatever ``n_images`` is.

- Cell type: a fixed interleaved order that tracks the real shares (320 cort, 155 shsy5y, 131 astro of
  606): the first three images are cort, shsy5y, astro and 606 images hold exactly the real counts.
- Sample: the images of one type are visits to wells, 1–4 visits per well (P = .3, .3, .2, .2) at
  distinct plate times (half-hour steps, 1 h to 89 h 30); ``sample_id`` is
  ``{type}[{tag}]_{well}-{field}_Vessel-{vessel}_Ph_{k}``, unique per well; ``elapsed_timedelta`` is the
  plate time as pandas prints a Timedelta; ``sample_date`` is the plate's date. Ids are 12 hex characters
  hashed from the seed and the image index.

Cells per image (log-normal, clipped) and cell area in pixels (log-normal, clipped), set so that the
measured medians match the real images' (``bench/synthetic_realism.py``, ``docs/benchmarks.md``):

==========  =========================  ===============================  ===================================
type        cells per image            area                             shape and layout
==========  =========================  ===============================  ===================================
``shsy5y``  median 350, 100–800        median 215, smaller in crowded   elongated (aspect 1.2–2.8), wobbly
                                       images (× √(350/n)), 50–750      bodies in touching clusters of ~12
``astro``   median 66, 15–150          median 800, 150–6000             spread, elongated (aspect 2–5)
                                                                        cells with 1–4 lobes
``cort``    median 30, 5–150           median 230, 80–600               small round bodies, loose clusters
==========  =========================  ===============================  ===================================

With seed 0, 606 images hold 76,436 cells (55,068 shsy5y, 9,511 astro, 11,857 cort; real: about 73,000).
Masks are drawn independently, so neighbours may overlap a little, as in the real annotations: a cell may
share at most 18 % (shsy5y), 12 % (astro) or 5 % (cort) of its pixels with earlier cells. Every mask is one
4-connected component inside the image (cells are clipped at the border, keeping the largest piece).

Look (phase contrast), fitted per type to statistics of the 361 real images (:class:`_Look`; only those
numbers, never a real pixel or mask): every pixel within 8 px of a cell takes the type's **border profile**
at its signed distance from that cell's border (the real median grey level at each distance: a dark band
2–3 px inside, the bright rim on the cell's outermost annotated pixels, the background 2–3 px out), sharpened
and moved in or out by up to 1 px per cell (so that the average over cells is the real median profile), times a
per-cell contrast; bodies have a fine grain (astro's fitted to the real astro bodies: high-pass std 9.5–9.7
against the real 9–12 grey levels 6 px and more inside the border). The background is flat (grey 128, faint
gradient and mottling, pixel noise). Drawn but never annotated, as in the real data: neurites (1 px dark lines
with bright flanks, from cell bodies and a web crossing the image: dense for cort and shsy5y), specks of debris
(dark dots with a bright rim: hundreds on a cort image) and clumps of small round dead cells (mostly bright, some
with a dark core, in a bright ring); on cort images also bundles of neurites (2 px wide, bright flanks) and
large specks (5 px dark discs in a bright ring), as in the real cort backgrounds, whose busy texture a model
trained without them takes for cells.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries
from tqdm import tqdm

from cellseg import io
from cellseg.celltypes import CELL_TYPES
from cellseg.sources.kaggle import CSV_COLUMNS

log = logging.getLogger(__name__)

WIDTH, HEIGHT = 704, 520

_REAL_IMAGES = {"cort": 320, "shsy5y": 155, "astro": 131}  # of 606; also the tie-break order
_GROUP_SIZES, _GROUP_P = np.array([1, 2, 3, 4]), np.array([0.3, 0.3, 0.2, 0.2])
_TAGS = {"shsy5y": "diff", "astro": "hippo", "cort": "pre-treat"}
_IMAGE_KEY, _PLATE_KEY, _WELL_KEY = 0, 1, 2  # first spawn key of the image, plate and well streams
_N_ANGLES = 256  # resolution of a cell's polar radius table
_MAX_TRIES = 12  # positions tried per cell shape


@dataclass(frozen=True)
class _Morph:
    """How one cell type looks and how many of it an image holds."""

    count: tuple[float, float, int, int]  # median, log-sigma, min, max cells per image
    area: tuple[float, float, int, int]  # median, log-sigma, min, max pixels per cell
    aspect: tuple[float, float]  # body elongation range
    lobes: tuple[int, int]  # star lobes (0, 0: smooth outline)
    wobble: float  # amplitude of the outline's random harmonics
    clustered: float  # share of cells placed around cluster centres
    per_cluster: int  # mean cells per cluster
    max_overlap: float  # largest share of a cell's pixels already covered by earlier cells
    neurites: float  # neurites per cell
    neurite_length: tuple[int, int]  # pixels
    dead_clumps: tuple[int, int]  # clumps of dead cells per image


_MORPH = {
    "shsy5y": _Morph(
        count=(350, 0.45, 100, 800),
        area=(215, 0.55, 50, 750),
        aspect=(1.2, 2.8),
        lobes=(0, 0),
        wobble=0.2,
        clustered=0.9,
        per_cluster=12,
        max_overlap=0.18,
        neurites=0.5,
        neurite_length=(20, 160),
        dead_clumps=(15, 40),
    ),
    "astro": _Morph(
        count=(66, 0.5, 15, 150),
        area=(800, 0.75, 150, 6000),
        aspect=(2.0, 5.0),
        lobes=(1, 4),
        wobble=0.1,
        clustered=0.3,
        per_cluster=4,
        max_overlap=0.12,
        neurites=0.3,
        neurite_length=(40, 250),
        dead_clumps=(2, 10),
    ),
    "cort": _Morph(
        count=(30, 0.6, 5, 150),
        area=(230, 0.45, 80, 600),
        aspect=(1.0, 1.5),
        lobes=(0, 0),
        wobble=0.08,
        clustered=0.5,
        per_cluster=5,
        max_overlap=0.05,
        neurites=2.0,
        neurite_length=(15, 90),
        dead_clumps=(5, 20),
    ),
}


# cort's coarse debris (:func:`_coarse_debris`): a bundle is a path 2 px wide, dark (0.6 of the neurites' contrast)
# with bright flanks 3× its depth; a large speck a disc of radius 2 px, dark (0.1 of the specks' contrast) in a
# bright ring 5× its depth: set by eye and by cort's background statistics (texture, outliers; docs/benchmarks.md).
_BUNDLE_WIDTH, _BUNDLE_GAIN, _BUNDLE_FLANK = 2, 0.6, 3.0
_BLOB_RADIUS, _BLOB_GAIN, _BLOB_RIM = 2, 0.1, 5.0
_PROFILE_START = -8  # signed distance of the first knot of a profile
_EDGE_JITTER = 1.0  # each cell's drawn edge moves up to this many pixels in or out of its annotation
_SHARPEN = 3.0  # a cell's edge is sharper than the median profile over cells (see :func:`_sharpened`)


@dataclass(frozen=True)
class _Look:
    """How one cell type's images look. The profile is the real images' median; the other values were set so
    that the synthetic images' statistics come close to the real ones (``bench/synthetic_realism.py`` measures
    both with :mod:`cellseg.appearance`: the background's texture and dark outliers, the cells' texture; the
    table in ``docs/benchmarks.md``). No real pixel is used."""

    profile: tuple[float, ...]  # grey minus the background at signed distances −8, −7, …, +4 px from the border
    contrast_sigma: float  # log-sigma of each cell's factor on its profile and grain
    grain: float  # grey standard deviation of the bodies' fine texture (astro: fitted to the real bodies' texture)
    noise: float  # grey standard deviation of the pixel noise
    web: float  # mean number of long processes crossing the image
    neurite_contrast: float  # grey levels of the neurites' bright flanks (their dark line: 3/4 of it)
    debris: float  # mean number of specks per image
    speck_contrast: float  # a speck's dark core is 0.6 of this many grey levels (its rim about as bright)
    bundles: float = 0.0  # mean number of bundles of neurites (2 px wide) crossing the image
    large_specks: float = 0.0  # mean number of large specks of debris (dark discs in a bright ring) per image


# profile: the real medians per type (``bench/synthetic_realism.json``: 24 shsy5y, 88 astro, 249 cort images), rounded.
_LOOK = {
    "shsy5y": _Look(
        profile=(-1.9, -3.3, -4.1, -4.9, -7.0, -9.8, -6.4, 3.2, 8.6, 4.2, 0.8, 0.2, 0.0),
        contrast_sigma=0.7, grain=5.0, noise=3.0, web=60, neurite_contrast=70.0, debris=300, speck_contrast=600.0,
    ),
    "astro": _Look(
        profile=(-0.4, -0.8, -1.2, -2.0, -3.1, -4.8, -4.2, 1.2, 4.5, 2.1, 0.4, 0.1, 0.0),
        contrast_sigma=0.7, grain=9.0, noise=2.5, web=10, neurite_contrast=70.0, debris=40, speck_contrast=500.0,
    ),
    "cort": _Look(
        profile=(-6.1, -8.0, -9.1, -11.0, -12.4, -15.2, -15.0, -2.9, 11.5, 7.6, 1.5, 0.3, 0.0),
        contrast_sigma=0.7, grain=8.0, noise=4.0, web=120, neurite_contrast=70.0, debris=900, speck_contrast=900.0,
        bundles=30, large_specks=250,
    ),
}


class _Visit(NamedTuple):
    """One imaging of a well: the image's row metadata apart from id, cell type and annotation."""

    plate_time: str
    sample_date: str
    sample_id: str
    elapsed_timedelta: str


def synthesize(out_dir: Path, n_images: int, seed: int) -> pd.DataFrame:
    """Write a synthetic Kaggle-format data set to ``out_dir`` atomically and return its ``train.csv`` table."""
    out_dir = Path(out_dir)
    rows: list[tuple[object, ...]] = []
    with io.atomic_path(out_dir, directory=True) as tmp:
        (tmp / "train").mkdir()
        layout = tqdm(_layout(n_images, seed), desc="synthesize", unit="image")
        for k, (image_id, cell_type, visit) in enumerate(layout):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_IMAGE_KEY, k)))
            image, annotations = _render(rng, cell_type)
            io.write_png(tmp / "train" / f"{image_id}.png", image)
            rows.extend((image_id, rle, WIDTH, HEIGHT, cell_type, *visit) for rle in annotations)
        table = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
        table.to_csv(tmp / "train.csv", index=False, lineterminator="\n")
    log.info("synthesized %d images, %d cells in %s", n_images, len(table), out_dir)
    return table


# ---------------------------------------------------------------- layout: types, wells, ids


def _layout(n_images: int, seed: int) -> list[tuple[str, str, _Visit]]:
    """(id, cell type, visit) of images 0..n-1; image k's entry does not depend on ``n_images``."""
    types = _type_order(n_images)
    visits = {t: iter(_visits(seed, t, types.count(t))) for t in CELL_TYPES}
    taken: set[str] = set()
    return [(_image_id(seed, k, taken), t, next(visits[t])) for k, t in enumerate(types)]


def _type_order(n_images: int) -> list[str]:
    """Largest-deficit interleaving of the real type shares (cort, shsy5y, astro, cort, ...)."""
    total = sum(_REAL_IMAGES.values())
    counts = dict.fromkeys(_REAL_IMAGES, 0)
    order = []
    for k in range(1, n_images + 1):
        best = max(_REAL_IMAGES, key=lambda t: k * _REAL_IMAGES[t] / total - counts[t])
        counts[best] += 1
        order.append(best)
    return order


def _visits(seed: int, cell_type: str, count: int) -> list[_Visit]:
    """The first ``count`` visits of ``cell_type``'s wells, well after well (1–4 visits each)."""
    t = CELL_TYPES.index(cell_type)
    plates = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PLATE_KEY, t)))
    first_vessel = int(plates.integers(100, 900))
    first_date = date(2019, 3, 1) + timedelta(days=int(plates.integers(0, 240)))
    wells = plates.permutation(96)
    visits: list[_Visit] = []
    g = 0
    while len(visits) < count:
        plate, well = divmod(g, 96)  # 96-well plates, one vessel number each: sample ids are unique
        name = f"{'ABCDEFGH'[wells[well] // 12]}{wells[well] % 12 + 1}"
        sample_date = (first_date + timedelta(days=7 * plate)).isoformat()
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_WELL_KEY, t, g)))
        visits.extend(_well_visits(rng, cell_type, name, first_vessel + plate, sample_date))
        g += 1
    return visits[:count]


def _well_visits(
    rng: np.random.Generator, cell_type: str, well: str, vessel: int, sample_date: str
) -> list[_Visit]:
    """Visits of one well at 1–4 distinct plate times (half-hour steps from 1 h to 89 h 30)."""
    size = int(rng.choice(_GROUP_SIZES, p=_GROUP_P))
    field, phase = rng.integers(1, 5, size=2)
    sample_id = f"{cell_type}[{_TAGS[cell_type]}]_{well}-{field}_Vessel-{vessel}_Ph_{phase}"
    visits = []
    for half_hours in np.sort(rng.choice(np.arange(2, 180), size=size, replace=False)).tolist():
        hours, minutes = divmod(30 * half_hours, 60)
        elapsed = str(pd.Timedelta(hours=hours, minutes=minutes))
        visits.append(_Visit(f"{hours:02d}h{minutes:02d}m00s", sample_date, sample_id, elapsed))
    return visits


def _image_id(seed: int, k: int, taken: set[str]) -> str:
    """12 lowercase hex characters, from the seed and the image index; unique within ``taken``."""
    salt = 0
    while True:
        digest = hashlib.sha256(f"cellseg-synthetic:{seed}:{k}:{salt}".encode()).hexdigest()[:12]
        if digest not in taken:
            taken.add(digest)
            return digest
        salt += 1


# ---------------------------------------------------------------- one image


def _render(rng: np.random.Generator, cell_type: str) -> tuple[np.ndarray, list[str]]:
    """Draw one image: the uint8 picture and the RLE of each cell."""
    morph, look = _MORPH[cell_type], _LOOK[cell_type]
    labels, annotations, centres = _place_cells(rng, morph)
    neurites = _neurites(rng, morph, look, centres)
    debris = _debris(rng, look)
    dead = _dead_cells(rng, morph)
    bundles, blobs = _coarse_debris(rng, look)
    return _compose(rng, look, labels, neurites, debris, dead, bundles, blobs), annotations


def _place_cells(rng: np.random.Generator, morph: _Morph) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Place the image's cells; return their label map (a later cell covers an earlier one where they
    overlap), the RLEs and the cell centres (row, col)."""
    median, sigma, low, high = morph.count
    n_cells = int(np.clip(round(rng.lognormal(np.log(median), sigma)), low, high))
    crowding = min(1.0, np.sqrt(morph.count[0] / n_cells))  # crowded images have smaller cells
    clusters = _cluster_centres(rng, morph, n_cells)
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.int32)
    annotations: list[str] = []
    centres: list[tuple[float, float]] = []
    for _ in range(3 * n_cells):  # shapes that fit nowhere are redrawn, up to 3 per cell on average
        if len(annotations) == n_cells:
            break
        local = _cell_shape(rng, morph, crowding)
        placed = _find_place(rng, morph, local, clusters, labels)
        if placed is None:
            continue
        (r0, c0), mask = placed
        box = labels[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]]
        box[mask] = len(annotations) + 1
        annotations.append(_encode_box(mask, r0, c0))
        centres.append((r0 + mask.shape[0] / 2, c0 + mask.shape[1] / 2))
    return labels, annotations, np.array(centres).reshape(-1, 2)


def _cluster_centres(rng: np.random.Generator, morph: _Morph, n_cells: int) -> np.ndarray:
    n = max(1, round(n_cells * morph.clustered / morph.per_cluster))
    return rng.uniform((0, 0), (HEIGHT, WIDTH), size=(n, 2))


def _cell_shape(rng: np.random.Generator, morph: _Morph, crowding: float) -> np.ndarray:
    """Rasterize one cell outline in its own tight box: a polar radius table on a stretched, rotated frame."""
    median, sigma, low, high = morph.area
    area = float(np.clip(rng.lognormal(np.log(median * crowding), sigma), low, high))
    radius = _radius_table(rng, morph)
    aspect = rng.uniform(*morph.aspect)
    sx, sy = np.sqrt(aspect), 1 / np.sqrt(aspect)
    radius *= np.sqrt(area / (np.pi * np.mean(radius**2)))  # continuous area = area
    half = int(np.ceil(radius.max() * sx)) + 1
    offset = rng.uniform(-0.5, 0.5, size=2)
    yy, xx = np.ogrid[-half : half + 1, -half : half + 1]
    yy, xx = yy - offset[0], xx - offset[1]
    angle = rng.uniform(0, np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    u = (xx * cos + yy * sin) / sx
    v = (yy * cos - xx * sin) / sy
    index = ((np.arctan2(v, u) + np.pi) * (_N_ANGLES / (2 * np.pi))).astype(np.intp) % _N_ANGLES
    mask = np.hypot(u, v) <= radius[index]
    return _crop(_largest_component(mask))


def _radius_table(rng: np.random.Generator, morph: _Morph) -> np.ndarray:
    """Relative radius at ``_N_ANGLES`` angles: random harmonics, plus von Mises lobes for star shapes."""
    theta = np.linspace(-np.pi, np.pi, _N_ANGLES, endpoint=False)
    orders = np.arange(1, 6)[:, None]
    amplitude = rng.normal(0, morph.wobble, size=(5, 1)) / np.sqrt(orders)
    phase = rng.uniform(0, 2 * np.pi, size=(5, 1))
    radius = np.exp(np.sum(amplitude * np.cos(orders * theta + phase), axis=0))
    n_lobes = int(rng.integers(morph.lobes[0], morph.lobes[1] + 1))
    if n_lobes:
        centre = rng.uniform(-np.pi, np.pi, size=(n_lobes, 1))
        height = rng.uniform(0.6, 2.0, size=(n_lobes, 1))
        width = rng.uniform(6, 20, size=(n_lobes, 1))
        radius *= 0.45 + np.sum(height * np.exp(width * (np.cos(theta - centre) - 1)), axis=0)
    return radius


def _crop(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (same shape)."""
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def _find_place(
    rng: np.random.Generator, morph: _Morph, local: np.ndarray, clusters: np.ndarray, labels: np.ndarray
) -> tuple[tuple[int, int], np.ndarray] | None:
    """Top-left corner and (border-clipped) mask of a position where the cell overlaps little; None if none."""
    h, w = local.shape
    spread = np.sqrt(morph.per_cluster * h * w / np.pi)
    for _ in range(_MAX_TRIES):
        if rng.random() < morph.clustered:
            centre = clusters[rng.integers(len(clusters))] + rng.normal(0, spread, size=2)
        else:
            centre = rng.uniform((0, 0), (HEIGHT, WIDTH))
        r0, c0 = int(centre[0]) - h // 2, int(centre[1]) - w // 2
        clipped = _clip(local, r0, c0)
        if clipped is None:
            continue
        (r0, c0), mask = clipped
        area = np.count_nonzero(mask)
        if area < morph.area[2]:
            continue
        overlap = np.count_nonzero(labels[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]][mask])
        if overlap <= morph.max_overlap * area:
            return (r0, c0), mask
    return None


def _clip(local: np.ndarray, r0: int, c0: int) -> tuple[tuple[int, int], np.ndarray] | None:
    """Cut the part of ``local`` (top-left at r0, c0) that lies inside the image, keeping one component."""
    h, w = local.shape
    top, left = max(0, -r0), max(0, -c0)
    bottom, right = min(h, HEIGHT - r0), min(w, WIDTH - c0)
    if top >= bottom or left >= right:
        return None
    if (top, left, bottom, right) == (0, 0, h, w):
        return (r0, c0), local
    mask = local[top:bottom, left:right]
    if not mask.any():
        return None
    return (r0 + top, c0 + left), _largest_component(mask)


def _encode_box(mask: np.ndarray, r0: int, c0: int) -> str:
    """Competition RLE of ``mask`` placed with its top-left at (r0, c0), without a full-image array."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, cols = np.nonzero(edges == 1)
    starts = (r0 + rows) * WIDTH + c0 + cols
    rows, cols = np.nonzero(edges == -1)
    ends = (r0 + rows) * WIDTH + c0 + cols  # exclusive
    joined = starts[1:] == ends[:-1]  # a run leaving the right border continues on the next row
    starts, ends = starts[np.r_[True, ~joined]], ends[np.r_[~joined, True]]
    runs = np.empty(2 * len(starts), dtype=np.int64)
    runs[0::2] = starts + 1
    runs[1::2] = ends - starts
    return " ".join(map(str, runs.tolist()))


# ---------------------------------------------------------------- unannotated structures and optics


def _neurites(rng: np.random.Generator, morph: _Morph, look: _Look, centres: np.ndarray) -> np.ndarray:
    """Strength map of thin curved processes, most starting at cell bodies, plus the type's web of processes
    crossing the image; never annotated."""
    n = rng.poisson(morph.neurites * max(len(centres), 10))
    from_cell = rng.random(n) < 0.7 if len(centres) else np.zeros(n, dtype=bool)
    starts = rng.uniform((0, 0), (HEIGHT, WIDTH), size=(n, 2))
    if from_cell.any():
        starts[from_cell] = centres[rng.integers(len(centres), size=int(from_cell.sum()))]
    lengths = rng.integers(*morph.neurite_length, size=n)
    n_web = rng.poisson(look.web)
    starts = np.concatenate([starts, rng.uniform((0, 0), (HEIGHT, WIDTH), size=(n_web, 2))])
    lengths = np.concatenate([lengths, rng.integers(60, 400, size=n_web)])
    return _paths(rng, starts, lengths)


def _paths(rng: np.random.Generator, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Strength map of curved random walks from ``starts`` (row, col), ``lengths`` pixels long, each of a random
    strength (0.25–0.7 per pixel of path)."""
    heading = rng.uniform(0, 2 * np.pi, size=len(starts))
    strength = rng.uniform(0.25, 0.7, size=len(starts))
    step = 0.7
    points, weights = [], []
    for start, length, angle, weight in zip(starts, lengths, heading, strength, strict=True):
        turns = angle + np.cumsum(rng.normal(0, 0.06, size=int(length / step)))
        path = start + step * np.cumsum(np.stack([np.sin(turns), np.cos(turns)], axis=1), axis=0)
        points.append(path)
        weights.append(np.full(len(path), weight / 2))  # ~2 samples per pixel
    if not points:
        return np.zeros((HEIGHT, WIDTH), dtype=np.float32)
    return _splat(np.concatenate(points), np.concatenate(weights), cap=0.8)


def _coarse_debris(rng: np.random.Generator, look: _Look) -> tuple[np.ndarray, np.ndarray]:
    """Point maps of the type's bundles of neurites (paths 100–500 px long) and of its large specks of debris,
    widened and drawn by :func:`_compose`; never annotated. A type without them draws nothing from ``rng``."""
    empty = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
    bundles, blobs = empty, empty
    if look.bundles:
        n = rng.poisson(look.bundles)
        bundles = _paths(rng, rng.uniform((0, 0), (HEIGHT, WIDTH), size=(n, 2)), rng.integers(100, 500, size=n))
    if look.large_specks:
        n = rng.poisson(look.large_specks)
        blobs = _splat(rng.uniform((0, 0), (HEIGHT, WIDTH), size=(n, 2)), rng.uniform(0.5, 1.0, size=n), cap=1.0)
    return bundles, blobs


def _debris(rng: np.random.Generator, look: _Look) -> np.ndarray:
    """Point map of single specks (small dark dots with a bright rim, after :func:`_compose`); never annotated."""
    n = rng.poisson(look.debris)
    return _splat(rng.uniform((0, 0), (HEIGHT, WIDTH), size=(n, 2)), rng.uniform(0.5, 1.0, size=n), cap=1.0)


def _dead_cells(rng: np.random.Generator, morph: _Morph) -> np.ndarray:
    """Point map of clumps of small round dead cells (blurred into blobs by :func:`_compose`); never annotated."""
    n_clumps = int(rng.integers(morph.dead_clumps[0], morph.dead_clumps[1] + 1))
    sizes = rng.integers(4, 25, size=n_clumps)
    centres = np.repeat(rng.uniform((0, 0), (HEIGHT, WIDTH), size=(n_clumps, 2)), sizes, axis=0)
    spread = np.repeat(rng.uniform(3, 7, size=n_clumps), sizes)[:, None]
    points = centres + rng.normal(0, 1, size=centres.shape) * spread
    sign = np.where(rng.random(len(points)) < 0.65, 1.0, -1.0)  # most are bright, some have a dark core
    return _splat(points, sign * rng.uniform(0.6, 1.0, size=len(points)), cap=1.0)


def _splat(points: np.ndarray, weights: np.ndarray, cap: float) -> np.ndarray:
    """Sum ``weights`` at the pixels of ``points`` (row, col), dropping those outside, clipped to ±``cap``."""
    rc = np.round(points).astype(np.intp)
    inside = (rc[:, 0] >= 0) & (rc[:, 0] < HEIGHT) & (rc[:, 1] >= 0) & (rc[:, 1] < WIDTH)
    flat = rc[inside, 0] * WIDTH + rc[inside, 1]
    total = np.bincount(flat, weights=weights[inside], minlength=HEIGHT * WIDTH)
    return np.clip(total, -cap, cap).astype(np.float32).reshape(HEIGHT, WIDTH)


def _smooth_noise(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation."""
    noise = ndi.gaussian_filter(rng.standard_normal((HEIGHT, WIDTH), dtype=np.float32), sigma, truncate=3.0)
    return noise / noise.std()


def _sharpened(profile: tuple[float, ...]) -> np.ndarray:
    """One cell's profile: the real median profile, sharpened (unsharp masking of its 3-tap average) so that
    its average over the cells' edge jitter (:data:`_EDGE_JITTER`) stays close to the median."""
    p = np.asarray(profile, dtype=np.float32)
    padded = np.r_[p[0], p, p[-1]]
    return p + _SHARPEN * (p - (0.25 * padded[:-2] + 0.5 * p + 0.25 * padded[2:]))


def _border_distance(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance of each pixel to the nearest cell border (0 on a cell's outermost pixels, negative
    inside, positive outside; touching cells each have their own border) and the label of the cell it belongs
    to, or of the nearest cell for background pixels."""
    cells = labels > 0
    if not cells.any():
        return np.full(labels.shape, np.inf, dtype=np.float32), labels
    border = find_boundaries(labels, mode="inner") & cells
    # A background pixel's nearest cell pixel is on that cell's border, so one transform serves both sides.
    distance, (rows, cols) = ndi.distance_transform_edt(~border, return_indices=True)
    return np.where(cells, -distance, distance).astype(np.float32), labels[rows, cols]


def _disc(radius: int) -> np.ndarray:
    """A disc footprint of ``radius`` pixels."""
    yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return yy**2 + xx**2 <= radius**2


def _relief(strength: np.ndarray, core: float, halo: float) -> tuple[np.ndarray, np.ndarray]:
    """A structure's blurred core (sigma ``core``) and the bright halo around it (the blur at ``halo`` beyond it)."""
    centre = ndi.gaussian_filter(strength, core, truncate=3.0)
    return centre, np.maximum(ndi.gaussian_filter(np.abs(strength), halo, truncate=3.0) - np.abs(centre), 0)


def _compose(
    rng: np.random.Generator, look: _Look, labels: np.ndarray, neurites: np.ndarray, debris: np.ndarray,
    dead: np.ndarray, bundles: np.ndarray, blobs: np.ndarray,
) -> np.ndarray:
    """Phase-contrast look: each cell drawn with the type's border profile (a dark band inside, the bright rim
    on its outermost pixels, back to the background 2–3 px out) times a per-cell contrast, granular bodies,
    dark neurites and specks with bright flanks, dead cells as bright blobs."""
    distance, owner = _border_distance(labels)
    n = int(labels.max())
    sigma = look.contrast_sigma
    contrast = np.r_[1.0, rng.lognormal(-sigma**2 / 2, sigma, size=n)].astype(np.float32)  # mean 1
    shift = np.r_[0.0, rng.uniform(-_EDGE_JITTER, _EDGE_JITTER, size=n)].astype(np.float32)
    knots = _PROFILE_START + np.arange(len(look.profile), dtype=np.float32)
    cells = np.interp(distance + shift[owner], knots, _sharpened(look.profile)) * contrast[owner]
    grain = look.grain * contrast[owner] * (labels > 0) * _smooth_noise(rng, 1.0)
    lines, flank = _relief(neurites, 0.5, 1.2)
    dots = 350.0 * dead - 0.6 * look.speck_contrast * debris  # the cores' grey levels: dead cells, dark specks
    cores, rims = _relief(dots, 1.2, 2.5)
    image = 128.0 + _illumination(rng) + cells + grain
    image += look.neurite_contrast * (flank - 0.75 * lines) + cores + 1.5 * rims
    if look.bundles or look.large_specks:
        thick, thick_flank = _relief(ndi.grey_dilation(bundles, size=_BUNDLE_WIDTH), 0.7, 1.5)
        blob, blob_rim = _relief(ndi.grey_dilation(blobs, footprint=_disc(_BLOB_RADIUS)), 0.7, 1.8)
        image += look.neurite_contrast * _BUNDLE_GAIN * (_BUNDLE_FLANK * thick_flank - thick)
        image += look.speck_contrast * _BLOB_GAIN * (_BLOB_RIM * blob_rim - blob)
    image += look.noise * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _illumination(rng: np.random.Generator) -> np.ndarray:
    """Slow gradient plus low-frequency mottling (a 6×8 grid of random levels, smoothly interpolated)."""
    rows, cols = _bumps(HEIGHT, 6), _bumps(WIDTH, 8)
    mottling = rows @ rng.normal(0, 0.5, size=(6, 8)).astype(np.float32) @ cols.T
    gy, gx = rng.normal(0, 0.75, size=2)
    ramp = gy * np.linspace(-1, 1, HEIGHT, dtype=np.float32)[:, None] + gx * np.linspace(-1, 1, WIDTH, dtype=np.float32)
    return mottling + ramp


def _bumps(size: int, n: int) -> np.ndarray:
    """``size``×``n`` weights of ``n`` evenly spaced Gaussian bumps, each row summing to 1."""
    centres = (np.arange(n) + 0.5) * size / n
    weights = np.exp(-0.5 * ((np.arange(size)[:, None] - centres) / (size / n)) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
