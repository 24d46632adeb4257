"""Mask R-CNN's detections of one image before post-processing (what the tune stage's search and test-time
augmentation work on)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Detections:
    """One image's detections, by decreasing score: category ids, scores, boxes (``x0, y0, x1, y1``, pixels), the
    windows (integer ``x0, y0, x1, y1``, exclusive) outside which their soft masks are zero, and the soft masks
    inside them, as uint8 ``round(255 × probability)``."""

    shape: tuple[int, int]
    classes: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    windows: np.ndarray
    masks: list[np.ndarray] = field(repr=False)
