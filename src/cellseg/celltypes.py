"""The cell types, their category ids and the per-cell-type params: the one place that numbers them and
looks them up (imports nothing of cellseg)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

CELL_TYPES: tuple[str, ...] = ("shsy5y", "astro", "cort")
UNKNOWN_CLASS = 0  # the category of an image or cell no model named
CATEGORY_IDS: dict[str, int] = {name: k + 1 for k, name in enumerate(CELL_TYPES)}  # COCO ids: 1, 2, 3
DEFAULT = "default"  # the key of a per-cell-type param that serves every cell type it does not name

V = TypeVar("V")


def category_id(cell_type: str) -> int:
    """The category id of ``cell_type`` (1 + its index in :data:`CELL_TYPES`)."""
    return CATEGORY_IDS[cell_type]


def cell_type(category: int) -> str | None:
    """The cell type of a category id, or None for :data:`UNKNOWN_CLASS`."""
    return CELL_TYPES[category - 1] if category != UNKNOWN_CLASS else None


def per_type(values: Mapping[str, V], name: str) -> V:
    """A per-cell-type param's value for the cell type ``name``: its own entry, else the :data:`DEFAULT` one
    (the params validation makes sure that one of them is there)."""
    return values[name] if name in values else values[DEFAULT]


def by_type(values: Mapping[str, V]) -> dict[str, V]:
    """A per-cell-type param spelt out: one entry per cell type."""
    return {name: per_type(values, name) for name in CELL_TYPES}


def by_category(values: Mapping[str, V], unknown: V) -> list[V]:
    """A per-cell-type param as a table indexed by category id; :data:`UNKNOWN_CLASS` gets ``unknown``."""
    return [unknown, *(per_type(values, name) for name in CELL_TYPES)]
