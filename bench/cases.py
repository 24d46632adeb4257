"""Parts 1–4 of the suite: RLE codecs, competition metric, preprocessing stages, data loading."""

from __future__ import annotations

import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
import yaml
from baselines import dense_image_score, loop_decode, loop_encode
from measure import MB, Result, against, clock, each, run_child, traced_peak_mb
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from cellseg import config, rle
from cellseg.augment import build_augmentations
from cellseg.data import ImageStore, PatchDataset
from cellseg.decode import LABELS_DIR
from cellseg.io import read_labels
from cellseg.metrics import image_score
from cellseg.models.unet_targets import BoundaryTarget

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"  # the one source of defaults
LOOP, COCO, CELLSEG = "loop", "pycocotools", "cellseg"
ENCODE_CHUNK = 256  # masks decoded at once (outside the clock) for the encoders: ~90 MB at 704×520


def project_section(name: str, **changes: object) -> config.Section:
    """The section ``name`` of the repository's ``params.yaml`` with ``changes`` to its keys, validated."""
    section = config.load(name, PARAMS)
    return type(section).model_validate({**section.model_dump(), **changes})


# ---------------------------------------------------------------------------------------------------- 1: RLE


def coco_rle(annotation: str, shape: tuple[int, int]) -> dict:
    """The compressed COCO RLE with the same runs: COCO counts column-major, so it is the RLE of the mask's transpose.

    Competition pixel ``(r, c)`` is number ``r·W + c``; in a column-major W×H mask that number is pixel ``(c, r)``.
    So pycocotools decodes this RLE (size ``[W, H]``) to ``M.T``, and encodes ``M.T`` (Fortran order) to it.
    """
    height, width = shape
    starts, lengths = rle.parse(annotation, height * width)
    bounds = np.concatenate([[0], np.stack([starts, starts + lengths], axis=1).ravel(), [height * width]])
    counts = np.diff(bounds).tolist()  # background, foreground, background, ...
    return mask_utils.frPyObjects({"size": [width, height], "counts": counts}, width, height)


def _fortran(mask: np.ndarray) -> np.ndarray:
    """What pycocotools encodes for a competition mask: its transpose, as uint8 in Fortran order (a view, no copy)."""
    return np.asfortranarray(mask.view(np.uint8).T)


def check_codecs(annotations: list[str], cocos: list[dict], shape: tuple[int, int]) -> None:
    """Every codec agrees with every other on these annotations, in both directions."""
    for annotation, coco in zip(annotations, cocos):
        mask = rle.decode(annotation, shape)
        assert np.array_equal(loop_decode(annotation, shape), mask), "loop decode differs"
        assert np.array_equal(mask_utils.decode(coco).T, mask), "pycocotools decode differs"
        assert rle.encode(mask) == loop_encode(mask) == annotation, "encode differs"
        assert mask_utils.encode(_fortran(mask))["counts"] == coco["counts"], "pycocotools encode differs"


def rle_codecs(annotations: list[str], shape: tuple[int, int], sample: int) -> list[Result]:
    """Decode, then encode, every annotation with each codec; peak memory over the first ``sample``."""
    n = len(annotations)
    cocos = [coco_rle(a, shape) for a in annotations]
    check_codecs(annotations[:sample], cocos[:sample], shape)
    rows = []

    decoders = {
        LOOP: (partial(loop_decode, shape=shape), annotations),
        COCO: (mask_utils.decode, cocos),
        CELLSEG: (partial(rle.decode, shape=shape), annotations),
    }
    seconds = {name: clock(lambda: each(f, items)) for name, (f, items) in decoders.items()}
    peaks = {name: traced_peak_mb(lambda: each(f, items[:sample])) for name, (f, items) in decoders.items()}
    rows += _codec_rows("rle decode", seconds, peaks, n)

    encoders = {LOOP: loop_encode, COCO: mask_utils.encode, CELLSEG: rle.encode}
    seconds = dict.fromkeys(encoders, 0.0)
    for k, a in enumerate(range(0, n, ENCODE_CHUNK)):
        masks = [rle.decode(s, shape) for s in annotations[a : a + ENCODE_CHUNK]]
        inputs = {LOOP: masks, CELLSEG: masks, COCO: [_fortran(m) for m in masks]}
        order = list(encoders)[k % 3 :] + list(encoders)[: k % 3]  # rotate, so that no codec always goes first
        for name in order:
            seconds[name] += clock(lambda: each(encoders[name], inputs[name]))
        if a == 0:
            peaks = {name: traced_peak_mb(lambda: each(f, inputs[name][:sample])) for name, f in encoders.items()}
    rows += _codec_rows("rle encode", seconds, peaks, n)
    return rows


