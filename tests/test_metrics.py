"""Tests of cellseg.metrics: hand-computed cases, a dense baseline cross-check, the real sample, COCO AP."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_utils

from cellseg import rle
from cellseg.errors import DataError, ParamsError
from cellseg.metrics import (
    MAX_DETS,
    THRESHOLDS,
    CompetitionScore,
    SparseIoU,
    coco_ap,
    image_score,
    iou_dice,
    iou_matrix,
    pixel_counts,
)
from helpers.mask_scores import image_score_masks, mask_iou_matrix

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
needs_real = pytest.mark.skipif(
    not (REAL / "train.csv").is_file(), reason=f"real Sartorius sample not found at {REAL} (shared data absent)"
)
T = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # written out, independent of the module


# --- dense baseline: every true mask against every predicted one over the full image -----------------


def dense_ious(true_masks: list[np.ndarray], pred_masks: list[np.ndarray]) -> np.ndarray:
    """n×m IoU matrix by full-image comparison (bit-packed so that the real sample takes ~1 s)."""
    if not true_masks or not pred_masks:
        return np.zeros((len(true_masks), len(pred_masks)))
    tb = np.stack([np.packbits(m.ravel()) for m in true_masks])
    pb = np.stack([np.packbits(m.ravel()) for m in pred_masks])
    pad = (-tb.shape[1]) % 8  # whole uint64 words for a fast popcount
    tb, pb = (np.pad(x, ((0, 0), (0, pad))).view(np.uint64) for x in (tb, pb))
    t_area = np.bitwise_count(tb).sum(axis=1, dtype=np.int64)
    p_area = np.bitwise_count(pb).sum(axis=1, dtype=np.int64)
    out = np.zeros((len(true_masks), len(pred_masks)))
    for i in range(len(true_masks)):
        inter = np.bitwise_count(pb & tb[i]).sum(axis=1, dtype=np.int64)
        out[i] = inter / (t_area[i] + p_area - inter)
    return out


def dense_score(true_masks: list[np.ndarray], pred_masks: list[np.ndarray]) -> float:
    """Competition score with a greedy one-to-one matching by decreasing IoU, redone at every threshold."""
    true_masks = [m for m in true_masks if m.any()]
    pred_masks = [m for m in pred_masks if m.any()]
    n, m = len(true_masks), len(pred_masks)
    if n == m == 0:
        return 1.0
    ious = dense_ious(true_masks, pred_masks)
    scores = []
    for t in T:
        rows, cols = np.nonzero(ious > t)
        order = np.lexsort((cols, rows, -ious[rows, cols]))
        used_t, used_p, tp = set(), set(), 0
        for i, j in zip(rows[order], cols[order]):
            if i not in used_t and j not in used_p:
                used_t.add(i)
                used_p.add(j)
                tp += 1
        scores.append(tp / (n + m - tp))
    return float(np.mean(scores))


def dense(ious: SparseIoU) -> np.ndarray:
    """The (n_true, n_pred) IoU matrix of sparse IoUs (absent pairs have IoU 0)."""
    out = np.zeros((len(ious.true_ids), len(ious.pred_ids)))
    out[ious.rows, ious.cols] = ious.ious
    return out


def to_masks(labels: np.ndarray) -> list[np.ndarray]:
    return [labels == v for v in np.unique(labels) if v]


def square(shape: tuple[int, int], r0: int, c0: int, h: int, w: int) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[r0 : r0 + h, c0 : c0 + w] = True
    return out


def random_labels(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """A label image of up to n painted rectangles with non-consecutive ids (later ones cover earlier)."""
    out = np.zeros(shape, dtype=np.int32)
    ids = rng.choice(np.arange(1, 1000), size=n, replace=False)
    for v in ids:
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        out[r : r + rng.integers(2, 10), c : c + rng.integers(2, 10)] = v
    return out


def perturb(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Shift, drop, split and add objects of a label image."""
    out = np.roll(labels, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1)) if rng.random() < 0.5 else labels.copy()
    for v in np.unique(out)[1:]:
        if rng.random() < 0.2:
            out[out == v] = 0
        elif rng.random() < 0.2:
            out[(out == v) & (rng.random(out.shape) < 0.3)] = 2000 + v
    r, c = rng.integers(0, labels.shape[0], size=2)
    out[r : r + 4, c : c + 4] = 5000
    return out


