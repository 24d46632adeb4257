"""Training data: 3-class U-Net targets, an in-memory image store shared by both models, datasets.

The boundary target has three classes: 0 background, 1 cell interior, 2 cell boundary (the pixels of a cell
that touch another cell or the background), so that touching cells stay apart once the interior is split into
instances. A flow target (:mod:`cellseg.flows`) is an (H, W, 3) float map whose channels 0 and 1 are vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from skimage.segmentation import find_boundaries
from torch.utils.data import Dataset, get_worker_info
from tqdm import tqdm

from cellseg.decode import IMAGES_TABLE, LABELS_DIR
from cellseg.errors import DataError
from cellseg.flows import turn_applied
from cellseg.io import read_gray, read_labels
from cellseg.celltypes import CELL_TYPES

log = logging.getLogger(__name__)

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
N_CLASSES = 3
IGNORE_INDEX = 255


def targets_from_labels(labels: np.ndarray, boundary_width: int) -> np.ndarray:
    """The uint8 class map of an instance label image: 0 background, 1 interior, 2 boundary.

    Boundary pixels are a cell's own pixels next to another label or the background (4-connectivity),
    grown inwards to ``boundary_width`` pixels; background pixels are never boundary.
    """
    foreground = labels > 0
    boundary = find_boundaries(labels, mode="inner")
    if boundary_width > 1:
        boundary = ndimage.binary_dilation(boundary, iterations=boundary_width - 1, mask=foreground)
    targets = np.where(foreground, INTERIOR, BACKGROUND).astype(np.uint8)
    targets[boundary] = BOUNDARY
    return targets


PixelTargets = Callable[[str, np.ndarray], np.ndarray]  # (image id, its label image) → the U-Net's pixel targets


class ImageStore:
    """Every listed image and its label image, read once and held in memory; given ``targets`` (the U-Net's
    :data:`PixelTargets`), their pixel targets too."""

    def __init__(
        self, data_root: Path, decoded_dir: Path, image_ids: Sequence[str], targets: PixelTargets | None = None
    ) -> None:
        data_root, decoded_dir = Path(data_root), Path(decoded_dir)
        table = _image_table(decoded_dir, image_ids)
        self._images: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._targets: dict[str, np.ndarray] = {}
        self._cell_types: dict[str, str] = {}
        for row in tqdm(table.itertuples(index=False), total=len(table), desc="load images", unit="img"):
            image = read_gray(data_root / row.file_name)
            labels = _read_label_file(decoded_dir / LABELS_DIR / f"{row.image_id}.png", image.shape)
            arrays = [(self._images, image), (self._labels, labels)]
            if targets is not None:
                arrays.append((self._targets, targets(row.image_id, labels)))
            for held, array in arrays:
                array.flags.writeable = False  # crops are views: nothing may alter the cache
                held[row.image_id] = array
            self._cell_types[row.image_id] = str(row.cell_type)
        log.info("loaded %d images into memory (%.0f MB)", len(table), self.nbytes / 2**20)

    @property
    def image_ids(self) -> list[str]:
        """The ids held, in the order given."""
        return list(self._images)

    @property
    def nbytes(self) -> int:
        """Bytes held by the images, label images and targets."""
        arrays = (*self._images.values(), *self._labels.values(), *self._targets.values())
        return sum(a.nbytes for a in arrays)

    def image(self, image_id: str) -> np.ndarray:
        """The uint8 H×W image."""
        return self._get(self._images, image_id)

    def labels(self, image_id: str) -> np.ndarray:
        """The uint16 H×W instance label image."""
        return self._get(self._labels, image_id)

    def targets(self, image_id: str) -> np.ndarray:
        """The image's pixel targets (H×W classes or an H×W×C flow map); only a store given ``targets`` has them."""
        if not self._targets:
            raise DataError("this image store holds no U-Net targets (it was given no pixel targets)")
        return self._get(self._targets, image_id)

    def cell_type(self, image_id: str) -> str:
        """The image's cell type."""
        return self._get(self._cell_types, image_id)

    def _get(self, mapping: dict[str, Any], image_id: str) -> Any:
        try:
            return mapping[image_id]
        except KeyError:
            raise DataError(f"image {image_id!r} is not in the image store") from None


