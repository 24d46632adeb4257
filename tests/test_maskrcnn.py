"""Mask R-CNN: construction and weights, a training step, instances from outputs, the dataset and validation (CPU)."""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
from torchvision.ops import FrozenBatchNorm2d

from cellseg import config, rle
from cellseg.augment import build_augmentations
from cellseg.celltypes import CELL_TYPES, UNKNOWN_CLASS, by_category, per_type
from cellseg.checkpoint import save_checkpoint
from cellseg.config import MaskRCNNParams, MaskRCNNPostprocess
from cellseg.data import ImageStore
from cellseg.decode import IMAGES_TABLE, INSTANCES_TABLE, decode_dataset, decode_image
from cellseg.errors import DataError, ParamsError, ResourceError
from cellseg.inference import load_predictor
from cellseg.instances import Instances, majority_class
from cellseg.models.maskrcnn import (
    BACKBONE_WEIGHTS,
    COCO_WEIGHTS,
    HEADS,
    InstanceDataset,
    MaskRCNNTask,
    architecture,
    build_maskrcnn,
    collate,
    instance_target,
    paste_windows,
    predict_instances,
    score_floor,
)
from cellseg.sources import SourceData
from cellseg.sources.kaggle import read_kaggle
from cellseg.sources.read import load_source
from cellseg.sources.synthetic import synthesize
from helpers.project import project_params

CPU = torch.device("cpu")
# Small enough for CPU: images are resized to about 65×88 and few proposals/detections are kept.
TINY_CHANGES = {
    "image_scale": 0.125,
    "detections_per_img": 20,
    "rpn_pre_nms_top_n": 200,
    "rpn_post_nms_top_n": 100,
    "box_batch_size_per_image": 8,
}
LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def tiny_params(**changes: object) -> MaskRCNNParams:
    """params.yaml's ``maskrcnn`` section made CPU-sized (:data:`TINY_CHANGES`), with ``changes``."""
    return project_params("maskrcnn", **{**TINY_CHANGES, **changes})


def post(**changes: object) -> MaskRCNNPostprocess:
    """params.yaml's ``postprocess.maskrcnn`` section with ``changes``."""
    return project_params("postprocess.maskrcnn", **changes)


def tiny_task(params: MaskRCNNParams | None = None) -> MaskRCNNTask:
    """The training task of ``params`` (default: :func:`tiny_params`) with params.yaml's post-processing."""
    return MaskRCNNTask(params or tiny_params(), post())


def tiny_batch(n_images: int = 1, height: int = 64, width: int = 96) -> tuple[list[torch.Tensor], list[dict]]:
    """Bright rectangles (2-3 cells per image) on a dark, slightly noisy background."""
    rng = np.random.default_rng(0)
    images, targets = [], []
    for k in range(n_images):
        labels = np.zeros((height, width), dtype=np.uint16)
        labels[8:24, 10:30] = 1
        labels[30:50, 40:60] = 2
        if k % 2 == 0:
            labels[40:60, 70:90] = 3
        image = np.where(labels > 0, 0.8, 0.2) + rng.normal(0, 0.02, labels.shape)
        images.append(torch.from_numpy(image.astype(np.float32)).clamp(0, 1).expand(3, -1, -1).contiguous())
        masks = (labels[None] == np.arange(1, labels.max() + 1)[:, None, None]).astype(np.uint8)
        targets.append({**instance_target(masks, 1 + k % 3), "image_id": f"img{k}", "cell_type": CELL_TYPES[k % 3]})
    return images, targets


def fake_output(masks: list[np.ndarray], classes: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
    """A Mask R-CNN output dict for hand-made soft masks (each box: its mask's non-zero extent)."""
    boxes = []
    for mask in masks:
        rows, cols = np.nonzero(mask)
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(classes, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "masks": torch.from_numpy(np.stack(masks).astype(np.float32))[:, None],
    }


def box(shape: tuple[int, int], rows: slice, cols: slice, value: float = 0.9) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.float32)
    mask[rows, cols] = value
    return mask