# --- pixel metrics ------------------------------------------------------------------------------------


def test_pixel_counts_and_iou_dice() -> None:
    pred, true = square((10, 10), 0, 0, 4, 5), square((10, 10), 0, 2, 4, 5)  # overlap 4×3
    assert pixel_counts(pred, true) == (12, 20, 20)
    iou, dice = iou_dice(12, 20, 20)
    assert iou == pytest.approx(12 / 28) and dice == pytest.approx(24 / 40)
    # counts summed over images give the data set's IoU: (12 + 0) / (28 + 5)
    extra = pixel_counts(np.zeros((3, 3), bool), square((3, 3), 0, 0, 1, 5))
    total = [a + b for a, b in zip((12, 20, 20), extra)]
    assert iou_dice(*total)[0] == pytest.approx(12 / 31)


def test_iou_dice_edge_cases() -> None:
    assert iou_dice(0, 0, 0) == (1.0, 1.0)  # empty prediction of an empty truth
    assert iou_dice(0, 5, 0) == (0.0, 0.0)
    assert iou_dice(0, 0, 5) == (0.0, 0.0)
    with pytest.raises(DataError):
        iou_dice(6, 5, 9)
    with pytest.raises(DataError):
        pixel_counts(np.zeros((3, 3)), np.zeros((3, 4)))


# --- competition metric: hand-computed cases --------------------------------------------------------


def _labels(*masks: np.ndarray, ids: tuple[int, ...] | None = None, dtype: type = np.uint16) -> np.ndarray:
    out = np.zeros(masks[0].shape, dtype=dtype)
    for v, m in zip(ids or range(1, len(masks) + 1), masks):
        out[m] = v
    return out


SHAPE = (30, 30)
A, B, C = square(SHAPE, 2, 2, 10, 10), square(SHAPE, 15, 15, 8, 6), square(SHAPE, 2, 20, 5, 5)


def test_thresholds() -> None:
    assert THRESHOLDS == T


def test_identical() -> None:
    labels = _labels(A, B, C)
    s = image_score(labels, labels)
    assert s.score == 1.0
    assert s.tp.tolist() == [3] * 10 and s.fp.tolist() == [0] * 10 and s.fn.tolist() == [0] * 10


def test_one_missing_object() -> None:
    s = image_score(_labels(A, B), _labels(A))
    assert s.tp.tolist() == [1] * 10 and s.fn.tolist() == [1] * 10 and s.fp.tolist() == [0] * 10
    assert s.score == 0.5


def test_split_in_halves_matches_nothing() -> None:
    left, right = square(SHAPE, 2, 2, 10, 5), square(SHAPE, 2, 7, 10, 5)  # IoU 50/100 = 0.5, not > 0.5
    s = image_score(_labels(A), _labels(left, right))
    assert s.tp.tolist() == [0] * 10 and s.fp.tolist() == [2] * 10 and s.fn.tolist() == [1] * 10
    assert s.score == 0.0


def test_split_60_40() -> None:
    big, small = square(SHAPE, 2, 2, 10, 6), square(SHAPE, 2, 8, 10, 4)  # IoUs 0.6 and 0.4
    s = image_score(_labels(A), _labels(big, small))
    # t = 0.50, 0.55: TP 1, FP 1, FN 0 -> 0.5; t >= 0.60: 0.6 is not > 0.6 -> TP 0, FP 2, FN 1 -> 0
    assert s.tp.tolist() == [1, 1] + [0] * 8
    assert s.scores_per_threshold.tolist() == [0.5, 0.5] + [0.0] * 8
    assert s.score == pytest.approx(0.1)


