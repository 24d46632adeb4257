"""A small hand-made label image for tests of flows and test-time augmentation."""

from __future__ import annotations

import numpy as np


def cells() -> np.ndarray:
    """A 48×64 label image: an L-shaped cell (no symmetry of the grid maps it onto itself), a disc touching it
    and a bar."""
    labels = np.zeros((48, 64), dtype=np.uint16)
    labels[4:36, 6:14] = 1
    labels[28:36, 6:30] = 1
    yy, xx = np.mgrid[:48, :64]
    labels[(yy - 18) ** 2 + (xx - 24) ** 2 < 60] = 2
    labels[40:44, 30:60] = 3
    return labels