# ---------------------------------------------------------------------------------------------------
# Training


def test_train_step_losses_gradients_and_update() -> None:
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_params())
    stats = tiny_task().train_step(model, tiny_batch(2), CPU)
    assert set(stats) == {"loss", *LOSSES}
    assert all(torch.isfinite(v) for v in stats.values())
    torch.testing.assert_close(stats["loss"].detach(), sum(stats[k] for k in LOSSES))
    stats["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert not torch.equal(before, model.roi_heads.box_predictor.cls_score.weight)


def test_fixed_batch_loss_decreases() -> None:
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_params())
    task, batch = tiny_task(), tiny_batch(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(5):
        loss = task.train_step(model, batch, CPU)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------------------------------------------
# Instances from outputs


def test_eval_predictions_give_consistent_instances() -> None:
    torch.manual_seed(0)
    everything = post(score_threshold={"default": 0.0}, min_size={"default": 0})
    model = build_maskrcnn(tiny_params()).eval()
    score_floor(model, everything)
    images, _ = tiny_batch(1)
    with torch.inference_mode():
        (output,) = model(images)
    assert output["masks"].shape[1:] == (1, 64, 96)
    instances = predict_instances(output, everything)
    n = len(instances.scores)
    assert instances.labels.dtype == np.uint16 and instances.labels.shape == (64, 96)
    assert n > 0 and set(np.unique(instances.labels)) == set(range(n + 1))  # labels 1..n, each non-empty
    assert set(instances.classes.tolist()) <= {1, 2, 3} and len(instances.classes) == n
    assert np.all((instances.scores >= 0) & (instances.scores <= 1)) and np.all(np.diff(instances.scores) <= 0)
    assert set(instances.scores.tolist()) <= set(output["scores"].tolist())


def test_detections_under_every_threshold_are_dropped_early_without_changing_instances() -> None:
    """score_floor sets the model's box score threshold to the lowest per-class one: the instances are those a
    model keeping every detection down to 0.01 gives, after the per-class thresholds."""
    thresholds = {"shsy5y": 0.8, "astro": 0.85, "cort": 0.88}  # within this random model's scores
    floored = post(score_threshold=thresholds, min_size={"default": 1})
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_params(backbone="resnet50_fpn_v2", detections_per_img=100)).eval()  # its scores
    score_floor(model, floored)
    assert model.roi_heads.score_thresh == 0.8
    score_floor(model, post(score_threshold={"astro": 0.3, "default": 0.6}))
    assert model.roi_heads.score_thresh == 0.3  # a default counts for the types it serves
    score_floor(model, floored)
    images, _ = tiny_batch(1)
    with torch.inference_mode():
        (early,) = model(images)
        model.roi_heads.score_thresh = 0.01
        (late,) = model(images)
    assert len(late["scores"]) > len(early["scores"]) > 0
    kept, reference = predict_instances(early, floored), predict_instances(late, floored)
    assert len(kept.scores) > 0
    np.testing.assert_array_equal(kept.labels, reference.labels)
    np.testing.assert_array_equal(kept.classes, reference.classes)
    np.testing.assert_array_equal(kept.scores, reference.scores)


def test_paste_windows_hold_every_pasted_mask_pixel() -> None:
    """Where a real model (random init, boxes of all sizes and at the borders) pasted a mask, the window has it."""
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_params(detections_per_img=100)).eval()
    score_floor(model, post(score_threshold={"default": 0.0}))
    images, _ = tiny_batch(2)
    with torch.inference_mode():
        outputs = model(images)
    for output in outputs:
        masks = output["masks"][:, 0].numpy()
        windows = paste_windows(output["boxes"].numpy(), masks.shape[1:])
        assert len(masks) > 50
        for mask, (x0, y0, x1, y1) in zip(masks, windows):
            assert 0 <= x0 < x1 <= masks.shape[2] and 0 <= y0 < y1 <= masks.shape[1]
            inside = np.zeros(mask.shape, dtype=bool)
            inside[y0:y1, x0:x1] = True
            assert mask[inside].any() and not mask[~inside].any()



