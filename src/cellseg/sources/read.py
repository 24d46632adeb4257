"""One entry to every data source: the reader that params ``data.source`` names."""

from __future__ import annotations

from pathlib import Path

from cellseg.sources import SourceData, subset
from cellseg.sources.coco import read_livecell
from cellseg.sources.kaggle import read_kaggle

READERS = {"kaggle": read_kaggle, "synthetic": read_kaggle, "livecell": read_livecell}


def load_source(source: str, root: str | Path, *, limit_images: int | None = None, seed: int = 0) -> SourceData:
    """Read the data set at ``root`` in the format named by ``source`` and take the subset asked for."""
    return subset(READERS[source](root), limit_images, seed)
