"""Shared fixtures: the real Sartorius samples and a tiny hand-made Kaggle-format directory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cellseg import rle
from cellseg.data import PatchDataset, WholeImageDataset
from cellseg.sources.kaggle import CSV_COLUMNS
from helpers.fit_job import datasets, make_data

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the cores shared among the N workers
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
REAL = REPO.parent / "shared" / "real"
SARTORIUS = REPO.parent / "shared" / "sartorius"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """``../shared/real``: one real image and its 395 annotations (skipped when absent)."""
    if not (REAL / "train.csv").is_file():
        pytest.skip(f"real Sartorius samples not found at {REAL}")
    return REAL


@pytest.fixture(scope="session")
def sartorius_dir() -> Path:
    """``../shared/sartorius``: the 361 real annotated training images in the Kaggle layout (skipped when absent)."""
    if not (SARTORIUS / "train.csv").is_file():
        pytest.skip(f"real Sartorius training set not found at {SARTORIUS}")
    return SARTORIUS


def tiny_masks(cell_type: str, shape: tuple[int, int], seed: int) -> list[np.ndarray]:
    """A few rectangular cells, two of them overlapping by a few pixels."""
    rng = np.random.default_rng(seed)
    masks = []
    for k in range(3):
        mask = np.zeros(shape, dtype=bool)
        y, x = 4 + 8 * k, int(rng.integers(2, shape[1] - 14))
        mask[y : y + 6 + k, x : x + 10] = True
        masks.append(mask)
    masks[1][masks[0].any(axis=1)] = False  # no overlap between 0 and 1 ...
    masks[2][10:14, masks[1].any(axis=0)] = True  # ... but 2 reaches into 1
    return masks


@pytest.fixture
def make_kaggle(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write a Kaggle-format directory of small images (2 per cell type, 3 samples per type)."""

    def make(name: str = "kaggle", images_per_type: int = 2, shape: tuple[int, int] = (40, 48)) -> Path:
        root = tmp_path / name
        (root / "train").mkdir(parents=True)
        rows = []
        for t, cell_type in enumerate(("shsy5y", "astro", "cort")):
            for i in range(images_per_type):
                image_id = f"{cell_type[:2]}{t}{i:09x}"
                pixels = np.random.default_rng(10 * t + i).integers(60, 200, size=shape, dtype=np.uint8)
                Image.fromarray(pixels).save(root / "train" / f"{image_id}.png")
                for mask in tiny_masks(cell_type, shape, 10 * t + i):
                    rows.append(
                        {
                            "id": image_id,
                            "annotation": rle.encode(mask),
                            "width": shape[1],
                            "height": shape[0],
                            "cell_type": cell_type,
                            "plate_time": f"{10 + i}h00m00s",
                            "sample_date": "2020-01-01",
                            "sample_id": f"{cell_type}_A{i % 3}-1_Vessel-1_Ph_1",
                            "elapsed_timedelta": f"0 days {10 + i}:00:00",
                        }
                    )
        pd.DataFrame(rows, columns=list(CSV_COLUMNS)).to_csv(root / "train.csv", index=False)
        return root

    return make


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module: on a shared 2-core machine two intra-op threads make a tiny network's
    backward pass ~30× slower, and one thread makes every run bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For the trainer's tests: 3 synthetic images, decoded, with a 64-pixel patch index of the first two."""
    return make_data(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def sets(data_root: Path) -> tuple[PatchDataset, WholeImageDataset]:
    """The trainer's tests' (training patches, validation images) of :func:`data_root`."""
    return datasets(data_root)
