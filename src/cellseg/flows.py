"""Cellpose's flow representation of cells, through the ``cellpose`` package's own dynamics.

Each pixel of a cell holds the unit vector along which heat diffuses from the cell's centre; following the
vectors brings every pixel of one cell to one point, which is how cells come back from a network's output.
Flow arrays are (2, H, W): dy (downwards) then dx (rightwards), cellpose's order. The 8 symmetries of the pixel
grid move a flow field's pixels and turn its vectors (:class:`Symmetry`), for augmentation and test-time
augmentation alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cellpose import dynamics
from tqdm import tqdm

from cellseg.decode import LABELS_DIR
from cellseg.errors import DataError
from cellseg.io import atomic_path, read_labels

log = logging.getLogger(__name__)

FLOW_SCALE = 5.0  # the network predicts 5 × the unit flows, as cellpose trains it (compute_masks divides by 5)
NITER = 200  # steps of following the flows (cellpose's default)
CPU = torch.device("cpu")


def flows_from_labels(labels: np.ndarray) -> np.ndarray:
    """The (2, H, W) float32 unit flows of an instance label image (zero on background): cellpose's
    ``masks_to_flows_gpu``, on the CPU."""
    flows, _ = dynamics.masks_to_flows_gpu(labels.astype(np.int64), device=CPU)
    return flows.astype(np.float32)


def masks_from_flows(flows: np.ndarray, cellprob: np.ndarray, *, cellprob_threshold: float) -> np.ndarray:
    """Instances (a label image, labelled 1..n) from network-scale flows (2, H, W; × :data:`FLOW_SCALE`) and
    cell-probability logits (H, W): cellpose's ``compute_masks``, without its flow-error check
    (:func:`flow_errors`). Pixels with a logit above ``cellprob_threshold`` follow the flows."""
    return dynamics.compute_masks(
        flows.astype(np.float32), cellprob.astype(np.float32), niter=NITER, cellprob_threshold=cellprob_threshold,
        flow_threshold=0.0, min_size=-1, device=CPU,
    )


def flow_errors(masks: np.ndarray, flows: np.ndarray) -> np.ndarray:
    """Each instance's flow error (instance k at label k + 1 of ``masks``, labelled 1..n): how far the network's
    flows (network scale) are from the flows of the instance's own mask, cellpose's ``flow_error``. Cellpose's
    ``flow_threshold`` drops the instances whose error is above it (0.4 by default; about 15× the time of
    :func:`masks_from_flows` on the CPU)."""
    if not masks.max(initial=0):
        return np.zeros(0, dtype=np.float32)
    errors, _ = dynamics.flow_error(masks, flows.astype(np.float32), device=CPU)
    return np.asarray(errors, dtype=np.float32)


def flows_file(flows_dir: Path, image_id: str) -> Path:
    """Where the flows stage keeps one image's flows."""
    return Path(flows_dir) / f"{image_id}.npz"


def write_flows(decoded_dir: Path, image_ids: Iterable[str], out: Path) -> None:
    """The :func:`flows_from_labels` of each image's decoded label image, into the folder ``out`` (written
    atomically as a whole), one compressed float16 ``<id>.npz`` each; ``image_ids`` may be empty."""
    image_ids = list(image_ids)
    with atomic_path(out, directory=True) as tmp:
        for image_id in tqdm(image_ids, desc="flows", unit="img"):
            labels = read_labels(Path(decoded_dir) / LABELS_DIR / f"{image_id}.png")
            np.savez_compressed(flows_file(tmp, image_id), flows=flows_from_labels(labels).astype(np.float16))
    log.info("wrote the flows of %d images to %s", len(image_ids), out)


def read_flows(flows_dir: Path, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The (2, H, W) float16 flows the flows stage wrote for ``image_id``; a missing or misshapen file raises
    :class:`DataError`."""
    path = flows_file(flows_dir, image_id)
    try:
        with np.load(path) as archive:
            flows = archive["flows"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: no flows for image {image_id!r} ({type(exc).__name__}); rerun the flows stage") from None
    if flows.shape != (2, *shape):
        raise DataError(f"{path}: flows of shape {flows.shape}, but image {image_id!r} is {shape}")
    return flows


@dataclass(frozen=True)
class Symmetry:
    """One of the 8 symmetries of the pixel grid: ``x ↦ rot90(fliplr(x) if flip else x, turns)`` on the last
    two axes (``numpy.rot90``: counter-clockwise)."""

    flip: bool
    turns: int

    def apply(self, maps: np.ndarray, vectors: bool = False) -> np.ndarray:
        """``maps`` (…, H, W) moved; with ``vectors``, channels 0 and 1 of the first axis are (dy, dx) and turn too."""
        out = np.flip(maps, -1) if self.flip else maps
        out = np.ascontiguousarray(np.rot90(out, self.turns, axes=(-2, -1)))
        if vectors:
            out[:2] = np.stack(self.turn_vectors(out[0], out[1]))
        return out

    def turn_vectors(self, dy: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The components (dy, dx) of vectors after this symmetry (their pixels stay where they are)."""
        if self.flip:
            dx = -dx
        for _ in range(self.turns % 4):  # a quarter turn counter-clockwise: right becomes up
            dy, dx = -dx, dy
        return dy, dx

    def inverse(self) -> Symmetry:
        """The symmetry that undoes this one (a flip turns a rotation the other way)."""
        return Symmetry(self.flip, self.turns % 4 if self.flip else -self.turns % 4)


SYMMETRIES = tuple(Symmetry(flip, turns) for flip in (False, True) for turns in range(4))

# albumentations' geometric transforms as grid symmetries (``factor``: RandomRotate90's quarter turns).
_ALBUMENTATIONS = {
    "HorizontalFlip": lambda params: Symmetry(True, 0),
    "VerticalFlip": lambda params: Symmetry(True, 2),
    "Transpose": lambda params: Symmetry(True, 1),
    "RandomRotate90": lambda params: Symmetry(False, int(params["factor"])),
}


def turn_applied(target: np.ndarray, applied: Iterable[tuple[str, dict]]) -> np.ndarray:
    """Turn the vectors of an augmented (H, W, C) target whose channels 0 and 1 are (dy, dx), as the
    ``applied`` transforms (albumentations' ``applied_transforms``, in order) moved its pixels. (Only grid
    symmetries may move a flow target's pixels: config refuses other geometric augmentations with flows.)"""
    dy, dx = target[..., 0], target[..., 1]
    for name, params in applied:
        if name in _ALBUMENTATIONS:
            dy, dx = _ALBUMENTATIONS[name](params).turn_vectors(dy, dx)
    out = target.copy()
    out[..., :2] = np.stack([dy, dx], axis=-1)
    return out
