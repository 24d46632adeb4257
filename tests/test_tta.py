"""Test-time augmentation: the U-Net's outputs averaged over the 8 grid symmetries, moved and turned back; Mask
R-CNN's detections of the image's flips flipped back and fused."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import ndimage

from cellseg.flows import FLOW_SCALE, flows_from_labels
from cellseg.metrics import CompetitionScore
from cellseg.models.detections import Detections
from cellseg.models.maskrcnn import MaskRCNNPredictor
from cellseg.models.maskrcnn_tta import FLIPS, flip_back, flipped, merge
from cellseg.models.unet import UNetPredictor
from helpers.cells import cells
from helpers.project import project_params

CPU = torch.device("cpu")


def image_and_cells() -> tuple[np.ndarray, np.ndarray]:
    """An image of :func:`cells` as dark cells on a light background, and their labels."""
    labels = cells()
    return np.where(labels > 0, 40, 210).astype(np.uint8), labels


class SeesCells(torch.nn.Module):
    """A stand-in U-Net that finds the dark cells of the image it is given, wherever they are (so it commutes
    with every symmetry): their flows (target ``flows``) or their interior and boundary (``boundary``). Its
    cell type is astro."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = []
        for image in images[:, 0].numpy():
            labels, _ = ndimage.label(image < 0)
            if self.target == "flows":
                flows = FLOW_SCALE * flows_from_labels(labels)
                maps.append(np.concatenate([flows, np.where(labels > 0, 6.0, -6.0)[None]]))
            else:
                interior = ndimage.binary_erosion(labels > 0)
                boundary = (labels > 0) & ~interior
                maps.append(8.0 * np.stack([labels == 0, interior, boundary]).astype(np.float32))
        types = torch.tensor([[0.0, 5.0, 0.0]]).repeat(len(images), 1)
        return torch.from_numpy(np.stack(maps)).float() + self.weight, types


@pytest.mark.parametrize("target", ["flows", "boundary"])
def test_tta_of_a_network_that_commutes_with_the_symmetries_is_that_network(target: str) -> None:
    """Moving each output back (and turning flow vectors back) makes the 8 outputs agree: their mean is the
    plain output, and the cells are the same."""
    image, labels = image_and_cells()
    params = project_params("unet", target=target, channels=1)
    post = project_params("postprocess.unet", min_size={"default": 5})
    plain = UNetPredictor(SeesCells(target), params, post, CPU)
    augmented = UNetPredictor(SeesCells(target), params, post, CPU, tta=True)
    outputs, tta_outputs = plain.outputs(image), augmented.outputs(image)
    maps, types, tta_maps, tta_types = outputs.maps, outputs.type_probs, tta_outputs.maps, tta_outputs.type_probs
    cells = labels > 0
    if target == "flows":  # cellpose's centre pixel may move by one under a symmetry: most vectors agree
        unit = maps[:2] / np.maximum(np.linalg.norm(maps[:2], axis=0), 1e-6)
        tta_unit = tta_maps[:2] / np.maximum(np.linalg.norm(tta_maps[:2], axis=0), 1e-6)
        assert ((unit * tta_unit).sum(axis=0)[cells] > 0.9).mean() > 0.97
        np.testing.assert_allclose(tta_maps[2], maps[2])
    else:
        np.testing.assert_allclose(tta_maps, maps, atol=1e-6)
    np.testing.assert_allclose(tta_types, types, atol=1e-6)
    for predictor in (plain, augmented):
        (found,) = predictor.predict([image])
        score = CompetitionScore()
        score.add(labels, found.labels)
        assert len(found) == 3 and score.result()["score"] > 0.9