def test_mask_threshold_per_class() -> None:
    """Each detection's soft mask is binarised at its own class's ``mask_threshold``."""
    shape = (20, 30)
    ramp = np.zeros(shape)
    ramp[2:12, 2:12] = np.linspace(0.05, 0.95, 10)[None, :]  # 10 columns, 0.05 .. 0.95
    params = post(mask_threshold={"astro": 0.7, "default": 0.3}, min_size={"default": 1}, score_threshold=0.1)
    for category, columns in ((1, 7), (2, 3)):  # above 0.3: 7 columns; above 0.7: 3
        (label,) = predict_instances(fake_output([ramp], [category], [0.9]), params).labels[None]
        assert int((label == 1).sum()) == 10 * columns


def test_overlap_goes_to_the_higher_score() -> None:
    shape = (20, 30)
    low = box(shape, slice(2, 12), slice(2, 16))
    high = box(shape, slice(6, 18), slice(10, 26))
    params = post(min_size={"default": 1}, score_threshold={"default": 0.1})
    instances = predict_instances(fake_output([low, high], [1, 1], [0.6, 0.9]), params)
    np.testing.assert_array_equal(instances.scores, np.array([0.9, 0.6], dtype=np.float32))
    np.testing.assert_array_equal(instances.labels == 1, high > 0.5)  # the overlap belongs to the 0.9 mask
    np.testing.assert_array_equal(instances.labels == 2, (low > 0.5) & ~(high > 0.5))


def test_mask_threshold_and_per_class_min_size() -> None:
    shape = (20, 30)
    soft = box(shape, slice(0, 10), slice(0, 10), value=0.4)  # below mask_threshold 0.5: empty, dropped
    small = box(shape, slice(12, 15), slice(0, 3))  # 9 px
    params = post(mask_threshold=0.5, min_size={"shsy5y": 5, "astro": 10, "cort": 5}, score_threshold={"default": 0.1})
    kept = predict_instances(fake_output([soft, small], [1, 1], [0.9, 0.8]), params)
    assert kept.classes.tolist() == [1] and int((kept.labels == 1).sum()) == 9
    dropped = predict_instances(fake_output([soft, small], [1, 2], [0.9, 0.8]), params)  # astro needs 10 px
    assert len(dropped.scores) == 0 and not dropped.labels.any()


@pytest.mark.parametrize(
    "thresholds", [{"shsy5y": 0.3, "astro": 0.6, "cort": 0.5}, {"shsy5y": 0.3, "default": 0.6}]
)
def test_per_class_score_threshold(thresholds: dict[str, float]) -> None:
    """Each class has its own score threshold; with a ``default``, the classes it does not name take that one."""
    shape = (20, 30)
    masks = [box(shape, slice(0, 8), slice(0, 8)), box(shape, slice(10, 18), slice(10, 18))]
    params = post(score_threshold=thresholds, min_size={"default": 1})
    instances = predict_instances(fake_output(masks, [2, 1], [0.45, 0.45]), params)
    assert instances.classes.tolist() == [1]  # astro at 0.45 < 0.6 dropped, shsy5y at 0.45 >= 0.3 kept
    np.testing.assert_array_equal(instances.labels == 1, masks[1] > 0.5)


def test_default_serves_the_cell_types_not_named() -> None:
    values = {"astro": 100, "default": 30}
    assert [per_type(values, name) for name in CELL_TYPES] == [30, 100, 30]
    assert by_category(values, 0) == [0, 30, 100, 30]  # indexed by category id; 0: the unknown class
    assert by_category({"shsy5y": 1, "astro": 2, "cort": 3}, -1) == [-1, 1, 2, 3]


