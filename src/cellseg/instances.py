"""What every model's predictor gives: :class:`Instances` per image, and the :class:`Predictor` interface.

An image's instances are a non-overlapping uint16 label image plus, per instance, a category id
(:mod:`cellseg.celltypes`) and a confidence, and the category the model gives the whole image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cellseg.celltypes import UNKNOWN_CLASS, cell_type

MAX_LABEL = int(np.iinfo(np.uint16).max)  # the most instances a uint16 label image holds
IMAGE_SHAPE = (520, 704)  # (height, width) of the competition images: what every model is trained on and given


@dataclass(frozen=True)
class Instances:
    """One image's instances: ``labels`` (uint16 H×W, instance k at label k+1; uint32 past :data:`MAX_LABEL`
    instances, which only a large image of ``cellseg predict`` holds), ``classes`` and ``scores`` per k,
    and ``image_class``, the category the model gives the whole image (:data:`UNKNOWN_CLASS` if none)."""

    labels: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    image_class: int = UNKNOWN_CLASS

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def image_type(self) -> str | None:
        """The cell type the model gives the image, or None."""
        return cell_type(self.image_class)


def majority_class(classes: np.ndarray) -> int:
    """The most frequent category of an image's cells (ties: the lowest id), or :data:`UNKNOWN_CLASS` if none."""
    return int(np.bincount(classes).argmax()) if len(classes) else UNKNOWN_CLASS


class Predictor(Protocol):
    """A trained model ready to segment whole grey images."""

    name: str

    def predict(self, images: Sequence[np.ndarray]) -> list[Instances]:
        """Instances of each uint8 H×W image."""
