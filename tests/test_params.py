"""Params: every section validated before work, errors name the parameter."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg import config
from cellseg.errors import ParamsError

REPO = Path(__file__).resolve().parents[1]


def test_the_projects_params_file_is_valid() -> None:
    raw = config.read_params(REPO / "params.yaml")
    for name in config.SECTIONS:
        assert config.section(raw, name) is not None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"split": {"n_folds": 3, "fold": 3}}, "split: .*fold 3 is out of range for n_folds 3"),
        ({"split": {"n_folds": 1}}, r"split.n_folds: Input should be greater than or equal to 2 \(got 1\)"),
        ({"split": {"n_folds": "5"}}, r"split.n_folds: Input should be a valid integer \(got '5'\)"),
        ({"data": {"source": "zenodo"}}, r"data.source: Input should be 'synthetic', 'kaggle' or 'livecell' \(got 'zenodo'\)"),
        ({"data": {"limit_images": 0}}, r"data.limit_images: .*greater than or equal to 1"),
        ({"data": {"limt_images": 3}}, r"data.limt_images: Extra inputs are not permitted"),
        ({"synth": {"images": 2.5}}, r"synth.images: Input should be a valid integer"),
        ({"synth": [1, 2]}, r"synth: expected a mapping, got list"),
    ],
)
def test_bad_values_name_the_param(raw: dict, message: str) -> None:
    name = next(iter(raw))
    with pytest.raises(ParamsError, match=message):
        config.section(raw, name)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file is missing"):
        config.read_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml: not valid YAML"):
        config.read_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ParamsError, match="expected a mapping of sections"):
        config.read_params(tmp_path / "list.yaml")


def test_augment_names_are_the_data_modules() -> None:
    """The params accept exactly the augmentations :mod:`cellseg.data` builds."""
    from cellseg.augment import AUGMENTATIONS

    assert config.section({"unet": {"augment": list(AUGMENTATIONS)}}, "unet").augment == list(AUGMENTATIONS)
    with pytest.raises(ParamsError, match="maskrcnn.augment.1: Value error, unknown augmentation 'spin'; the names are hflip"):
        config.section({"maskrcnn": {"augment": ["hflip", "spin"]}}, "maskrcnn")


def test_unknown_sections_are_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text() + "\ntrian:\n  unet: {epochs: 1}\n")
    with pytest.raises(ParamsError, match="unknown section 'trian': did you mean 'train'\\?"):
        config.read_params(path)
    path.write_text("zzz: 1\n")
    with pytest.raises(ParamsError, match="unknown section 'zzz': the sections are data, synth, split"):
        config.read_params(path)


def test_anchors_are_fine_aliases_are_not(tmp_path: Path) -> None:
    """An anchor alone changes nothing; the first alias is refused, with its line, before anything expands."""
    path = tmp_path / "params.yaml"
    path.write_text("split: &s {n_folds: 3}\n")
    assert config.read_params(path) == {"split": {"n_folds": 3}}
    path.write_text("split: &s {n_folds: 3}\npatches:\n  size: 64\n  extra: *s\n")
    with pytest.raises(ParamsError, match="line 4: YAML aliases \\(\\*s\\) are not accepted"):
        config.read_params(path)


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"unet": {"seed": -3}}, r"train.unet.seed: Input should be greater than or equal to 0"),
        ("data", {"seed": 2**32}, r"data.seed: Input should be less than or equal to 4294967295"),
        ("train", {"unet": {"device": "tpu"}}, r"train.unet.device: Value error, 'tpu' is not a device name"),
        ("train", {"maskrcnn": {"lr": float("nan")}}, r"train.maskrcnn.lr: Input should be a finite number"),
        ("maskrcnn", {"score_threshold": {"cort": 1.5}}, r"maskrcnn.score_threshold.cort: .*less than or equal to 1"),
        ("unet", {"decoder_channels": [128, 64, 32, 16, 0]}, r"unet.decoder_channels.4: .*greater than or equal to 1"),
        ("synth", {"images": 10**6}, r"synth.images: Input should be less than or equal to 10000"),
    ],
)
def test_values_are_checked_for_meaning(section: str, values: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        config.section({section: values}, section)


def test_cuda_devices_are_checked_against_the_machine() -> None:
    import torch

    count = torch.cuda.device_count()
    with pytest.raises(ParamsError, match=f"train.unet.device: .*'cuda:{count}' but this machine has"):
        config.section({"train": {"unet": {"device": f"cuda:{count}"}}}, "train")
    assert config.section({"train": {"unet": {"device": "cpu"}}}, "train").unet.device == "cpu"