def _codec_rows(case: str, seconds: dict[str, float], peaks: dict[str, float], n: int) -> list[Result]:
    def row(name: str) -> Result:
        return Result("1", case, name, seconds[name], n / seconds[name], "ann/s", peaks[name])

    return [
        against(row(LOOP), LOOP, seconds[LOOP]),
        against(row(COCO), LOOP, seconds[LOOP]),
        against(row(CELLSEG), LOOP, seconds[LOOP], 20, "≥ 20×"),
        against(row(CELLSEG), COCO, seconds[COCO], 1 / 1.5, "≥ 0.67× (within 1.5×)"),
    ]


# ---------------------------------------------------------------------------------------------------- 2: metric


def perturb(labels: np.ndarray, rng: np.random.Generator, drop: float = 0.1) -> np.ndarray:
    """A prediction-like copy of a label image: each instance shifted by 1–2 px in x and y, ``drop`` of them removed."""
    n = int(labels.max())
    shift = rng.choice([-2, -1, 1, 2], size=(n + 1, 2))
    keep = rng.random(n + 1) >= drop
    ys, xs = np.nonzero(labels)
    values = labels[ys, xs]
    kept = keep[values]
    ys, xs, values = ys[kept] + shift[values[kept], 0], xs[kept] + shift[values[kept], 1], values[kept]
    inside = (ys >= 0) & (ys < labels.shape[0]) & (xs >= 0) & (xs < labels.shape[1])
    out = np.zeros_like(labels)
    out[ys[inside], xs[inside]] = values[inside]
    return out


def metric(decoded: Path, image_ids: list[str], dense_images: int) -> list[Result]:
    """Sparse ``image_score`` on every image vs the dense baseline on an evenly spread subset, extrapolated."""
    rng = np.random.default_rng(0)
    step = max(1, math.ceil(len(image_ids) / dense_images))
    sparse_s, sparse_subset_s, dense_s = 0.0, 0.0, 0.0
    largest: tuple[int, np.ndarray, np.ndarray] | None = None  # the subset's image with the most cells
    for k, image_id in enumerate(image_ids):
        truth = read_labels(decoded / LABELS_DIR / f"{image_id}.png")
        pred = perturb(truth, rng)
        began = time.perf_counter()
        score = image_score(truth, pred).score
        seconds = time.perf_counter() - began
        sparse_s += seconds
        if k % step == 0:
            sparse_subset_s += seconds
            began = time.perf_counter()
            dense = dense_image_score(truth, pred)
            dense_s += time.perf_counter() - began
            assert abs(dense - score) < 1e-12, f"{image_id}: dense score {dense} != sparse {score}"
            if largest is None or truth.max() > largest[0]:
                largest = (int(truth.max()), truth, pred)
    n, m = len(image_ids), len(range(0, len(image_ids), step))
    _, truth, pred = largest
    dense_row = Result("2", "metric", "dense n×m (baseline)", dense_s * n / m, m / dense_s, "img/s",
                       traced_peak_mb(lambda: dense_image_score(truth, pred)),
                       note=f"measured on {m} of {n} images, time extrapolated ×{n / m:.1f}" if m < n else "")
    sparse_row = Result("2", "metric", "cellseg image_score", sparse_s, n / sparse_s, "img/s",
                        traced_peak_mb(lambda: image_score(truth, pred)),
                        note=f"ratio on the same {m} images; mem on the {largest[0]}-cell image")
    same_images = dense_s / sparse_subset_s  # the speed-up where both ran
    return [
        against(dense_row, "dense", dense_row.seconds),
        against(sparse_row, "dense", same_images * sparse_s, 50, "≥ 50×"),
    ]


# ---------------------------------------------------------------------------------------------------- 3: stages