def test_missing_per_class_entry_is_refused_by_the_params() -> None:
    """A per-type param must cover every cell type: its validation says so, before any prediction."""
    with pytest.raises(ValidationError, match=r"score_threshold\n.*no entry for astro, cort and no 'default'"):
        post(score_threshold={"shsy5y": 0.3})
    sections = {name: project_params(f"postprocess.{name}").model_dump() for name in ("unet", "maskrcnn")}
    sections["maskrcnn"]["score_threshold"] = {"shsy5y": 0.3}
    with pytest.raises(ParamsError, match=r"postprocess\.maskrcnn\.score_threshold: .*no entry for astro, cort"):
        config.section({"postprocess": sections}, "postprocess")
    sections["maskrcnn"]["score_threshold"] = {"shsy5y": 0.3, "hela": 0.5, "default": 0.4}
    with pytest.raises(ParamsError, match=r"postprocess\.maskrcnn\.score_threshold: .*unknown cell type 'hela'"):
        config.section({"postprocess": sections}, "postprocess")


def test_empty_output() -> None:
    output = {"labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 8, 9),
              "boxes": torch.zeros(0, 4)}
    instances = predict_instances(output, post())
    assert instances.labels.shape == (8, 9) and not instances.labels.any() and len(instances.classes) == 0
    assert instances.image_class == UNKNOWN_CLASS and instances.image_type is None


def test_image_class_is_the_majority_of_the_kept_cells() -> None:
    """Two cort cells kept; three astro detections, two of them below astro's minimum size: the image is cort."""
    shape = (40, 40)
    masks = [
        box(shape, slice(0, 8), slice(0, 8)),
        box(shape, slice(0, 8), slice(10, 18)),
        box(shape, slice(20, 28), slice(0, 8)),
        box(shape, slice(30, 32), slice(30, 32)),
        box(shape, slice(35, 37), slice(35, 37)),
    ]
    params = post(min_size={"shsy5y": 1, "astro": 10, "cort": 1}, score_threshold={"default": 0.1})
    instances = predict_instances(fake_output(masks, [3, 3, 2, 2, 2], [0.9, 0.8, 0.7, 0.6, 0.5]), params)
    assert instances.classes.tolist() == [3, 3, 2]
    assert instances.image_class == 3 and instances.image_type == "cort"


def test_majority_class_and_image_type() -> None:
    assert majority_class(np.array([3, 1, 3, 2])) == 3
    assert majority_class(np.array([2, 3, 3, 2])) == 2  # a tie: the lowest category
    assert majority_class(np.array([], dtype=np.int64)) == UNKNOWN_CLASS
    empty = np.zeros((2, 2), np.uint16)
    assert [Instances(empty, np.zeros(0), np.zeros(0), image_class=c).image_type for c in (0, 1, 2, 3)] == [
        None, *CELL_TYPES
    ]


# ---------------------------------------------------------------------------------------------------
# Weights


def test_random_init_has_the_configured_anchors_and_classes() -> None:
    model = build_maskrcnn(tiny_params(aspect_ratios=[0.5, 1.0, 2.0, 3.0]))
    assert model.rpn.head.cls_logits.out_channels == 4
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert model.transform.min_size == (65,) and model.transform.max_size == 88


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """The state dict of a freshly built tiny model."""
    return build_maskrcnn(tiny_params()).state_dict()


@pytest.mark.parametrize("wrap", [None, "model_state", "state_dict"])
def test_local_file_loads(tmp_path: Path, tiny_state: dict[str, torch.Tensor], wrap: str | None) -> None:
    key = "roi_heads.box_predictor.cls_score.bias"
    state = {k: v.clone() for k, v in tiny_state.items()}
    state[key].fill_(0.125)
    torch.save(state if wrap is None else {"model": "maskrcnn", wrap: state, "epoch": 3}, tmp_path / "w.pt")
    model = build_maskrcnn(tiny_params(weights=str(tmp_path / "w.pt")))
    assert torch.equal(model.state_dict()[key], state[key])


