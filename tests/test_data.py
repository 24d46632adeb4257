"""Targets, the image store, augmentations and the patch / whole-image datasets."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from cellseg.augment import AUGMENTATIONS, build_augmentations
from cellseg.data import (
    IGNORE_INDEX,
    ImageStore,
    PatchDataset,
    WholeImageDataset,
    normalize,
    targets_from_labels,
)
from cellseg.decode import IMAGES_TABLE, INSTANCES_TABLE, LABELS_DIR, decode_dataset
from cellseg.errors import DataError
from cellseg.io import write_png
from cellseg.patches import sample_patches
from cellseg.celltypes import CELL_TYPES
from cellseg.sources.read import load_source
from cellseg.sources.synthetic import synthesize

MEAN, STD = 0.5, 0.25
BOUNDARY_WIDTH = 1


def boundary_targets(image_id: str, labels: np.ndarray) -> np.ndarray:
    """The U-Net's boundary targets: a store given them holds them too."""
    return targets_from_labels(labels, BOUNDARY_WIDTH)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pd.DataFrame, pd.DataFrame]:
    """(data root, decoded dir, images table, instances table) of 4 decoded synthetic images."""
    root = tmp_path_factory.mktemp("data")
    synthesize(root / "raw", n_images=4, seed=1)
    decode_dataset(load_source("synthetic", root / "raw"), root / "decoded")
    images = pd.read_parquet(root / "decoded" / IMAGES_TABLE)
    return root / "raw", root / "decoded", images, pd.read_parquet(root / "decoded" / INSTANCES_TABLE)


@pytest.fixture(scope="module")
def store(synthetic: tuple[Path, Path, pd.DataFrame, pd.DataFrame]) -> ImageStore:
    data_root, decoded, images, _ = synthetic
    return ImageStore(data_root, decoded, list(images["image_id"]), boundary_targets)


def _write_store(root: Path, labels: np.ndarray, image: np.ndarray, image_id: str = "hand") -> ImageStore:
    """An :class:`ImageStore` (with U-Net targets) over one hand-made image and its label image."""
    (root / "raw" / "train").mkdir(parents=True)
    (root / "decoded" / LABELS_DIR).mkdir(parents=True)
    write_png(root / "raw" / "train" / f"{image_id}.png", image)
    write_png(root / "decoded" / LABELS_DIR / f"{image_id}.png", labels)
    table = pd.DataFrame({"image_id": [image_id], "file_name": [f"train/{image_id}.png"], "cell_type": ["astro"]})
    table.to_parquet(root / "decoded" / IMAGES_TABLE)
    return ImageStore(root / "raw", root / "decoded", [image_id], boundary_targets)


def _l_shape() -> tuple[np.ndarray, np.ndarray]:
    """A 64×64 label image with an L-shaped cell in the top-left (asymmetric under every flip) and its image."""
    labels = np.zeros((64, 64), dtype=np.uint16)
    labels[4:40, 6:14] = 1
    labels[32:40, 6:30] = 1
    labels[50:60, 40:44] = 2
    image = np.where(labels > 0, 40, 210).astype(np.uint8)
    return labels, image


def _index(image_id: str, n: int, size: int = 64, x0: int = 0, y0: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [image_id] * n, "x0": x0, "y0": y0, "size": size, "cell_type": "astro", "label": 1})


def test_touching_squares_get_a_boundary_line() -> None:
    labels = np.zeros((10, 12), dtype=np.uint16)
    labels[2:8, 1:6] = 1
    labels[2:8, 6:11] = 2
    targets = targets_from_labels(labels, boundary_width=1)
    assert targets.dtype == np.uint8
    assert (targets[labels == 0] == 0).all()
    assert (targets[2:8, 5] == 2).all() and (targets[2:8, 6] == 2).all()  # the shared edge, both sides
    assert (targets[3:7, 2:5] == 1).all() and (targets[3:7, 7:10] == 1).all()
    assert (targets[2, 1:11] == 2).all() and (targets[7, 1:11] == 2).all()
    wide = targets_from_labels(labels, boundary_width=2)
    assert (wide[3:7, 4:8] == 2).all() and (wide[4:6, 3] == 1).all() and (wide[labels == 0] == 0).all()


def test_store_holds_images_labels_targets(store: ImageStore, synthetic: tuple) -> None:
    _, _, images, _ = synthetic
    image_id = images["image_id"][0]
    assert store.image_ids == list(images["image_id"])
    assert store.image(image_id).shape == (520, 704) and store.image(image_id).dtype == np.uint8
    assert store.labels(image_id).dtype == np.uint16
    np.testing.assert_array_equal(store.targets(image_id), targets_from_labels(store.labels(image_id), BOUNDARY_WIDTH))
    assert store.cell_type(image_id) == images["cell_type"][0]
    with pytest.raises(DataError, match="'nope' is not in the image store"):
        store.image("nope")