def stage_params(data_root: Path) -> dict:
    """Params for the preprocessing stages on the benchmark set (the full recipe's split and 256-px windows)."""
    return {
        "data": {"source": "synthetic", "root": str(data_root), "limit_images": None, "seed": 0},
        "split": {"n_folds": 5, "fold": 1, "seed": 0},
        "patches": project_section("patches", size=256).model_dump(),
    }


def stages(data_root: Path, work: Path, n_images: int) -> list[Result]:
    """Run decode, split, patches and coco as subprocesses (outputs in ``work``); wall time and peak RSS of each."""
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(stage_params(data_root), sort_keys=False))
    decoded, split = str(work / "decoded"), str(work / "split.json")
    commands = {
        "decode": ["--out", decoded],
        "split": ["--decoded", decoded, "--out", split],
        "patches": ["--decoded", decoded, "--split", split, "--out", str(work / "patches.parquet")],
        "coco": ["--decoded", decoded, "--split", split, "--out", str(work / "coco")],
    }
    env = {**os.environ, "TQDM_DISABLE": "1"}
    rows = []
    for name, args in commands.items():
        command = [sys.executable, str(ROOT / "stages" / f"{name}.py"), "--params", str(params), *args]
        seconds, peak = run_child(command, ROOT, work / f"{name}.log", env)
        rows.append(Result("3", "stages", name, seconds, n_images / seconds, "img/s", peak, note="peak RSS"))
    total = sum(r.seconds for r in rows)
    peak = max(r.peak_mb for r in rows)
    met = total <= 60 and peak <= 2048
    rows.append(Result("3", "stages", "total", total, n_images / total, "img/s", peak, target="≤ 60 s, ≤ 2 GB",
                       met=met, note="max of the stages' peak RSS"))
    return rows


# ---------------------------------------------------------------------------------------------------- 4: loading


def _pss_mb(process: psutil.Process) -> float:
    """Memory of a process and its children (psutil PSS: pages shared between them counted once in all)."""
    return sum(p.memory_full_info().pss for p in [process, *process.children(recursive=True)]) / MB


def patch_dataset(data_root: Path, decoded: Path, patches: Path, max_images: int) -> PatchDataset:
    """The U-Net's training dataset (params.yaml's: windows, augmentations) over the first ``max_images`` images
    of the patch index."""
    index = pd.read_parquet(patches)
    ids = list(dict.fromkeys(index["image_id"]))[:max_images]
    index = index[index["image_id"].isin(ids)]
    unet = project_section("unet")
    store = ImageStore(data_root, decoded, ids, BoundaryTarget(unet, project_section("postprocess").unet).pixel_targets)
    return PatchDataset(index, store, build_augmentations(unet.augment, seed=0), unet.mean, unet.std, unet.channels)


def loading(data_root: Path, decoded: Path, patches: Path, max_images: int, batches: int) -> list[Result]:
    """Samples/s of the U-Net's training DataLoader (256-px windows, recipe augmentations, batch 64) for 0–2 workers.

    The store holds the first ``max_images`` training images of the patch index (throughput does not depend on
    how many). Torch runs one intra-op thread, as it does in DataLoader workers; one more row shows the main
    process with torch's default thread count.
    """
    dataset = patch_dataset(data_root, decoded, patches, max_images)
    batches = min(batches, len(dataset) // 64 - 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [_load(dataset, workers, batches, f"{workers} workers") for workers in (0, 1, 2)]
    finally:
        torch.set_num_threads(threads)
    rows.append(_load(dataset, 0, min(batches, 5), f"0 workers, {threads} threads"))
    # the baseline time of each row: its samples at the 0-worker rate
    return [against(r, "0 workers", r.seconds * r.rate / rows[0].rate) for r in rows]


def _load(dataset: PatchDataset, workers: int, batches: int, name: str) -> Result:
    """Time ``batches`` batches of 64 once the first has arrived (workers started, caches warm).

    Memory is the PSS that the loader adds to this process and its workers, read after the last batch.
    """
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    me = psutil.Process()
    before = _pss_mb(me)
    stream = iter(loader)
    next(stream)
    began = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - began
    extra = _pss_mb(me) - before
    del stream
    rate = batches * 64 / seconds
    note = f"{rate / max(workers, 1):.0f} samples/s per worker; {batches} batches; PSS added"
    return Result("4", "loading", name, seconds, rate, "samples/s", extra, note=note)