def test_coco_class_count_file_keeps_all_but_the_predictors(tmp_path: Path) -> None:
    coco = build_maskrcnn(tiny_params(aspect_ratios=[0.5, 1.0, 2.0]), num_classes=91)  # COCO's shapes
    torch.save(coco.state_dict(), tmp_path / "coco.pt")
    model = build_maskrcnn(tiny_params(weights=str(tmp_path / "coco.pt")))  # 5 aspect ratios, 4 classes
    own = model.state_dict()
    for key, value in coco.state_dict().items():
        assert torch.equal(own[key], value) == (own[key].shape == value.shape), key
    assert own["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    assert torch.equal(own["rpn.head.conv.0.0.weight"], coco.state_dict()["rpn.head.conv.0.0.weight"])


def test_cellseg_checkpoint_as_weights_and_predictor(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    floor = post(score_threshold={"default": 0.0})
    stored = {"model_params": tiny_params().model_dump(), "postprocess": floor.model_dump()}
    save_checkpoint(tmp_path / "best.pt", "maskrcnn", {**stored, "model_state": tiny_state})
    model = build_maskrcnn(tiny_params(weights=str(tmp_path / "best.pt")))
    assert all(torch.equal(v, tiny_state[k]) for k, v in model.state_dict().items())
    predictor = load_predictor(tmp_path / "best.pt", CPU)
    assert predictor.name == "maskrcnn" and predictor.model.roi_heads.score_thresh == 0.0  # the stored floor
    tuned = load_predictor(tmp_path / "best.pt", CPU, post(score_threshold={"default": 0.7}))
    assert tuned.post.score_threshold == {"default": 0.7} and tuned.model.roi_heads.score_thresh == 0.7
    image = np.random.default_rng(0).integers(0, 256, (64, 96), dtype=np.uint8)
    (instances,) = predictor.predict([image])
    assert instances.labels.shape == (64, 96) and instances.labels.dtype == np.uint16
    assert len(instances) == int(instances.labels.max()) and set(instances.classes.tolist()) <= {1, 2, 3}
    assert instances.image_class == majority_class(instances.classes)


def test_foreign_state_dict_is_refused(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state)
    state["backbone.body.conv1.weight"] = torch.zeros(1)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "foreign.pt")
    with pytest.raises(ParamsError, match=r"maskrcnn\.weights.*1 unexpected keys \['extra\.weight'\]"):
        build_maskrcnn(tiny_params(weights=str(tmp_path / "foreign.pt")))
    del state["extra.weight"]
    torch.save(state, tmp_path / "foreign.pt")
    with pytest.raises(ParamsError, match=r"shape mismatches \['backbone\.body\.conv1\.weight"):
        build_maskrcnn(tiny_params(weights=str(tmp_path / "foreign.pt")))


def test_missing_and_garbage_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"maskrcnn\.weights.*nowhere\.pt"):
        build_maskrcnn(tiny_params(weights=str(tmp_path / "nowhere.pt")))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint\xff" * 10)
    with pytest.raises(ParamsError, match=r"maskrcnn\.weights.*garbage\.pt"):
        build_maskrcnn(tiny_params(weights=str(garbage)))


@pytest.mark.parametrize("weights", ["coco", "imagenet"])
@pytest.mark.parametrize("backbone", ["resnet50_fpn_v2", "resnet18_fpn", "mobilenet_v3_large_fpn"])
def test_offline_downloads_raise_resource_error(monkeypatch: pytest.MonkeyPatch, backbone: str, weights: str) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    if weights == "coco" and backbone not in COCO_WEIGHTS:
        with pytest.raises(ParamsError, match=rf"maskrcnn.weights: torchvision has no COCO Mask R-CNN with backbone '{backbone}'"):
            build_maskrcnn(tiny_params(backbone=backbone, weights=weights))
        return
    try:
        build_maskrcnn(tiny_params(backbone=backbone, weights=weights, mask_head_channels=256))
    except ResourceError as exc:
        assert "could not be downloaded (URLError" in str(exc) and "maskrcnn.weights: none" in str(exc)
    else:
        pytest.skip(f"{weights} weights are in the local cache: nothing failed to download")


