"""``cellseg predict``: outputs, the Kaggle submission format, errors and overwrite protection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import roifile
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.measure import regionprops_table
from torch import nn

from cellseg import rle
from cellseg.celltypes import CELL_TYPES, category_id
from cellseg.checkpoint import content_hash, load_checkpoint, save_checkpoint
from cellseg.cli import build_parser, main
from cellseg.errors import DataError
from cellseg.inference import load_predictor
from cellseg.io import MARKER
from cellseg.models.unet import UNetPredictor, build_unet
from cellseg.predict import predict_images, submission_rows
from cellseg.tune import TUNED_FILE
from helpers.project import project_params

CPU = torch.device("cpu")


def save_unet(path: Path, postprocess: dict[str, Any]) -> Path:
    """A U-Net checkpoint (resnet18, random weights) at ``path`` storing the post-processing params ``postprocess``."""
    params = project_params("unet", encoder="resnet18")
    torch.manual_seed(0)
    model = build_unet(params)
    save_checkpoint(path, "unet", {"model_params": params.model_dump(), "postprocess": postprocess,
                                   "model_state": model.state_dict(), "epoch": 1})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    post = project_params("postprocess.unet", min_size={"default": 5}, marker_threshold=0.3)
    return save_unet(tmp_path_factory.mktemp("ckpt") / "best.pt", post.model_dump())


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (64, 96), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def test_submission_rows_are_exact_and_complete() -> None:
    labels = np.zeros((4, 5), dtype=np.uint16)
    labels[0, 1:3] = 1
    labels[1, 4] = labels[2, 0] = 3  # label 2 absent: no row for it
    rows = submission_rows("img", labels)
    assert rows == [{"id": "img", "predicted": "2 2"}, {"id": "img", "predicted": "10 2"}]
    assert submission_rows("empty", np.zeros((3, 3), np.uint16)) == [{"id": "empty", "predicted": ""}]


def test_predict_writes_labels_coco_and_submission(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = predict_images(checkpoint, [images], out, device=CPU, batch_size=2)
    assert summary["images"] == 3
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["a.tif", "b.tif", "c.tif"]
    submission = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert list(submission.columns) == ["id", "predicted"] and set(submission["id"]) == {"a", "b", "c"}
    coco = json.loads((out / "predictions.json").read_text())
    assert coco["model"] == "unet" and len(coco["images"]) == 3
    assert len(coco["annotations"]) == summary["instances"]
    category = {image["id"]: CELL_TYPES.index(image["cell_type"]) + 1 for image in coco["images"]}  # predicted
    assert all(a["category_id"] == category[a["image_id"]] for a in coco["annotations"])
    for image_id, rows in submission.groupby("id"):
        labels = tifffile.imread(out / "labels" / f"{image_id}.tif")
        masks = [rle.decode(p, labels.shape) for p in rows["predicted"] if p]
        assert len(masks) == int(labels.max())
        if masks:
            assert np.stack(masks).sum(axis=0).max() == 1  # non-overlapping
            assert np.array_equal(np.stack(masks).any(axis=0), labels > 0)


class DarkCells(nn.Module):
    """A stand-in U-Net: cell interior where the input is dark, background elsewhere, and cell type ``cell_type``."""

    def __init__(self, cell_type: str) -> None:
        super().__init__()
        self.type_index = CELL_TYPES.index(cell_type)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dark = (x[:, :1] < 0).float()
        logits = 20.0 * torch.cat([1 - dark, dark, torch.zeros_like(dark)], dim=1)
        types = torch.full((len(x),), self.type_index)
        return logits, 20.0 * F.one_hot(types, len(CELL_TYPES)).float()


@pytest.mark.parametrize(("cell_type", "n_cells"), [("shsy5y", 2), ("cort", 1), ("astro", 0)])
def test_unet_cells_get_the_heads_cell_type_and_its_min_size(cell_type: str, n_cells: int) -> None:
    """Two dark squares of 100 and 36 pixels; the head's cell type picks the minimum size (no truth is given)."""
    image = np.full((64, 96), 210, dtype=np.uint8)
    image[5:15, 5:15] = image[30:36, 50:56] = 40
    params = project_params("unet", encoder="resnet18", target="boundary")  # DarkCells' three classes
    post = project_params("postprocess.unet", min_size={"shsy5y": 1, "cort": 50, "astro": 1000})
    (found,) = UNetPredictor(DarkCells(cell_type), params, post, CPU).predict([image])
    assert found.image_type == cell_type and found.image_class == category_id(cell_type)
    assert len(found) == int(found.labels.max()) == n_cells
    assert found.classes.tolist() == [found.image_class] * n_cells
    assert found.scores.tolist() == pytest.approx([1.0] * n_cells)