def _image_table(decoded_dir: Path, image_ids: Sequence[str]) -> pd.DataFrame:
    """The ``images.parquet`` rows of ``image_ids`` (in the order given, without duplicates)."""
    path = decoded_dir / IMAGES_TABLE
    if not path.is_file():
        raise DataError(f"{path}: decoded image table is missing")
    table = pd.read_parquet(path, columns=["image_id", "file_name", "cell_type"]).drop_duplicates("image_id")
    ids = list(dict.fromkeys(image_ids))
    missing = sorted(set(ids) - set(table["image_id"]))
    if missing:
        raise DataError(f"{path}: {len(missing)} requested image id(s) missing, e.g. {missing[:5]}")
    return table.set_index("image_id").loc[ids].reset_index()


def _read_label_file(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: label image is missing")
    labels = read_labels(path)
    if labels.shape != shape:
        raise DataError(f"{path}: label image is {labels.shape} but its image is {shape}")
    return labels


def normalize(image_uint8: np.ndarray, mean: float, std: float, channels: int) -> torch.Tensor:
    """A float32 C×H×W tensor ``(image / 255 - mean) / std``, the grey channel repeated ``channels`` times.

    ``mean`` and ``std`` are on the [0, 1] scale.
    """
    grey = torch.from_numpy(image_uint8.astype(np.float32)).div_(255.0).sub_(mean).div_(std)
    return grey.unsqueeze(0).repeat(channels, 1, 1)


def padded_input(
    image_uint8: np.ndarray, mean: float, std: float, channels: int, multiple: int = 32
) -> tuple[torch.Tensor, tuple[tuple[int, int], tuple[int, int]]]:
    """A whole image as the network's input: reflect-padded at the bottom/right to multiples of ``multiple``
    (the U-Net's stride) and :func:`normalize`-d; also the padding, in :func:`numpy.pad`'s form."""
    height, width = image_uint8.shape
    pad = ((0, -height % multiple), (0, -width % multiple))
    return normalize(np.pad(image_uint8, pad, mode="reflect"), mean, std, channels), pad


class AugmentedDataset(Dataset):
    """A dataset whose ``augment`` (an albumentations pipeline, or None) draws reproducibly.

    In DataLoader workers it is reseeded from the worker's seed on first use, so that workers draw different
    (and, under ``torch.manual_seed``, reproducible) augmentations. In the main process (``workers: 0``) the
    trainer reseeds it before each epoch through :meth:`set_epoch`, so that a resumed training draws what an
    uninterrupted one would.
    """

    augment: A.Compose | None = None
    _seeded_worker: int | None = None

    def set_epoch(self, seed: int) -> None:
        """Reseed the augmentation for the epoch about to start (``seed`` differs between epochs)."""
        if self.augment is not None:
            self.augment.set_random_seed(seed % 2**32)

    def _seed_worker(self) -> None:
        info = get_worker_info()
        if self.augment is not None and info is not None and self._seeded_worker != info.id:
            self.augment.set_random_seed(info.seed % 2**32)
            self._seeded_worker = info.id


class PatchDataset(AugmentedDataset):
    """Square training windows (an index from :func:`cellseg.patches.sample_patches`) cropped from an
    :class:`ImageStore`, augmented (image and target together) as :class:`AugmentedDataset` says."""

    def __init__(
        self,
        index: pd.DataFrame,
        store: ImageStore,
        augment: A.Compose | None,
        mean: float,
        std: float,
        channels: int,
    ) -> None:
        self._image_ids = index["image_id"].to_numpy(object)
        self._x0 = index["x0"].to_numpy(np.int64)
        self._y0 = index["y0"].to_numpy(np.int64)
        self._size = index["size"].to_numpy(np.int64)
        self._types = _type_ids(index["cell_type"], "patch index")
        self.store = store
        self.augment = augment
        self.mean, self.std, self.channels = mean, std, channels
        self._check_windows()

    def _check_windows(self) -> None:
        ids, which = np.unique(self._image_ids.astype(str), return_inverse=True)
        shapes = np.array([self.store.image(image_id).shape for image_id in ids], dtype=np.int64).reshape(-1, 2)
        height, width = shapes[which, 0], shapes[which, 1]
        outside = (self._x0 < 0) | (self._y0 < 0) | (self._x0 + self._size > width) | (self._y0 + self._size > height)
        if outside.any():
            i = int(np.argmax(outside))
            raise DataError(
                f"patch index: row {i} (image {self._image_ids[i]}, x0={self._x0[i]}, y0={self._y0[i]}, "
                f"size={self._size[i]}) lies outside its {width[i]}x{height[i]} image"
            )

    def __len__(self) -> int:
        return len(self._image_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image_id, x0, y0, size = self._image_ids[i], self._x0[i], self._y0[i], self._size[i]
        window = (slice(y0, y0 + size), slice(x0, x0 + size))
        image, target = self.store.image(image_id)[window], self.store.targets(image_id)[window]
        if self.augment is not None:
            self._seed_worker()
            out = self.augment(image=image, mask=target)
            image, target = out["image"], out["mask"]
            if target.ndim == 3:  # a flow map: its vectors turn as its pixels moved
                target = turn_applied(target, out["applied_transforms"])
        return {
            "image": normalize(image, self.mean, self.std, self.channels),
            "target": target_tensor(target),
            "type": torch.tensor(self._types[i]),
        }


def target_tensor(target: np.ndarray) -> torch.Tensor:
    """Pixel targets as the loss takes them: classes as int64 H×W, a flow map as float32 C×H×W."""
    if target.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(target.transpose(2, 0, 1), dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(target, dtype=np.int64))


def _type_ids(cell_types: pd.Series, what: str) -> np.ndarray:
    """Index of each cell type in :data:`~cellseg.sources.CELL_TYPES` (the type head's classes)."""
    ids = pd.Categorical(cell_types, categories=list(CELL_TYPES)).codes.astype(np.int64)
    if (ids < 0).any():
        raise DataError(f"{what}: unknown cell type {cell_types[ids < 0].iloc[0]!r}; expected one of {', '.join(CELL_TYPES)}")
    return ids


class WholeImageDataset(Dataset):
    """Whole images for validation, padded at the bottom/right to a multiple of ``pad_multiple``.

    The image is reflect-padded, the target padded with :data:`IGNORE_INDEX` (a flow map with 0), the instance
    labels with 0; ``valid`` marks real pixels; ``type`` is the image's cell type (its index in ``CELL_TYPES``).
    """

    def __init__(
        self,
        image_ids: Sequence[str],
        store: ImageStore,
        mean: float,
        std: float,
        channels: int,
        pad_multiple: int = 32,
    ) -> None:
        self.image_ids = list(image_ids)
        for image_id in self.image_ids:
            store.image(image_id)  # fail now, not in a worker, on an id the store lacks
        self.store = store
        self.mean, self.std, self.channels = mean, std, channels
        self.pad_multiple = pad_multiple

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.image_ids[i]
        image, target = self.store.image(image_id), self.store.targets(image_id)
        height, width = image.shape
        tensor, pad = padded_input(image, self.mean, self.std, self.channels, self.pad_multiple)
        valid = np.zeros(tensor.shape[1:], dtype=bool)
        valid[:height, :width] = True
        cell_type = self.store.cell_type(image_id)
        return {
            "image": tensor,
            "target": target_tensor(
                np.pad(target, (*pad, (0, 0)), constant_values=0) if target.ndim == 3
                else np.pad(target, pad, constant_values=IGNORE_INDEX)
            ),
            "labels": torch.from_numpy(np.pad(self.store.labels(image_id), pad).astype(np.int64)),
            "valid": torch.from_numpy(valid),
            "image_id": image_id,
            "cell_type": cell_type,
            "type": torch.tensor(CELL_TYPES.index(cell_type)),
            "height": height,
            "width": width,
        }

    @staticmethod
    def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Stack items, padding smaller ones at the bottom/right to the batch's largest (image 0, target ignored)."""
        height = max(item["image"].shape[1] for item in batch)
        width = max(item["image"].shape[2] for item in batch)

        def fit(tensor: torch.Tensor, fill: float | int | bool) -> torch.Tensor:
            pad = (0, width - tensor.shape[-1], 0, height - tensor.shape[-2])
            return torch.nn.functional.pad(tensor, pad, value=fill) if any(pad) else tensor

        return {
            "image": torch.stack([fit(item["image"], 0.0) for item in batch]),
            "target": torch.stack(
                [fit(item["target"], 0 if item["target"].is_floating_point() else IGNORE_INDEX) for item in batch]
            ),
            "labels": torch.stack([fit(item["labels"], 0) for item in batch]),
            "valid": torch.stack([fit(item["valid"], False) for item in batch]),
            "image_id": [item["image_id"] for item in batch],
            "cell_type": [item["cell_type"] for item in batch],
            "type": torch.stack([item["type"] for item in batch]),
            "height": torch.tensor([item["height"] for item in batch]),
            "width": torch.tensor([item["width"] for item in batch]),
        }