BACKBONES = ["resnet50_fpn_v2", "resnet50_fpn", "resnet34_fpn", "resnet18_fpn", "mobilenet_v3_large_fpn"]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_trains_predicts_and_reloads(backbone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each backbone gives a Mask R-CNN with the configured classes and anchors that trains a step, predicts, and
    whose weights load into the architecture a checkpoint rebuilds (also for a pretrained one's frozen BatchNorm)."""
    monkeypatch.setitem(BACKBONE_WEIGHTS, backbone, None)  # the ImageNet-initialised network, without the download
    torch.manual_seed(0)
    params = tiny_params(backbone=backbone)
    model = build_maskrcnn(params)
    per_level = model.rpn.anchor_generator.num_anchors_per_location()
    levels = 3 if backbone.startswith("mobilenet") else 5
    assert len(per_level) == levels and model.rpn.head.cls_logits.out_channels == per_level[0]
    assert per_level[0] == len(params.aspect_ratios) * (1 if levels == 5 else len(params.anchor_sizes))
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    stats = tiny_task(params).train_step(model, tiny_batch(1), CPU)
    stats["loss"].backward()
    assert torch.isfinite(stats["loss"])
    model.eval()
    with torch.inference_mode():
        (output,) = model(tiny_batch(1)[0])
    assert output["masks"].shape[1:] == (1, 64, 96)
    for weights in ("none", "imagenet"):  # what a checkpoint of either was trained as
        trained = build_maskrcnn(tiny_params(backbone=backbone, weights=weights))
        architecture(tiny_params(backbone=backbone, weights=weights)).load_state_dict(trained.state_dict())
        frozen = any(isinstance(m, FrozenBatchNorm2d) for m in trained.modules())
        assert frozen == (weights == "imagenet" and backbone != "resnet50_fpn_v2")  # as torchvision's builders


@pytest.mark.parametrize("backbone", ["resnet50_fpn_v2", "resnet18_fpn"])
def test_mask_head_width(backbone: str) -> None:
    """``mask_head_channels`` sets the width of the mask head's 4 convolutions and of the predictor's upsampling
    (ResNet-50 FPN v2's keeps its BatchNorm); the network trains a step and predicts full-size masks."""
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_params(backbone=backbone, mask_head_channels=32))
    convs = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(256, 32)] + [(32, 32)] * 3
    norms = [m for m in model.roi_heads.mask_head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == (4 if backbone == "resnet50_fpn_v2" else 0)
    predictor = model.roi_heads.mask_predictor
    assert predictor.conv5_mask.in_channels == 32 and predictor.mask_fcn_logits.out_channels == 4
    stats = tiny_task(tiny_params(backbone=backbone, mask_head_channels=32)).train_step(model, tiny_batch(1), CPU)
    stats["loss"].backward()
    assert torch.isfinite(stats["loss"]) and convs[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        (output,) = model(tiny_batch(1)[0])
    assert output["masks"].shape[1:] == (1, 64, 96)
    default = build_maskrcnn(tiny_params(backbone=backbone, mask_head_channels=256))  # torchvision's own head
    assert [m.out_channels for m in default.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)] == [256] * 4


def test_coco_weights_need_torchvisions_mask_head(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """COCO weights with another mask head width are refused before any download; a local file of another
    width names the mask head's tensors."""
    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ParamsError, match=r"maskrcnn\.mask_head_channels: .* 256 wide, not 128; set it to 256"):
        build_maskrcnn(tiny_params(backbone="resnet50_fpn", weights="coco", mask_head_channels=128))
    torch.save(build_maskrcnn(tiny_params(mask_head_channels=256)).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ParamsError, match=r"shape mismatches \['roi_heads\.mask_head\."):
        build_maskrcnn(tiny_params(mask_head_channels=128, weights=str(tmp_path / "wide.pt")))


def test_coco_weights_replace_the_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """``weights: coco`` loads torchvision's COCO state dict (here one of the right shapes, saved locally: the
    download is faked) into every layer but the 91-class predictors and the RPN logits of other anchors."""
    coco = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)  # COCO's shapes and anchors
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in coco.state_dict().items()}

    class Download:
        def get_state_dict(self, progress: bool = True) -> dict[str, torch.Tensor]:
            return state

    monkeypatch.setitem(COCO_WEIGHTS, "resnet50_fpn_v2", Download())
    model = build_maskrcnn(tiny_params(backbone="resnet50_fpn_v2", weights="coco", mask_head_channels=256))
    own = model.state_dict()
    kept = [k for k in state if own[k].shape == state[k].shape]
    assert all(torch.equal(own[k], state[k]) for k in kept)
    replaced = sorted(k for k in state if own[k].shape != state[k].shape)
    assert replaced and all(k.startswith(HEADS) for k in replaced)
    assert own["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    assert own["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 4
    assert not model.backbone.body.conv1.weight.requires_grad and model.backbone.body.layer4[0].conv1.weight.requires_grad


# ---------------------------------------------------------------------------------------------------
# Data and validation


@dataclass(frozen=True)
class Decoded:
    """A data set as the decode stage leaves it: its source, its output directory and an image store of it."""

    source: SourceData
    decoded_dir: Path
    store: ImageStore

    def dataset(self, augment: A.Compose | None = None) -> InstanceDataset:
        """The Mask R-CNN dataset of every image."""
        return InstanceDataset(self.store, self.decoded_dir, self.store.image_ids, augment)


def decoded(source: SourceData, decoded_dir: Path) -> Decoded:
    """Decode ``source`` into ``decoded_dir`` and hold its images."""
    decode_dataset(source, decoded_dir)
    ids = pd.read_parquet(decoded_dir / IMAGES_TABLE)["image_id"].tolist()
    return Decoded(source, decoded_dir, ImageStore(source.root, decoded_dir, ids))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Decoded:
    """3 synthetic images (one per cell type), decoded."""
    root = tmp_path_factory.mktemp("maskrcnn")
    synthesize(root / "raw", 3, 0)
    return decoded(load_source("synthetic", root / "raw"), root / "decoded")


def own_masks(data: SourceData, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    """Each annotation of ``image_id``, decoded on its own (overlaps kept), as an N×H×W stack in source order
    (the decode stage's label order)."""
    rows = data.annotations[data.annotations["image_id"] == image_id]["annotation"]
    return np.stack([rle.decode(a, shape) for a in rows]).astype(np.uint8)


def check_item(image: torch.Tensor, target: dict, masks: np.ndarray) -> None:
    """The target holds exactly ``masks`` (N×H×W), in order, with tight boxes."""
    n, height, width = masks.shape
    assert image.shape == (3, height, width) and image.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1 and torch.equal(image[0], image[2])
    boxes = target["boxes"].numpy()
    assert target["masks"].dtype == torch.uint8 and np.array_equal(target["masks"].numpy(), masks)
    assert boxes.shape == (n, 4) and target["labels"].dtype == torch.int64 and len(target["labels"]) == n
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.astype(int)):
        rows, cols = np.nonzero(mask)
        assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (y0, x0, y1, x1)


def test_instance_dataset_holds_each_cells_own_mask(synthetic: Decoded) -> None:
    store = synthetic.store
    dataset = synthetic.dataset()
    assert dataset.image_ids == store.image_ids
    for i, image_id in enumerate(dataset.image_ids):
        image, target = dataset[i]
        labels = store.labels(image_id)
        check_item(image, target, own_masks(synthetic.source, image_id, labels.shape))
        assert target["image_id"] == image_id and target["cell_type"] == store.cell_type(image_id)
        assert set(target["labels"].tolist()) == {CELL_TYPES.index(store.cell_type(image_id)) + 1}
        np.testing.assert_array_equal(image[0].numpy(), store.image(image_id) / np.float32(255))
        assert target["truth"].dtype == np.uint16
        np.testing.assert_array_equal(target["truth"], labels)  # validation's truth is evaluate's


def test_instance_dataset_keeps_the_overlaps_of_the_real_sample(real_dir: Path, tmp_path: Path) -> None:
    """The real image's cells overlap (3,354 pixels): the targets keep every cell whole, and the validation
    truth is the decode stage's label image."""
    data = decoded(read_kaggle(real_dir), tmp_path / "decoded")
    (image_id,) = data.store.image_ids
    image, target = data.dataset()[0]
    masks = own_masks(data.source, image_id, tuple(image.shape[1:]))
    check_item(image, target, masks)
    assert int((masks.sum(axis=0) > 1).sum()) == 3354
    truth = decode_image(data.source.annotations, masks.shape[1:], data.source.annotation_file)
    np.testing.assert_array_equal(target["truth"], truth.labels)


def test_instance_dataset_augmentation_moves_targets_with_image(synthetic: Decoded) -> None:
    dataset = synthetic.dataset(build_augmentations(["hflip", "vflip", "rotate90"], seed=3))
    image0, target0 = synthetic.dataset()[0]
    seen = set()
    for _ in range(8):
        image, target = dataset[0]
        masks = target["masks"].numpy()
        check_item(image, target, masks)  # boxes fit the augmented masks
        assert "truth" not in target  # only unaugmented (validation) items are scored
        assert masks.shape[1:] in {image0.shape[1:], image0.shape[1:][::-1]}
        assert len(masks) == len(target0["masks"])
        assert sorted(masks.sum(axis=(1, 2))) == sorted(target0["masks"].numpy().sum(axis=(1, 2)))
        # the image moved with the masks: the mean intensity inside all cells is unchanged
        inside = masks.any(axis=0)
        np.testing.assert_allclose(image[0].numpy()[inside].mean(), image0[0].numpy()[target0["masks"].numpy().any(axis=0)].mean(), rtol=1e-6)
        seen.add((masks.shape, image[0, :3, :3].sum().item()))
    assert len(seen) > 1  # some draw did transform


def test_instances_moved_out_of_the_image_are_left_out() -> None:
    masks = np.zeros((3, 6, 7), dtype=np.uint8)
    masks[0, 1:3, 2:5] = 1
    masks[2, 5, 6] = 1
    target = instance_target(masks, 2)
    assert target["boxes"].tolist() == [[2, 1, 5, 3], [6, 5, 7, 6]] and target["labels"].tolist() == [2, 2]
    assert np.array_equal(target["masks"].numpy(), masks[[0, 2]])
    empty = instance_target(np.zeros((0, 6, 7), dtype=np.uint8), 2)
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 6, 7) and empty["labels"].shape == (0,)