class Rightwards(SeesCells):
    """Flows pointing right in whatever image it is given: a network that does not commute with the symmetries."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, types = super().forward(images)
        maps[:, 0], maps[:, 1] = 0.0, 1.0
        return maps, types


def test_tta_turns_each_output_back() -> None:
    """"Right" in each of the 8 moved images is, moved and turned back, one of the 4 directions, twice each:
    the mean is zero (without turning the vectors back it would stay "right")."""
    image, _ = image_and_cells()
    params = project_params("unet", target="flows", channels=1)
    post = project_params("postprocess.unet", min_size={"default": 5})
    plain = UNetPredictor(Rightwards("flows"), params, post, CPU).outputs(image).maps
    np.testing.assert_allclose(plain[1], 1.0)
    maps = UNetPredictor(Rightwards("flows"), params, post, CPU, tta=True).outputs(image).maps
    np.testing.assert_allclose(maps[:2], 0.0, atol=1e-6)


class SeesSquares(torch.nn.Module):
    """A "Mask R-CNN" that finds each bright connected blob of its image: its box, a soft mask of 0.9 inside, class
    2, score 0.8 + its size / 10⁴. It commutes with flips, as a good model nearly does."""

    def __init__(self) -> None:
        super().__init__()
        self.roi_heads = SimpleNamespace(score_thresh=0.0)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            blobs, n = ndimage.label(image[0].numpy() > 0.5)
            masks = np.stack([(blobs == k + 1) * 0.9 for k in range(n)]).astype(np.float32)
            boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(blobs)]
            outputs.append({
                "boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.full((n,), 2),
                "scores": torch.from_numpy(0.8 + masks.astype(bool).sum(axis=(1, 2)) / 1e4).float(),
                "masks": torch.from_numpy(masks)[:, None],
            })
        return outputs


def squares() -> np.ndarray:
    image = np.zeros((40, 56), dtype=np.uint8)
    image[3:12, 4:20] = image[20:36, 30:41] = image[25:30, 5:9] = 255
    return image


def test_mask_rcnn_tta_of_a_model_that_commutes_with_flips_is_that_model() -> None:
    """Each flip's detections flipped back fall on the plain ones: fused, they give the same cells and scores."""
    params, post = project_params("maskrcnn"), project_params("postprocess.maskrcnn", min_size=1)
    plain = MaskRCNNPredictor(SeesSquares(), params, post, CPU)
    augmented = MaskRCNNPredictor(SeesSquares(), params, post, CPU, tta=True)
    (found,), (merged,) = plain.predict([squares()]), augmented.predict([squares()])
    assert len(found) == 3
    np.testing.assert_array_equal(merged.labels, found.labels)
    np.testing.assert_allclose(merged.scores, found.scores, rtol=1e-6)
    views = [flip_back(plain.outputs(flipped(squares(), *flip)), *flip) for flip in FLIPS]
    for view in views[1:]:
        np.testing.assert_allclose(view.boxes, views[0].boxes)
        assert all(np.array_equal(pasted(view, k), pasted(views[0], k)) for k in range(3))


def pasted(found: Detections, k: int) -> np.ndarray:
    """Detection ``k``'s soft mask on the whole image."""
    x0, y0, x1, y1 = found.windows[k]
    whole = np.zeros(found.shape, np.uint8)
    whole[y0:y1, x0:x1] = found.masks[k]
    return whole


def test_fusion_averages_scores_over_views_and_masks_over_the_views_that_found_the_cell() -> None:
    """A cell one view of four misses keeps its mask (the mean of the three that found it) and 3/4 of their
    mean score, as weighted boxes fusion scores it."""
    one = MaskRCNNPredictor(SeesSquares(), project_params("maskrcnn"), project_params("postprocess.maskrcnn"), CPU)
    full = one.outputs(squares())
    missing = Detections(full.shape, full.classes[1:], full.scores[1:], full.boxes[1:], full.windows[1:], full.masks[1:])
    fused = merge([full, full, full, missing])
    assert len(fused.scores) == 3
    for k in range(3):
        (j,) = np.flatnonzero(np.abs(fused.boxes - full.boxes[k]).max(axis=1) < 1e-3)  # the same box
        np.testing.assert_allclose(fused.scores[j], full.scores[k] * (3 / 4 if k == 0 else 1), rtol=1e-6)
        np.testing.assert_array_equal(pasted(fused, j), pasted(full, k))


def test_evaluate_tta_names_only_models_that_have_it() -> None:
    assert project_params("evaluate", tta=["unet", "maskrcnn"]).tta == ["unet", "maskrcnn"]
    with pytest.raises(ValidationError, match="Input should be 'unet' or 'maskrcnn'"):
        project_params("evaluate", tta=["cellpose"])