def test_shifted_square() -> None:
    shifted = square(SHAPE, 2, 3, 10, 10)  # IoU 90/110 = 0.818: matches at 0.50 .. 0.80
    s = image_score(_labels(A), _labels(shifted))
    assert s.tp.tolist() == [1] * 7 + [0] * 3
    assert s.score == pytest.approx(0.7)
    np.testing.assert_allclose(dense(iou_matrix(_labels(A), _labels(shifted))), [[90 / 110]])


def test_empty_cases() -> None:
    empty, labels = np.zeros(SHAPE, np.uint16), _labels(A, B)
    assert image_score(empty, empty).score == 1.0  # nothing to find, nothing found
    assert image_score(np.zeros((0, 4), np.uint8), np.zeros((0, 4), np.uint8)).score == 1.0
    assert image_score(labels, empty).score == 0.0
    assert image_score(empty, labels).score == 0.0
    assert image_score(labels, empty).fn.tolist() == [2] * 10
    assert image_score(empty, labels).fp.tolist() == [2] * 10
    assert image_score_masks([], []).score == 1.0
    assert image_score_masks([A], []).score == 0.0
    assert image_score_masks(np.zeros((0, *SHAPE), bool), [A]).score == 0.0
    assert image_score_masks([A, np.zeros(SHAPE, bool)], [A]).score == 1.0  # an empty mask is no instance


def test_non_consecutive_labels() -> None:
    true = _labels(A, B, C, ids=(3, 70, 65535))
    pred = _labels(C, A, B, ids=(1, 9, 200))
    assert image_score(true, pred).score == 1.0
    ious = iou_matrix(true, pred)
    assert ious.true_ids.tolist() == [3, 70, 65535] and ious.pred_ids.tolist() == [1, 9, 200]
    assert sorted(zip(ious.rows.tolist(), ious.cols.tolist())) == [(0, 1), (1, 2), (2, 0)]
    # huge ids take the np.unique path; an image without background too
    huge = _labels(A, B, ids=(10**12, 7), dtype=np.int64)
    assert image_score(huge, _labels(A)).score == 0.5
    full = np.where(A, 10**12, 5).astype(np.int64)
    assert image_score(full, np.where(A, 1, 2).astype(np.uint8)).score == 1.0


def test_invalid_label_images() -> None:
    labels = _labels(A)
    with pytest.raises(DataError, match="shape"):
        image_score(labels, labels[:-1])
    with pytest.raises(DataError, match="integer"):
        image_score(labels.astype(float), labels)
    with pytest.raises(DataError, match="negative"):
        image_score(labels, -labels.astype(np.int32))
    with pytest.raises(DataError, match="2-D"):
        image_score(labels[None], labels[None])


def test_overlapping_masks_greedy() -> None:
    near = square(SHAPE, 2, 2, 9, 10)  # IoU 0.9 with A
    nearer_miss = square(SHAPE, 2, 2, 8, 10)  # IoU 0.8 with A, overlaps `near`
    s = image_score_masks([A], [nearer_miss, near])
    # greedy gives A to `near`; the other is a FP. t <= 0.85: TP 1 FP 1 -> 0.5; t = 0.9, 0.95: TP 0 FP 2 FN 1
    assert s.tp.tolist() == [1] * 8 + [0] * 2
    assert s.fp.tolist() == [1] * 8 + [2] * 2
    assert s.score == pytest.approx(0.4)
    np.testing.assert_allclose(dense(mask_iou_matrix([A], [nearer_miss, near])), [[0.8, 0.9]])


