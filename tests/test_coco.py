"""COCO export (exact masks, areas and boxes) and the ``livecell`` source that reads COCO files back."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cellseg import rle
from cellseg.coco import to_coco, write_coco
from cellseg.cocorle import coco_to_rle, rle_to_coco
from cellseg.sources.coco import LIVECELL_JSON, coco_to_source
from cellseg.decode import IMAGES_TABLE, INSTANCES_TABLE, LABELS_DIR, decode_dataset
from cellseg.errors import DataError
from cellseg.io import read_labels
from cellseg.celltypes import CATEGORY_IDS, CELL_TYPES
from cellseg.sources.read import load_source
from cellseg.sources.kaggle import read_kaggle
from cellseg.sources.synthetic import synthesize
from cellseg.split import make_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six synthetic images (raw Kaggle-format directory) and their decoded directory."""
    base = tmp_path_factory.mktemp("synthetic")
    synthesize(base / "raw", 6, 0)
    decode_dataset(load_source("synthetic", base / "raw"), base / "decoded")
    return base / "raw", base / "decoded"


def _tables(decoded: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(decoded / IMAGES_TABLE), pd.read_parquet(decoded / INSTANCES_TABLE)


def _load(path: Path) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(path.read_text())
    coco.createIndex()
    return coco


def _assert_exact(coco: dict, instances: pd.DataFrame) -> None:
    """Every annotation is its instance's own mask, byte for byte as pycocotools encodes it, with its area and box."""
    images = {image["id"]: image for image in coco["images"]}
    number = {image["image_key"]: image["id"] for image in coco["images"]}
    cells = instances.assign(number=instances["image_id"].map(number)).sort_values(["number", "label"])
    assert len(coco["annotations"]) == len(cells)
    for annotation, cell in zip(coco["annotations"], cells.itertuples()):
        image = images[annotation["image_id"]]
        assert annotation["image_id"] == cell.number and annotation["category_id"] == CATEGORY_IDS[cell.cell_type]
        mask = rle.decode(cell.annotation, (image["height"], image["width"]))
        assert np.array_equal(mask_utils.decode(annotation["segmentation"]).astype(bool), mask)
        expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        assert annotation["segmentation"]["counts"] == expected
        assert annotation["area"] == mask.sum() == cell.area
        assert annotation["bbox"] == [cell.x0, cell.y0, cell.x1 - cell.x0, cell.y1 - cell.y0]
        assert all(isinstance(v, float) for v in annotation["bbox"]) and annotation["iscrowd"] == 0


def test_real_sample_round_trips_exactly(real_dir: Path, tmp_path: Path) -> None:
    decode_dataset(read_kaggle(real_dir), tmp_path / "decoded")
    images, instances = _tables(tmp_path / "decoded")
    coco = to_coco(images, instances, images["image_id"].tolist())
    assert (instances["overlap_lost"] > 0).sum() > 10  # overlapping cells keep their whole own mask
    _assert_exact(coco, instances)
    assert [a["id"] for a in coco["annotations"]] == list(range(1, 396))
    assert coco["images"][0]["file_name"] == "train/0030fd0e6378.png" and coco["images"][0]["cell_type"] == "shsy5y"


def test_synthetic_export_loads_in_pycocotools(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    raw, decoded = synthetic
    images, instances = _tables(decoded)
    ids = images["image_id"].tolist()[::-1]
    write_coco(tmp_path / "coco.json", to_coco(images, instances, ids))
    coco = _load(tmp_path / "coco.json")
    assert [coco.cats[i]["name"] for i in (1, 2, 3)] == list(CELL_TYPES)
    assert set(pd.read_csv(raw / "train.csv")["cell_type"]) <= {c["name"] for c in coco.cats.values()}
    assert [coco.imgs[i]["image_key"] for i in range(1, 7)] == ids
    assert len(coco.getAnnIds()) == len(instances)
    first = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    own = instances[instances["image_id"] == ids[0]]["annotation"].iloc[0]
    assert np.array_equal(coco.annToMask(first).astype(bool), rle.decode(own, (520, 704)))
    _assert_exact(coco.dataset, instances)


def test_to_coco_refuses_bad_input(synthetic: tuple[Path, Path]) -> None:
    images, instances = _tables(synthetic[1])
    with pytest.raises(DataError, match="image id 'nope' is not in the images table"):
        to_coco(images, instances, ["nope"])
    with pytest.raises(DataError, match="listed twice"):
        to_coco(images, instances, [images["image_id"][0]] * 2)
    broken = instances.copy()
    broken.loc[3, "annotation"] = "5 2 1 1"
    image_id, label = broken.loc[3, ["image_id", "label"]]
    with pytest.raises(DataError, match=rf"image '{image_id}' label {label}: malformed RLE: token 3"):
        to_coco(images, broken, images["image_id"].tolist())


_shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))
_masks = st.lists(_shapes.flatmap(lambda shape: arrays(np.bool_, shape)), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(_masks)
def test_conversions_match_pycocotools_on_any_masks(masks: list[np.ndarray]) -> None:
    heights, widths = np.array([m.shape[0] for m in masks]), np.array([m.shape[1] for m in masks])
    coco = rle_to_coco([rle.encode(m) for m in masks], heights, widths)
    expected = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    assert [c["counts"] for c in coco] == [e["counts"].decode() for e in expected]
    assert coco_to_rle(expected) == [rle.encode(m) for m in masks]


def test_conversions_of_large_counts_and_loose_formatting() -> None:
    mask = np.zeros((300, 400), bool)
    mask[:, 7:9] = True  # two full columns: one column-major run
    mask[299, 399] = True
    coco = rle_to_coco([" " + rle.encode(mask).replace(" ", "  ") + " "], np.array([300]), np.array([400]))
    assert coco[0]["counts"] == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    assert coco_to_rle(coco) == [rle.encode(mask)]
    with pytest.raises(DataError, match="^cell 0: malformed RLE"):
        coco_to_rle([{"size": [300, 400], "counts": coco[0]["counts"][:-1]}], "cell {}".format)


def _run_stage(tmp_path: Path, decoded: Path) -> Path:
    images = pd.read_parquet(decoded / IMAGES_TABLE)
    (tmp_path / "params.yaml").write_text("split:\n  n_folds: 2\n  fold: 1\n  seed: 3\n")
    (tmp_path / "split.json").write_text(json.dumps(make_split(images, 2, 1, 3)))
    stage = str(REPO / "stages" / "coco.py")
    command = [sys.executable, stage, "--decoded", str(decoded), "--split", "split.json", "--out", "coco"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (tmp_path / "params.yaml").write_text("split:\n  n_folds: 2\n  fold: 0\n  seed: 3\n")
    stale = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert stale.returncode == 1 and "split.json: made for" in stale.stderr
    return tmp_path / "coco"


def test_stage_output_reads_back_as_the_kaggle_source(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    raw, decoded = synthetic
    out = _run_stage(tmp_path, decoded)
    split = json.loads((tmp_path / "split.json").read_text())
    kaggle = read_kaggle(raw)
    for part in ("train", "val"):
        data = coco_to_source(out / f"coco_{part}.json", raw)
        assert data.root == raw and data.annotation_file == out / f"coco_{part}.json"
        expected = kaggle.images[kaggle.images["image_id"].isin(split[part])]
        columns = [c for c in expected.columns if c != "row"]
        assert data.images[columns].sort_values("image_id").reset_index(drop=True).equals(
            expected[columns].sort_values("image_id").reset_index(drop=True)
        )
        assert data.images["row"].tolist() == list(range(1, len(split[part]) + 1))
        assert data.annotations["row"].tolist() == list(range(1, len(data.annotations) + 1))
        ours = data.annotations.groupby("image_id")["annotation"].agg(list).to_dict()
        theirs = kaggle.annotations[kaggle.annotations["image_id"].isin(split[part])]
        assert ours == theirs.groupby("image_id")["annotation"].agg(list).to_dict()


def test_livecell_source_decodes_like_the_kaggle_source(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    raw, decoded = synthetic
    images, instances = _tables(decoded)
    root = tmp_path / "livecell"
    root.mkdir()
    (root / "train").symlink_to(raw / "train", target_is_directory=True)
    write_coco(root / LIVECELL_JSON, to_coco(images, instances, images["image_id"].tolist()))
    decode_dataset(load_source("livecell", root, limit_images=4, seed=1), tmp_path / "again")
    again_images, again_instances = _tables(tmp_path / "again")
    assert len(again_images) == 4
    assert again_instances.drop(columns="row").equals(
        instances[instances["image_id"].isin(again_images["image_id"])].drop(columns="row").reset_index(drop=True)
    )
    for image_id in again_images["image_id"]:
        name = f"{image_id}.png"
        assert np.array_equal(read_labels(tmp_path / "again" / LABELS_DIR / name), read_labels(decoded / LABELS_DIR / name))


SQUARE = [[2, 2, 6, 2, 6, 5, 2, 5]]  # the polygon of pixels [2:5, 2:6]


def _livecell_dir(tmp_path: Path) -> Path:
    """A LIVECell-like directory: polygon and RLE segmentations, category "cell", annotations keyed by id."""
    root = tmp_path / "lc"
    (root / "images").mkdir(parents=True)
    names = ["SHSY5Y_Phase_A10_1_00d04h00m_1.tif", "SHSY5Y_Phase_A10_1_00d08h00m_2.tif"]
    for name in names:
        Image.fromarray(np.full((12, 16), 100, np.uint8)).save(root / "images" / name)
    counts = [20, 3, 9, 3] + [12 * 16 - 35]  # column 1, rows 8..10 and column 2, rows 8..10
    coco = {
        "images": [{"id": 7 + k, "file_name": f"images/{n}", "width": 16, "height": 12} for k, n in enumerate(names)],
        "annotations": {
            "101": {"id": 101, "image_id": 7, "category_id": 1, "segmentation": SQUARE, "iscrowd": 0},
            "102": {"id": 102, "image_id": 8, "category_id": 1, "segmentation": {"size": [12, 16], "counts": counts}},
        },
        "categories": [{"id": 1, "name": "cell"}],
    }
    (root / LIVECELL_JSON).write_text(json.dumps(coco))
    return root


def test_livecell_polygons_rle_and_file_names(tmp_path: Path) -> None:
    data = load_source("livecell", _livecell_dir(tmp_path))
    square = np.zeros((12, 16), bool)
    square[2:5, 2:6] = True
    corner = np.zeros((12, 16), bool)
    corner[8:11, 1:3] = True
    assert data.annotations["annotation"].tolist() == [rle.encode(square), rle.encode(corner)]
    assert data.annotations["image_id"].tolist() == ["SHSY5Y_Phase_A10_1_00d04h00m_1", "SHSY5Y_Phase_A10_1_00d08h00m_2"]
    assert data.images["cell_type"].tolist() == ["shsy5y", "shsy5y"]
    assert data.images["sample_id"].tolist() == ["SHSY5Y_Phase_A10_1"] * 2
    assert data.images["plate_time"].tolist() == ["", ""]


def _edit(root: Path, target: str, updates: dict) -> None:
    """Update the json object at ``target`` (dotted keys, e.g. ``images.0``) of ``root``'s annotations.json."""
    coco = json.loads((root / LIVECELL_JSON).read_text())
    node = coco
    for key in target.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    node.update(updates)
    (root / LIVECELL_JSON).write_text(json.dumps(coco))



@pytest.mark.parametrize(
    ("target", "updates", "message"),
    [
        ("images.1", {"file_name": "images/SHSY5Y_gone.tif"}, r"image 8 \(#2\): image file .*gone.tif is missing"),
        ("images.0", {"width": 17}, r"image 7 \(#1\): .* is 16x12 but the json says 17x12"),
        ("images.0", {"file_name": "images/A172_Phase_A7_1_00d00h00m_1.tif"}, r"image 7 \(#1\): cell line 'A172'"),
        ("images.0", {"file_name": "../x.tif"}, r"image 7 \(#1\): file_name '../x.tif' must be a path relative"),
        ("annotations.102", {"image_id": 99}, r"annotation 102 \(#2\): image_id 99 is not among the images"),
        ("annotations.101", {"category_id": 5}, r"annotation 101 \(#1\): unknown category_id 5"),
        ("annotations.101", {"segmentation": [[1, 2, 3, 4]]}, r"annotation 101 \(#1\): bad segmentation: polygons"),
        ("annotations.101", {"segmentation": [[30, 30, 40, 30, 40, 40]]}, r"annotation 101 \(#1\): segmentation covers no"),
        ("annotations.102.segmentation", {"counts": [1, 2]}, r"annotation 102 \(#2\): malformed RLE"),
        ("annotations.102.segmentation", {"counts": "0a"}, r"annotation 102 \(#2\): malformed RLE"),
        ("annotations.102.segmentation", {"size": [16, 12]}, r"annotation 102 \(#2\): bad segmentation: RLE size"),
    ],
)
def test_livecell_errors_name_file_and_id(tmp_path: Path, target: str, updates: dict, message: str) -> None:
    root = _livecell_dir(tmp_path)
    _edit(root, target, updates)
    with pytest.raises(DataError, match=rf"^{root / LIVECELL_JSON}: {message}"):
        coco_to_source(root / LIVECELL_JSON, root)


def _repeat_annotation(root: Path, **changes: object) -> None:
    """Append annotation 103: a copy of annotation 101 (image 7's square) with ``changes``."""
    coco = json.loads((root / LIVECELL_JSON).read_text())
    coco["annotations"]["103"] = {**coco["annotations"]["101"], "id": 103, **changes}
    (root / LIVECELL_JSON).write_text(json.dumps(coco))


def test_livecell_exact_duplicate_is_dropped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _livecell_dir(tmp_path)
    clean = coco_to_source(root / LIVECELL_JSON, root)
    _repeat_annotation(root)
    with caplog.at_level(logging.WARNING, logger="cellseg.sources.coco"):
        data = coco_to_source(root / LIVECELL_JSON, root)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "dropped 1 annotation(s) that repeat an earlier one of the same image exactly: annotation 103 (#3)" in warning
    pd.testing.assert_frame_equal(data.images, clean.images)
    pd.testing.assert_frame_equal(data.annotations, clean.annotations)


def test_livecell_same_mask_under_another_category_is_refused(tmp_path: Path) -> None:
    """Not an exact repeat (category "shsy5y" where the first is the untyped "cell"), so not dropped."""
    root = _livecell_dir(tmp_path)
    coco = json.loads((root / LIVECELL_JSON).read_text())
    coco["categories"].append({"id": 2, "name": "shsy5y"})
    (root / LIVECELL_JSON).write_text(json.dumps(coco))
    _repeat_annotation(root, category_id=2)
    with pytest.raises(DataError, match=rf"^{root / LIVECELL_JSON}: annotation 103 \(#3\): same mask as annotation #1"):
        coco_to_source(root / LIVECELL_JSON, root)


def test_livecell_category_must_agree_with_the_image(tmp_path: Path) -> None:
    root = _livecell_dir(tmp_path)
    _edit(root, "categories.0", {"name": "astro"})
    data = coco_to_source(root / LIVECELL_JSON, root)  # the category names the cell type ...
    assert data.images["cell_type"].tolist() == ["astro", "astro"]
    _edit(root, "images.0", {"cell_type": "shsy5y"})  # ... unless the image says otherwise
    with pytest.raises(DataError, match=r"annotation 101 \(#1\): category 'astro' differs from its image's cell type 'shsy5y'"):
        coco_to_source(root / LIVECELL_JSON, root)


def test_livecell_missing_or_broken_json(tmp_path: Path) -> None:
    path = tmp_path / LIVECELL_JSON
    with pytest.raises(DataError, match=rf"^{path}: annotation file is missing"):
        load_source("livecell", tmp_path)
    path.write_text("{")
    with pytest.raises(DataError, match=rf"^{path}: not valid JSON"):
        load_source("livecell", tmp_path)
    path.write_text(json.dumps({"images": [], "annotations": {}}))
    with pytest.raises(DataError, match=rf"^{path}: not a COCO instance file: missing categories"):
        load_source("livecell", tmp_path)