def test_store_without_pixel_targets_holds_none(store: ImageStore, synthetic: tuple) -> None:
    """Mask R-CNN's store: the same images and label images, no U-Net targets."""
    data_root, decoded, images, _ = synthetic
    image_id = images["image_id"][0]
    plain = ImageStore(data_root, decoded, [image_id])
    np.testing.assert_array_equal(plain.image(image_id), store.image(image_id))
    np.testing.assert_array_equal(plain.labels(image_id), store.labels(image_id))
    with pytest.raises(DataError, match="holds no U-Net targets"):
        plain.targets(image_id)
    with pytest.raises(DataError, match="holds no U-Net targets"):
        WholeImageDataset([image_id], plain, MEAN, STD, 1)[0]


def test_store_missing_files_are_named(tmp_path: Path) -> None:
    labels, image = _l_shape()
    _write_store(tmp_path, labels, image)
    (tmp_path / "decoded" / LABELS_DIR / "hand.png").unlink()
    with pytest.raises(DataError, match=r"labels/hand\.png: label image is missing"):
        ImageStore(tmp_path / "raw", tmp_path / "decoded", ["hand"])
    (tmp_path / "raw" / "train" / "hand.png").unlink()
    with pytest.raises(DataError, match=r"train/hand\.png: image file is missing"):
        ImageStore(tmp_path / "raw", tmp_path / "decoded", ["hand"])
    with pytest.raises(DataError, match=r"images\.parquet: 1 requested image id\(s\) missing"):
        ImageStore(tmp_path / "raw", tmp_path / "decoded", ["other"])
    with pytest.raises(DataError, match=r"images\.parquet: decoded image table is missing"):
        ImageStore(tmp_path / "raw", tmp_path / "nowhere", ["hand"])


def test_build_augmentations() -> None:
    compose = build_augmentations(list(AUGMENTATIONS), seed=0)
    assert isinstance(compose, A.Compose) and len(compose.transforms) == len(AUGMENTATIONS)
    image = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    mask = (image > 128).astype(np.uint8) * 2
    out = compose(image=image, mask=mask)
    assert out["image"].shape == (64, 64) and out["image"].dtype == np.uint8
    assert set(np.unique(out["mask"])) <= {0, 2}  # nearest interpolation: no blended classes
    identity = build_augmentations([])(image=image, mask=mask)
    np.testing.assert_array_equal(identity["image"], image)


def test_normalize() -> None:
    image = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    grey = normalize(image, MEAN, STD, 1)
    assert grey.shape == (1, 2, 2) and grey.dtype == torch.float32
    assert grey[0, 0, 0].item() == pytest.approx(-2.0) and grey[0, 0, 1].item() == pytest.approx(2.0)
    rgb = normalize(image, MEAN, STD, 3)
    assert rgb.shape == (3, 2, 2) and torch.equal(rgb[0], rgb[2])


@pytest.mark.parametrize("channels", [1, 3])
def test_patch_dataset_shapes(store: ImageStore, synthetic: tuple, channels: int) -> None:
    _, _, images, instances = synthetic
    index = sample_patches(instances, images, store.image_ids, size=128, jitter=0.5, per_cell=1,
                           background_fraction=0.1, seed=0)
    dataset = PatchDataset(index, store, build_augmentations(list(AUGMENTATIONS), seed=0), MEAN, STD, channels)
    assert len(dataset) == len(index)
    item = dataset[len(dataset) - 1]
    assert item["image"].shape == (channels, 128, 128) and item["image"].dtype == torch.float32
    assert item["target"].shape == (128, 128) and item["target"].dtype == torch.int64
    assert set(item["target"].unique().tolist()) <= {0, 1, 2}
    types = [int(dataset[i]["type"]) for i in range(len(dataset))]
    assert types == [CELL_TYPES.index(t) for t in index["cell_type"]]  # the window's image's type
    assert item["type"].dtype == torch.int64 and item["type"].shape == ()


def test_patch_dataset_refuses_an_unknown_cell_type(store: ImageStore) -> None:
    index = _index(store.image_ids[0], 2)
    index.loc[1, "cell_type"] = "neuron"
    with pytest.raises(DataError, match="patch index: unknown cell type 'neuron'; expected one of shsy5y, astro, cort"):
        PatchDataset(index, store, None, MEAN, STD, 1)


def test_patch_crop_without_augmentation(store: ImageStore) -> None:
    image_id = store.image_ids[0]
    item = PatchDataset(_index(image_id, 1, x0=96, y0=160), store, None, MEAN, STD, 1)[0]
    np.testing.assert_array_equal(item["target"].numpy(), store.targets(image_id)[160:224, 96:160])
    expected = normalize(store.image(image_id)[160:224, 96:160], MEAN, STD, 1)
    assert torch.equal(item["image"], expected)