def test_competition_score_accumulator() -> None:
    acc = CompetitionScore()
    acc.add(_labels(A), _labels(A), group="astro")
    acc.add(_labels(A), _labels(square(SHAPE, 2, 3, 10, 10)), group="astro")
    acc.add(_labels(A), np.zeros(SHAPE, np.uint16), group="cort")  # a missed object scores 0
    acc.add(_labels(A, B), _labels(A))
    result = acc.result()
    assert result["score"] == pytest.approx((1 + 0.7 + 0 + 0.5) / 4)
    assert result["n_images"] == 4
    assert result["score/astro"] == pytest.approx(0.85) and result["n_images/astro"] == 2
    assert result["score/cort"] == 0.0 and result["n_images/cort"] == 1
    per_t = acc.per_threshold("astro")
    assert list(per_t) == list(T)
    assert list(per_t.values()) == pytest.approx([1.0] * 7 + [0.5] * 3)
    with pytest.raises(DataError):
        CompetitionScore().result()
    two = CompetitionScore()
    for true, pred in ((_labels(A), _labels(A)), (_labels(A, B), _labels(A))):
        two.add(true, pred)
    assert two.result()["score"] == pytest.approx(0.75)


# --- competition metric: sparse against the dense baseline ------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_label_images_match_dense_baseline(seed: int) -> None:
    rng = np.random.default_rng(seed)
    true = random_labels(rng, (24, 20), int(rng.integers(0, 12)))
    pred = perturb(rng, true) if rng.random() < 0.8 else random_labels(rng, (24, 20), 8)
    true_m, pred_m = to_masks(true), to_masks(pred)
    assert image_score(true, pred).score == pytest.approx(dense_score(true_m, pred_m), abs=1e-12)
    ious = dense(iou_matrix(true, pred))
    np.testing.assert_allclose(ious, dense_ious(true_m, pred_m))
    # the mask-list variant agrees with label images when masks do not overlap
    by_masks, by_labels = image_score_masks(true_m, pred_m), image_score(true, pred)
    assert by_masks.tp.tolist() == by_labels.tp.tolist()
    assert by_masks.fp.tolist() == by_labels.fp.tolist()
    assert by_masks.fn.tolist() == by_labels.fn.tolist()


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, (6, 7), elements=st.integers(0, 4)), arrays(np.uint8, (6, 7), elements=st.integers(0, 4)))
def test_pixel_noise_matches_dense_baseline(true: np.ndarray, pred: np.ndarray) -> None:
    """Fragmented instances: IoUs land exactly on thresholds (e.g. 0.5, 0.6) more often than with shapes."""
    assert image_score(true, pred).score == pytest.approx(dense_score(to_masks(true), to_masks(pred)), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_overlapping_masks_match_dense_baseline(seed: int) -> None:
    rng = np.random.default_rng(seed)

    def masks(n: int) -> list[np.ndarray]:
        return [square((16, 16), *rng.integers(0, 14, size=2), *rng.integers(1, 7, size=2)) for _ in range(n)]

    true = masks(int(rng.integers(0, 8)))
    copies = [m for m in true for _ in range(rng.integers(0, 3))]
    pred = [np.roll(m, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1)) for m in copies]
    pred += masks(int(rng.integers(0, 4)))  # near-duplicates above compete for one truth: greedy order matters
    expected = dense_score(true, pred)
    assert image_score_masks(true, pred).score == pytest.approx(expected, abs=1e-12)
    if true:
        assert image_score_masks(np.stack(true), pred).score == pytest.approx(expected, abs=1e-12)


# --- the real sample ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_masks() -> list[np.ndarray]:
    import pandas as pd

    table = pd.read_csv(REAL / "train.csv")
    return [rle.decode(r.annotation, (int(r.height), int(r.width))) for r in table.itertuples()]


@needs_real
def test_real_sample_against_itself(real_masks: list[np.ndarray]) -> None:
    s = image_score_masks(real_masks, real_masks)
    assert s.score == 1.0 and s.tp.tolist() == [len(real_masks)] * 10