def test_predict_takes_no_cell_type() -> None:
    """A U-Net names the cell type itself: ``--cell-type`` is gone."""
    parser = build_parser()
    assert parser.parse_args(["predict", "--model", "m.pt", "images", "--out", "o"]).command == "predict"
    tta = {flag: parser.parse_args(["predict", "--model", "m.pt", "images", "--out", "o", *flag]).tta
           for flag in ((), ("--tta",), ("--no-tta",))}
    assert tta == {(): None, ("--tta",): True, ("--no-tta",): False}  # None: as the tuned file was searched
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "--model", "m.pt", "images", "--out", "o", "--cell-type", "astro"])


def test_existing_output_is_kept_unless_overwrite(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    """A folder cellseg did not write is never replaced, ``--overwrite`` or not; one it wrote only with it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="a folder that cellseg did not write .* refusing to replace it"):
            predict_images(checkpoint, [images], mine, device=CPU, overwrite=overwrite)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "out"
    predict_images(checkpoint, [images], out, device=CPU)
    with pytest.raises(DataError, match="already exists and is not empty; pass --overwrite"):
        predict_images(checkpoint, [images / "a.png"], out, device=CPU)
    assert len(pd.read_csv(out / "submission.csv")["id"].unique()) == 3
    predict_images(checkpoint, [images / "a.png"], out, device=CPU, overwrite=True, outputs=["labels", "submission"])
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "labels", "submission.csv"]
    assert pd.read_csv(out / "submission.csv")["id"].unique().tolist() == ["a"]


def test_unreadable_image_is_a_clear_error_and_writes_nothing(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    (images / "b.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "cellseg.cli", "predict", "--model", str(checkpoint), str(images), "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {images / 'b.png'}: not a readable image")
    assert not out.exists()


def test_a_foreign_checkpoint_is_refused(images: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    with pytest.raises(DataError, match="not a cellseg checkpoint"):
        predict_images(bogus, [images], tmp_path / "out", device=CPU)
    with pytest.raises(DataError, match="no such image file or directory"):
        predict_images(bogus, [tmp_path / "nowhere"], tmp_path / "out", device=CPU)


def test_postprocess_params_can_be_overridden_without_retraining(checkpoint: Path) -> None:
    stored = load_predictor(checkpoint, CPU)
    assert stored.post.marker_threshold == {"default": 0.3} and stored.post.min_size == {"default": 5}
    tuned = load_predictor(checkpoint, CPU, project_params("postprocess.unet", mask_threshold=0.7))
    assert tuned.post == project_params("postprocess.unet", mask_threshold=0.7)  # replaces the stored ones whole
    assert tuned.params.encoder == "resnet18"  # the architecture stays the checkpoint's
    with pytest.raises(TypeError, match="unet post-processing takes UNetPostprocess, not MaskRCNNPostprocess"):
        load_predictor(checkpoint, CPU, project_params("postprocess.maskrcnn"))


def test_predict_uses_the_tuned_file_beside_the_checkpoint(
    images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``auto`` reads the tune stage's ``postprocess.json`` beside the checkpoint (here: a min_size no cell
    reaches), ``stored`` the checkpoint's values; a file tuned on TTA outputs turns TTA on unless the caller says
    (and warns when told off); a file tuned for another checkpoint is refused."""
    post = project_params("postprocess.unet", min_size={"default": 5}, marker_threshold=0.3)
    (tmp_path / "model").mkdir()
    ckpt = save_unet(tmp_path / "model" / "best.pt", post.model_dump())
    record = {"model": "unet", "checkpoint_sha256": content_hash(load_checkpoint(ckpt)), "tta": True,
              "postprocess": {**post.model_dump(), "min_size": {"default": 1_000_000}}}
    (tmp_path / "model" / TUNED_FILE).write_text(json.dumps(record))
    stored = predict_images(ckpt, [images], tmp_path / "stored", device=CPU, postprocess="stored")
    assert stored["instances"] > 0
    with caplog.at_level("INFO", logger="cellseg.predict"):
        assert predict_images(ckpt, [images], tmp_path / "auto", device=CPU)["instances"] == 0
    assert "test-time augmentation: on, as" in caplog.text and "used without TTA" not in caplog.text
    assert predict_images(ckpt, [images], tmp_path / "plain", device=CPU, tta=False)["instances"] == 0
    assert "tuned on test-time-augmented outputs, used without TTA" in caplog.text
    named = predict_images(ckpt, [images], tmp_path / "named", device=CPU, postprocess=tmp_path / "model" / TUNED_FILE)
    assert named["instances"] == 0
    torch.manual_seed(1)
    save_checkpoint(ckpt, "unet", {**load_checkpoint(ckpt), "model_state": build_unet(
        project_params("unet", encoder="resnet18")).state_dict()})  # trained again
    with pytest.raises(DataError, match="postprocess.json: tuned for another checkpoint"):
        predict_images(ckpt, [images], tmp_path / "stale", device=CPU)
    assert not (tmp_path / "stale").exists()


def test_invalid_stored_postprocess_is_refused(tmp_path: Path) -> None:
    invalid = {**project_params("postprocess.unet").model_dump(), "mask_threshold": 2.0}
    with pytest.raises(DataError, match="stored postprocess are invalid \\(mask_threshold.default: "):
        load_predictor(save_unet(tmp_path / "bad.pt", invalid), CPU)


def test_tiny_images_and_odd_entries(checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Images of 1×1 and 3×2 pixels are segmented (padded for the network, cut back after); what is not an
    image file is left, with a warning naming it, not silently."""
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.fromarray(np.full((1, 1), 90, np.uint8)).save(folder / "dot.png")
    Image.fromarray(np.full((2, 3), 90, np.uint8)).save(folder / "strip.png")
    (folder / "notes.txt").write_text("plate layout")
    (folder / "sub.png").mkdir()
    with caplog.at_level("WARNING", logger="cellseg.predict"):
        counts = predict_images(checkpoint, [folder], tmp_path / "out", device=CPU)
    assert counts["images"] == 2
    assert any("left 2 entr(ies) that are not image files" in r.message and "notes.txt, sub.png" in r.message for r in caplog.records)
    assert tifffile.imread(tmp_path / "out" / "labels" / "dot.tif").shape == (1, 1)
    assert tifffile.imread(tmp_path / "out" / "labels" / "strip.tif").shape == (2, 3)
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", keep_default_na=False)
    assert set(submission["id"]) == {"dot", "strip"}


@pytest.fixture(scope="module")
def lab_folder(sartorius_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The 3 real public test images (read where they are), and a folder of variants of them made here: a
    12-bit camera image in a 16-bit TIFF, an RGB PNG, a JPEG, a 2048×2048 mosaic, a 64×64 crop and an odd size."""
    real = sorted((sartorius_dir / "test").glob("*.png"))
    grey = [np.asarray(Image.open(p)) for p in real]
    folder = tmp_path_factory.mktemp("lab")
    tifffile.imwrite(folder / "deep.tif", grey[0].astype(np.uint16) * 16 + 300)
    Image.fromarray(np.stack([grey[1]] * 3, axis=-1)).save(folder / "colour.png")
    Image.fromarray(grey[2]).save(folder / "photo.jpg", quality=95)
    mosaic = np.block([[grey[(r + c) % 3] for c in range(3)] for r in range(4)])[:2048, :2048]
    Image.fromarray(mosaic).save(folder / "mosaic.png")
    Image.fromarray(grey[0][100:164, 200:264]).save(folder / "crop.png")
    tifffile.imwrite(folder / "odd.tiff", grey[1][:333, :517])
    return folder, real


def test_predict_reads_a_labs_images_and_writes_every_output(
    checkpoint: Path, lab_folder: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """Every output for the real test images and their variants, consistent with each other: the label TIFFs
    have each image's own size, the tables and files count the same cells, the measurements are regionprops of
    the label TIFF with the file's own intensities, and an RGB copy of a grey image gives its cells."""
    folder, real = lab_folder
    out = tmp_path / "out"
    counts = predict_images(checkpoint, [*real, folder], out, device=CPU)
    stems = [p.stem for p in real] + ["colour", "crop", "deep", "mosaic", "odd", "photo"]
    assert counts == {"images": 9, "instances": counts["instances"], "skipped": 0} and counts["instances"] > 0
    summary = pd.read_csv(out / "images.csv").set_index("image")
    measurements = pd.read_csv(out / "cells.csv")
    coco = json.loads((out / "predictions.json").read_text())
    assert sorted(summary.index) == sorted(stems) and summary["cells"].sum() == counts["instances"]
    assert len(measurements) == len(coco["annotations"]) == counts["instances"]
    for stem in stems:
        labels = tifffile.imread(out / "labels" / f"{stem}.tif")
        source = next(p for p in [*real, *folder.iterdir()] if p.stem == stem)
        pixels = tifffile.imread(source) if source.suffix.startswith(".tif") else np.asarray(Image.open(source))
        assert labels.shape == pixels.shape[:2] == (summary.loc[stem, "height"], summary.loc[stem, "width"])
        assert int(labels.max()) == summary.loc[stem, "cells"]
        overlay = Image.open(out / "overlays" / f"{stem}.png")
        assert overlay.size[0] == labels.shape[1] and overlay.mode == "RGB"
        if labels.max():
            assert len(roifile.roiread(out / "rois" / f"{stem}.zip")) == labels.max()
            mine = measurements[measurements["image"] == stem]
            grey = pixels if pixels.ndim == 2 else pixels[..., 0]
            expected = regionprops_table(labels, intensity_image=grey, properties=("label", "area", "intensity_mean"))
            assert np.array_equal(mine["area"], expected["area"])
            assert np.allclose(mine["intensity_mean"], expected["intensity_mean"])
    assert measurements[measurements["image"] == "deep"]["intensity_mean"].min() >= 300  # 16-bit units
    original = tifffile.imread(out / "labels" / f"{real[1].stem}.tif")
    assert np.array_equal(tifffile.imread(out / "labels" / "colour.tif"), original)
    assert {image["kind"] for image in coco["images"]} == {"8-bit grey", "8-bit colour", "16-bit grey"}


def test_cli_flags_choose_the_outputs_and_skip_bad_files(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    """``--no-<output>`` leaves an output out; ``--skip-bad`` reports an unreadable file and a multi-page TIFF
    (skipped.csv) and segments the rest, where without it the first one stops the run and nothing is written."""
    (images / "broken.png").write_bytes(b"not a png")
    tifffile.imwrite(images / "stack.tif", np.zeros((3, 64, 96), np.uint8), photometric="minisblack")
    base = ["predict", "--model", str(checkpoint), str(images), "--device", "cpu", "--scale", "0.8"]
    assert main([*base, "--out", str(tmp_path / "strict")]) == 1 and not (tmp_path / "strict").exists()
    out = tmp_path / "out"
    assert main([*base, "--out", str(out), "--skip-bad", "--no-rois", "--no-overlay", "--no-submission"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "labels", "cells.csv", "images.csv", "predictions.json", "skipped.csv"]
    )
    skipped = pd.read_csv(out / "skipped.csv")
    assert [Path(f).name for f in skipped["file"]] == ["broken.png", "stack.tif"]
    assert "not a readable image" in skipped["reason"][0] and "multi-page TIFF" in skipped["reason"][1]
    assert sorted(pd.read_csv(out / "images.csv")["image"]) == ["a", "b", "c"]
    assert tifffile.imread(out / "labels" / "a.tif").shape == (64, 96)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--out", "o", "--scale", "20"])