def test_instance_dataset_names_a_bad_annotation(tmp_path: Path, make_kaggle) -> None:
    data = decoded(read_kaggle(make_kaggle()), tmp_path / "decoded")
    table = data.decoded_dir / INSTANCES_TABLE
    instances = pd.read_parquet(table)
    instances.loc[4, "annotation"] = "5 3 1"
    instances.to_parquet(table, index=False)
    with pytest.raises(DataError, match=rf"{INSTANCES_TABLE}: row {instances.loc[4, 'row']}: malformed RLE"):
        data.dataset()


def test_validate_reports_documented_keys(synthetic: Decoded) -> None:
    torch.manual_seed(0)
    params = tiny_params(image_scale=0.25)
    model = build_maskrcnn(params)
    dataset = synthetic.dataset()
    loader = DataLoader(torch.utils.data.Subset(dataset, [0, 1]), batch_size=2, collate_fn=collate)
    metrics = tiny_task(params).validate(model, loader, CPU)
    types = {f"map/{synthetic.store.cell_type(image_id)}" for image_id in dataset.image_ids[:2]}
    assert set(metrics) == {"map", "n_pred", "images_per_s", *types}
    assert all(0 <= metrics[k] <= 1 for k in ("map", *types))
    assert 0 <= metrics["n_pred"] <= params.detections_per_img and metrics["images_per_s"] > 0
    assert model.training  # validate restores the mode it found
