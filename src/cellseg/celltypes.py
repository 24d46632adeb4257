"""The cell types and their category ids: the one place that numbers them (imports nothing of cellseg)."""

from __future__ import annotations

CELL_TYPES: tuple[str, ...] = ("shsy5y", "astro", "cort")
UNKNOWN_CLASS = 0  # the category of an image or cell no model named
CATEGORY_IDS: dict[str, int] = {name: k + 1 for k, name in enumerate(CELL_TYPES)}  # COCO ids: 1, 2, 3


def category_id(cell_type: str) -> int:
    """The category id of ``cell_type`` (1 + its index in :data:`CELL_TYPES`)."""
    return CATEGORY_IDS[cell_type]


def cell_type(category: int) -> str | None:
    """The cell type of a category id, or None for :data:`UNKNOWN_CLASS`."""
    return CELL_TYPES[category - 1] if category != UNKNOWN_CLASS else None
