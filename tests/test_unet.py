"""U-Net construction: random, local-file and (offline) ImageNet encoder weights, and prediction."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from cellseg.celltypes import CELL_TYPES
from cellseg.data import N_CLASSES
from cellseg.errors import ParamsError, ResourceError
from cellseg.models.unet import build_unet
from helpers.project import project_params

ENCODER = "resnet18"  # small and quick to build on CPU


def unet(**changes: object) -> torch.nn.Module:
    """:func:`build_unet` of params.yaml's ``unet`` section with the small :data:`ENCODER` and ``changes``."""
    return build_unet(project_params("unet", **{"encoder": ENCODER, **changes}))


def unet_predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, classes, H, W) in eval mode, checking the cell-type head's output on the way."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        logits, type_logits = model(images)
    model.train(was_training)
    assert type_logits.shape == (len(images), len(CELL_TYPES))
    return logits.softmax(dim=1)


def perturbed(state: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with one tensor filled with a recognisable value."""
    state = {k: v.clone() for k, v in state.items()}
    state[key].fill_(0.125)
    return state


@pytest.mark.parametrize("in_channels", [3, 1])
def test_random_init_output_shape(in_channels: int) -> None:
    model = unet(channels=in_channels)
    probs = unet_predict(model, torch.rand(2, in_channels, 64, 64))
    assert probs.shape == (2, N_CLASSES, 64, 64) and N_CLASSES == 3
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 64, 64))
    assert model.training


def test_decoder_channels_are_a_param() -> None:
    model = unet(decoder_channels=[64, 32, 16, 8, 8])
    assert model.segmentation_head[0].in_channels == 8
    assert unet_predict(model, torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_project_params_build() -> None:
    """params.yaml's own ``unet`` section (its encoder) builds."""
    assert unet_predict(build_unet(project_params("unet")), torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_encoder_state_dict_file_loads(tmp_path: Path) -> None:
    state = perturbed(unet().encoder.state_dict(), "conv1.weight")
    torch.save(state, tmp_path / "encoder.pt")
    model = unet(encoder_weights=str(tmp_path / "encoder.pt"))
    assert torch.equal(model.encoder.conv1.weight, state["conv1.weight"])


def test_three_channel_encoder_file_adapts_to_one_channel(tmp_path: Path) -> None:
    state = perturbed(unet().encoder.state_dict(), "conv1.weight")
    torch.save(state, tmp_path / "encoder.pt")
    model = unet(encoder_weights=str(tmp_path / "encoder.pt"), channels=1)
    assert torch.equal(model.encoder.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert unet_predict(model, torch.rand(1, 1, 64, 64)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_full_model_file_loads(tmp_path: Path, wrap: str | None) -> None:
    key = "segmentation_head.0.bias"
    state = perturbed(unet(channels=1).state_dict(), key)
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, tmp_path / "model.pt")
    model = unet(encoder_weights=str(tmp_path / "model.pt"), channels=1)
    assert torch.equal(model.state_dict()[key], state[key])


def test_missing_file_names_the_param(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="unet.encoder_weights"):
        unet(encoder_weights=str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("content", [b"\x00\x13garbage bytes \xff" * 20, b""])
def test_garbage_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(ParamsError, match="garbage.pt"):
        unet(encoder_weights=str(path))


def test_truncated_checkpoint_names_the_file(tmp_path: Path) -> None:
    torch.save(unet().state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ParamsError, match="cut.pt"):
        unet(encoder_weights=str(tmp_path / "cut.pt"))


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    torch.save(unet(encoder="efficientnet-b0").state_dict(), tmp_path / "effnet.pt")
    with pytest.raises(ParamsError, match=r"unet.encoder_weights.*missing keys.*unexpected keys"):
        unet(encoder_weights=str(tmp_path / "effnet.pt"))


def test_shape_mismatch_is_refused(tmp_path: Path) -> None:
    state = unet().state_dict()
    # A 2-class head: the keys fit, not the shapes.
    for key in ("segmentation_head.0.weight", "segmentation_head.0.bias"):
        state[key] = state[key][:2].clone()
    torch.save(state, tmp_path / "two_classes.pt")
    with pytest.raises(ParamsError, match="size mismatch"):
        unet(encoder_weights=str(tmp_path / "two_classes.pt"))


def test_unknown_encoder_names_the_param() -> None:
    with pytest.raises(ParamsError, match="unet.encoder"):
        unet(encoder="no-such-encoder")


def test_imagenet_offline_raises_resource_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode fails as a dead network does, without the hub client's retries (~30 s).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        unet(encoder_weights="imagenet")
    except ResourceError as exc:
        assert "ImageNet" in str(exc) and "unet.encoder_weights: none" in str(exc)
    else:
        pytest.skip("ImageNet weights are in the local cache: nothing failed to download")
