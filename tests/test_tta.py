"""Test-time augmentation of the U-Net: outputs averaged over the 8 grid symmetries, moved and turned back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import ndimage

from cellseg.checkpoint import save_checkpoint
from cellseg.errors import ParamsError
from cellseg.flows import FLOW_SCALE, flows_from_labels
from cellseg.inference import load_predictor
from cellseg.io import write_png
from cellseg.metrics import CompetitionScore
from cellseg.models.maskrcnn import build_maskrcnn
from cellseg.models.unet import UNetPredictor
from cellseg.predict import predict_images
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


def test_mask_rcnn_refuses_tta(tmp_path: Path) -> None:
    """Only the U-Net has test-time augmentation; asking it of a Mask R-CNN checkpoint is a clear error."""
    params = project_params("maskrcnn", weights="none")
    save_checkpoint(tmp_path / "m.pt", "maskrcnn", {
        "model_params": params.model_dump(), "postprocess": project_params("postprocess.maskrcnn").model_dump(),
        "model_state": build_maskrcnn(params).state_dict(), "epoch": 1,
    })
    with pytest.raises(ParamsError, match="Mask R-CNN has no test-time augmentation"):
        load_predictor(tmp_path / "m.pt", CPU, tta=True)
    (tmp_path / "images").mkdir()
    write_png(tmp_path / "images" / "a.png", image_and_cells()[0])
    with pytest.raises(ParamsError, match="Mask R-CNN has no test-time augmentation"):
        predict_images(tmp_path / "m.pt", [tmp_path / "images"], tmp_path / "out", device=CPU, tta=True)
    assert not (tmp_path / "out").exists()


def test_evaluate_tta_names_only_models_that_have_it() -> None:
    assert project_params("evaluate", tta=["unet"]).tta == ["unet"]
    with pytest.raises(ValidationError, match="Input should be .unet."):
        project_params("evaluate", tta=["maskrcnn"])