def test_window_outside_image_is_refused(store: ImageStore) -> None:
    with pytest.raises(DataError, match="lies outside its 704x520 image"):
        PatchDataset(_index(store.image_ids[0], 1, x0=700), store, None, MEAN, STD, 1)


@pytest.mark.parametrize("name", ["hflip", "vflip", "rotate90", "transpose"])
def test_augmentation_keeps_image_and_target_aligned(tmp_path: Path, name: str) -> None:
    labels, image = _l_shape()
    store = _write_store(tmp_path, labels, image)
    transform = {"hflip": A.HorizontalFlip, "vflip": A.VerticalFlip, "rotate90": A.RandomRotate90,
                 "transpose": A.Transpose}[name](p=1)
    item = PatchDataset(_index("hand", 1), store, A.Compose([transform], seed=0), MEAN, STD, 1)[0]
    dark = item["image"][0].numpy() < 0
    target = item["target"].numpy()
    assert not np.array_equal(target, store.targets("hand"))  # it did move
    np.testing.assert_array_equal(dark, target > 0)
    assert (target == 2).sum() == (store.targets("hand") == 2).sum()


def _loader_targets(dataset: PatchDataset, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False)
    return torch.cat([batch["target"] for batch in loader])


def test_dataloader_workers_augment_differently_and_reproducibly(tmp_path: Path) -> None:
    labels, image = _l_shape()
    store = _write_store(tmp_path, labels, image)
    augment = build_augmentations(["hflip", "vflip", "rotate90", "transpose"])
    dataset = PatchDataset(_index("hand", 16), store, augment, MEAN, STD, 3)
    targets = _loader_targets(dataset, seed=0)
    assert targets.shape == (16, 64, 64)
    # worker 0 loads batches 0, 2, ...; worker 1 batches 1, 3, ...: their draws must differ
    batches = targets.reshape(8, 2, 64, 64)
    assert not torch.equal(batches[0::2], batches[1::2])
    assert torch.equal(targets, _loader_targets(dataset, seed=0))


def test_whole_image_dataset(store: ImageStore) -> None:
    dataset = WholeImageDataset(store.image_ids, store, MEAN, STD, 3)
    item = dataset[0]
    image_id = store.image_ids[0]
    assert item["image"].shape == (3, 544, 704) and item["target"].shape == (544, 704)
    assert item["valid"].dtype == torch.bool and item["valid"].sum().item() == 520 * 704
    assert item["valid"][:520].all() and (item["target"][520:] == IGNORE_INDEX).all()
    assert (item["target"][:520].numpy() == store.targets(image_id)).all()
    assert (item["image_id"], item["cell_type"]) == (image_id, store.cell_type(image_id))
    assert item["type"].dtype == torch.int64 and int(item["type"]) == CELL_TYPES.index(store.cell_type(image_id))
    assert item["labels"].shape == (544, 704) and item["labels"].dtype == torch.int64
    assert (item["labels"][:520].numpy() == store.labels(image_id)).all() and (item["labels"][520:] == 0).all()
    # reflect padding: row 520 mirrors row 518
    assert torch.equal(item["image"][:, 520], item["image"][:, 518])
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=WholeImageDataset.collate, num_workers=2)))
    assert batch["image"].shape == (2, 3, 544, 704) and batch["target"].shape == (2, 544, 704)
    assert batch["image_id"] == store.image_ids[:2] and batch["height"].tolist() == [520, 520]
    assert batch["labels"].shape == (2, 544, 704)
    assert batch["type"].tolist() == [CELL_TYPES.index(store.cell_type(i)) for i in store.image_ids[:2]]


def test_whole_image_collate_pads_to_the_batch_maximum(tmp_path: Path, store: ImageStore) -> None:
    labels, image = _l_shape()
    small = WholeImageDataset(["hand"], _write_store(tmp_path, labels[:40, :50], image[:40, :50]), MEAN, STD, 1)[0]
    assert small["image"].shape == (1, 64, 64) and small["valid"].sum().item() == 40 * 50
    large = WholeImageDataset(store.image_ids[:1], store, MEAN, STD, 1)[0]
    batch = WholeImageDataset.collate([small, large])
    assert batch["image"].shape == (2, 1, 544, 704)
    assert batch["valid"].sum(dim=(1, 2)).tolist() == [40 * 50, 520 * 704]
    assert (batch["target"][0, 64:] == IGNORE_INDEX).all() and (batch["image"][0, :, 64:] == 0).all()
    assert (batch["labels"][0, :40, :50].numpy() == labels[:40, :50]).all() and (batch["labels"][0, 40:] == 0).all()
    assert batch["type"].tolist() == [CELL_TYPES.index("astro"), CELL_TYPES.index(store.cell_type(store.image_ids[0]))]