@needs_real
def test_real_sample_perturbed_matches_dense_baseline(real_masks: list[np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    shifted = [np.roll(m, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1)) for m in real_masks]
    score = image_score_masks(real_masks, shifted).score
    assert 0.0 < score < 1.0
    assert score == pytest.approx(dense_score(real_masks, shifted), abs=1e-12)


@needs_real
def test_real_label_image_agrees_with_masks(real_masks: list[np.ndarray]) -> None:
    labels = np.zeros(real_masks[0].shape, np.uint16)
    for i, m in enumerate(real_masks, start=1):
        labels[m] = i  # overlaps go to the later mask
    shifted = np.roll(labels, 1, axis=1)
    by_labels = image_score(labels, shifted)
    assert 0.0 < by_labels.score < 1.0
    assert by_labels.tp.tolist() == image_score_masks(to_masks(labels), to_masks(shifted)).tp.tolist()


# --- COCO AP -----------------------------------------------------------------------------------------


def _encode(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}


def _coco(images: list[list[np.ndarray]], categories: tuple[int, ...] = (1, 2)) -> dict:
    gt: dict = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    for image_id, masks in enumerate(images, start=1):
        h, w = masks[0].shape
        gt["images"].append({"id": image_id, "height": h, "width": w})
        for k, m in enumerate(masks):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": categories[k % len(categories)],
                    "segmentation": _encode(m),
                }
            )
    return gt


def _as_results(gt: dict, **extra: object) -> list[dict]:
    keys = ("image_id", "category_id", "segmentation")
    return [{**{k: a[k] for k in keys}, "score": 1.0, **extra} for a in gt["annotations"]]


def test_coco_ap_perfect_and_empty() -> None:
    gt = _coco([[A, B, C], [B, C]])
    before = copy.deepcopy(gt)
    results = _as_results(gt)
    perfect = coco_ap(gt, results)
    for key in ("AP", "AP50", "AP75", "AP_small", "AR@100", "AR"):
        assert perfect[key] == pytest.approx(1.0), key
    assert np.isnan(perfect["AP_large"])  # no ground truth above 96² pixels
    assert gt == before and "area" not in results[0]  # inputs are not modified
    empty = coco_ap(gt, [])
    assert empty["AP"] == 0.0 and empty["AP50"] == 0.0 and empty["AR"] == 0.0


def test_coco_ap_class_agnostic_and_bbox() -> None:
    gt = _coco([[A, B, C]])
    wrong_class = _as_results(gt, category_id=2)
    assert coco_ap(gt, wrong_class)["AP"] < 1.0
    assert coco_ap(gt, wrong_class, class_agnostic=True)["AP"] == pytest.approx(1.0)
    boxes = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
         "bbox": mask_utils.toBbox(a["segmentation"]).tolist()}
        for a in gt["annotations"]
    ]
    assert coco_ap(gt, boxes, iou_type="bbox")["AP"] == pytest.approx(1.0)


def test_coco_ap_counts_more_than_100_detections() -> None:
    cells = [square((128, 128), r, c, 5, 5) for r in range(0, 120, 8) for c in range(0, 80, 8)]  # 150 cells
    gt = _coco([cells], categories=(1,))
    results = _as_results(gt)
    assert coco_ap(gt, results)["AP"] == pytest.approx(1.0)
    assert coco_ap(gt, results, max_dets=100)["AR"] == pytest.approx(100 / 150)
    # AP@100 is COCO's default limit, reported beside AP at MAX_DETS: a third of these cells are past it
    assert MAX_DETS == 2000 and coco_ap(gt, results)["AP@100"] < 0.7


def test_coco_ap_errors() -> None:
    gt = _coco([[A]])
    with pytest.raises(ParamsError):
        coco_ap(gt, [], iou_type="keypoints")
    with pytest.raises(ParamsError):
        coco_ap(gt, [], max_dets=10)
    with pytest.raises(DataError, match="absent"):
        coco_ap(gt, [{"image_id": 9, "category_id": 1, "segmentation": _encode(A), "score": 1.0}])
    with pytest.raises(DataError, match="lacks"):
        coco_ap({"images": []}, [])
    polygon = {**gt, "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]}]}
    with pytest.raises(DataError, match="compressed RLE"):
        coco_ap(polygon, [])


@needs_real
def test_coco_ap_real_sample(real_masks: list[np.ndarray]) -> None:
    gt = _coco([real_masks], categories=(1,))
    assert coco_ap(gt, _as_results(gt))["AP"] == pytest.approx(1.0)
