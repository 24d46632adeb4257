"""Params: every section validated before work, errors name the parameter."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from cellseg import config
from cellseg.celltypes import CELL_TYPES, DEFAULT, by_category, per_type
from cellseg.errors import ParamsError
from helpers.project import project_params

REPO = Path(__file__).resolve().parents[1]
PROJECT = config.read_params(REPO / "params.yaml")
PER_TYPE = {  # every per-cell-type param, with a valid value for one cell type
    "postprocess.unet.min_size": 25,
    "postprocess.maskrcnn.score_threshold": 0.45,
    "postprocess.maskrcnn.min_size": 40,
}


def _with(changes: dict[str, object] | None = None, remove: str | None = None) -> dict:
    """The project's raw params with each dotted key of ``changes`` set (a whole value replaced) and the dotted
    key ``remove`` deleted: whole sections, as the stages read them, with one thing changed."""
    raw = copy.deepcopy(PROJECT)
    for dotted, value in (changes or {}).items():
        *path, key = dotted.split(".")
        target = raw
        for name in path:
            target = target[name]
        target[key] = value
    if remove:
        *path, key = remove.split(".")
        target = raw
        for name in path:
            target = target[name]
        del target[key]
    return raw


def _section_fields(model: type[config.Section], prefix: str) -> Iterator[tuple[str, object]]:
    """``(dotted name, field)`` of every field of ``model``, recursively into its nested sections."""
    for name, field in model.model_fields.items():
        dotted = f"{prefix}.{name}"
        yield dotted, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, config.Section):
            yield from _section_fields(field.annotation, dotted)


ALL_FIELDS = [item for name, model in config.SECTIONS.items() for item in _section_fields(model, name)]


def test_the_projects_params_file_is_valid() -> None:
    raw = config.read_params(REPO / "params.yaml")
    for name in config.SECTIONS:
        assert config.section(raw, name) is not None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"split.n_folds": 3, "split.fold": 3}, "split: .*fold 3 is out of range for n_folds 3"),
        ({"split.n_folds": 1}, r"split.n_folds: Input should be greater than or equal to 2 \(got 1\)"),
        ({"split.n_folds": "5"}, r"split.n_folds: Input should be a valid integer \(got '5'\)"),
        ({"data.source": "zenodo"}, r"data.source: Input should be 'synthetic', 'kaggle' or 'livecell' \(got 'zenodo'\)"),
        ({"data.limit_images": 0}, r"data.limit_images: .*greater than or equal to 1"),
        ({"data.limt_images": 3}, r"data.limt_images: Extra inputs are not permitted"),
        ({"synth.images": 2.5}, r"synth.images: Input should be a valid integer"),
        ({"synth": [1, 2]}, r"synth: expected a mapping, got list"),
    ],
)
def test_bad_values_name_the_param(changes: dict, message: str) -> None:
    name = next(iter(changes)).split(".")[0]
    with pytest.raises(ParamsError, match=message):
        config.section(_with(changes), name)


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
    """The params accept exactly the augmentations :mod:`cellseg.data` builds (all of them: the boundary target)."""
    from cellseg.augment import AUGMENTATIONS

    every = {"unet.augment": list(AUGMENTATIONS), "unet.target": "boundary"}
    assert config.section(_with(every), "unet").augment == list(AUGMENTATIONS)
    with pytest.raises(ParamsError, match="maskrcnn.augment.1: Value error, unknown augmentation 'spin'; the names are hflip"):
        config.section(_with({"maskrcnn.augment": ["hflip", "spin"]}), "maskrcnn")


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
    ("key", "value", "message"),
    [
        ("train.unet.seed", -3, r"train.unet.seed: Input should be greater than or equal to 0"),
        ("data.seed", 2**32, r"data.seed: Input should be less than or equal to 4294967295"),
        ("train.unet.device", "tpu", r"train.unet.device: Value error, 'tpu' is not a device name"),
        ("train.maskrcnn.lr", float("nan"), r"train.maskrcnn.lr: Input should be a finite number"),
        ("postprocess.maskrcnn.score_threshold", {"shsy5y": 0.3, "astro": 0.4, "cort": 1.5},
         r"postprocess.maskrcnn.score_threshold.cort: .*less than or equal to 1"),
        ("postprocess.unet.min_size", {"default": -1}, r"postprocess.unet.min_size.default: .*greater than or equal to 0"),
        ("postprocess.unet.marker_threshold", 1.0, r"postprocess.unet.marker_threshold.default: .*less than 1"),
        ("postprocess.maskrcnn.mask_threshold", 0.0, r"postprocess.maskrcnn.mask_threshold.default: .*greater than 0"),
        ("unet.decoder_channels", [128, 64, 32, 16, 0], r"unet.decoder_channels.4: .*greater than or equal to 1"),
        ("synth.images", 10**6, r"synth.images: Input should be less than or equal to 10000"),
        ("maskrcnn.backbone", "resnet101_fpn", r"maskrcnn.backbone: Input should be 'resnet50_fpn_v2', 'resnet50_fpn', "
         r"'resnet34_fpn', 'resnet18_fpn' or 'mobilenet_v3_large_fpn' \(got 'resnet101_fpn'\)"),
    ],
)
def test_values_are_checked_for_meaning(key: str, value: object, message: str) -> None:
    section = key.split(".")[0]
    with pytest.raises(ParamsError, match=message):
        config.section(_with({key: value}), section)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("patches.size", 48, r"patches.size: Input should be a multiple of 32"),
        ("patches.size", 0, r"patches.size: Input should be greater than or equal to 32"),
        ("patches.size", 64.0, r"patches.size: Input should be a valid integer"),
        ("patches.jitter", -0.1, r"patches.jitter: Input should be greater than or equal to 0"),
        ("patches.jitter", 1.5, r"patches.jitter: Input should be less than or equal to 1"),
        ("patches.per_cell", 0, r"patches.per_cell: Input should be greater than or equal to 1"),
        ("patches.per_cell", 1.5, r"patches.per_cell: Input should be a valid integer"),
        ("patches.background_fraction", -1.0, r"patches.background_fraction: Input should be greater than or equal to 0"),
        ("patches.background_fraction", float("nan"), r"patches.background_fraction: Input should be a finite number"),
        ("synth.images", 0, r"synth.images: Input should be greater than or equal to 1"),
        ("synth.images", -3, r"synth.images: Input should be greater than or equal to 1"),
        ("synth.images", True, r"synth.images: Input should be a valid integer"),
        ("synth.seed", -1, r"synth.seed: Input should be greater than or equal to 0"),
        ("data.source", "zenodo", r"data.source: Input should be 'synthetic', 'kaggle' or 'livecell'"),
        ("unet.augment", "hflip", r"unet.augment: Input should be a valid list \(got 'hflip'\)"),
        ("unet.augment", ["hflip", "spin"], r"unet.augment.1: Value error, unknown augmentation 'spin'"),
        ("unet.boundary_width", 0, r"unet.boundary_width: Input should be greater than or equal to 1"),
        ("unet.channels", 2, r"unet.channels: Input should be 1 or 3"),
        ("unet.std", 0.0, r"unet.std: Input should be greater than 0"),
    ],
)
def test_what_the_library_no_longer_checks_the_params_refuse(key: str, value: object, message: str) -> None:
    """The checks removed from the library (sample_patches, synthesize, build_augmentations, load_source,
    targets_from_labels, normalize) are the params' own: each bad value is refused, named, before any work."""
    section = key.split(".")[0]
    with pytest.raises(ParamsError, match=message):
        config.section(_with({key: value}), section)


def test_cuda_devices_are_checked_against_the_machine() -> None:
    import torch

    count = torch.cuda.device_count()
    with pytest.raises(ParamsError, match=f"train.unet.device: .*'cuda:{count}' but this machine has"):
        config.section(_with({"train.unet.device": f"cuda:{count}"}), "train")
    assert config.section(_with({"train.unet.device": "cpu"}), "train").unet.device == "cpu"


@pytest.mark.parametrize("name", list(config.SECTIONS))
def test_a_missing_section_is_named(name: str, tmp_path: Path) -> None:
    """No section falls back to defaults: a params file without one is refused when a stage reads it."""
    raw = _with(remove=name)
    with pytest.raises(ParamsError, match=f"^params.yaml: no section {name!r}"):
        config.section(raw, name)
    for other in config.SECTIONS:  # the other sections are unaffected
        if other != name:
            assert config.section(raw, other) == config.section(PROJECT, other)
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(f"{k}: {{}}" for k in config.SECTIONS if k != name) + "\n")
    with pytest.raises(ParamsError, match=f"^{re.escape(str(path))}: no section {name!r}"):
        config.load(name, path)


@pytest.mark.parametrize("key", [key for key, _ in ALL_FIELDS])
def test_a_missing_key_is_named(key: str) -> None:
    """Every key of params.yaml is required: without it, the error names its dotted key."""
    with pytest.raises(ParamsError, match=rf"^params.yaml: {re.escape(key)}: Field required$"):
        config.section(_with(remove=key), key.split(".")[0])


def test_the_config_classes_have_no_defaults() -> None:
    """params.yaml is the one source of defaults: no field of any section (nested ones included) has one, so
    that each must be given, and every section validated from nothing lists every one of its keys as missing."""
    assert len(ALL_FIELDS) > 50 and {"train.unet.epochs", "postprocess.maskrcnn.score_threshold"} <= dict(ALL_FIELDS).keys()
    with_default = [key for key, field in ALL_FIELDS if not field.is_required()]
    assert with_default == []
    for name, model in config.SECTIONS.items():
        with pytest.raises(ParamsError, match=f"^params.yaml: {name}.[a-z_]+: Field required$"):
            config.section({name: {}}, name)
        with pytest.raises(ValidationError) as refused:
            model.model_validate({})
        assert sorted(e["loc"][0] for e in refused.value.errors()) == sorted(model.model_fields)
        assert {e["type"] for e in refused.value.errors()} == {"missing"}


@pytest.mark.parametrize("key", list(PER_TYPE))
def test_per_cell_type_params_name_only_cell_types(key: str) -> None:
    value = PER_TYPE[key]
    section = key.split(".")[0]
    with pytest.raises(
        ParamsError, match=rf"^params.yaml: {re.escape(key)}: Value error, unknown cell type 'neuron'; the keys are shsy5y, astro, cort, default"
    ):
        config.section(_with({key: {**{t: value for t in CELL_TYPES}, "neuron": value}}), section)
    with pytest.raises(ParamsError, match=rf"^params.yaml: {re.escape(key)}: Value error, unknown cell type 'Astro'"):
        config.section(_with({key: {"Astro": value, DEFAULT: value}}), section)


@pytest.mark.parametrize("key", list(PER_TYPE))
def test_per_cell_type_params_cover_every_cell_type(key: str) -> None:
    value = PER_TYPE[key]
    section = key.split(".")[0]
    with pytest.raises(ParamsError, match=rf"^params.yaml: {re.escape(key)}: Value error, no entry for cort and no 'default'"):
        config.section(_with({key: {"shsy5y": value, "astro": value}}), section)
    with pytest.raises(ParamsError, match=rf"^params.yaml: {re.escape(key)}: Value error, no entry for shsy5y, astro, cort"):
        config.section(_with({key: {}}), section)


@pytest.mark.parametrize("key", list(PER_TYPE))
def test_per_cell_type_params_accept_a_default(key: str) -> None:
    """A ``default`` covers the cell types not named; each type's own value wins; every type named needs none."""
    value = PER_TYPE[key]
    *path, field = key.split(".")
    partial = {"astro": value, DEFAULT: value * 2}
    accepted = config.section(_with({key: partial}), path[0])
    for part in path[1:]:
        accepted = getattr(accepted, part)
    assert getattr(accepted, field) == partial
    assert [per_type(partial, t) for t in CELL_TYPES] == [value * 2, value, value * 2]
    assert by_category(partial, 0)[1:] == [value * 2, value, value * 2]
    assert getattr(project_params(".".join(path), **{field: {DEFAULT: value}}), field) == {DEFAULT: value}
    every = {t: value for t in CELL_TYPES}
    assert config.section(_with({key: every}), path[0]).model_dump()[path[1]][field] == every


def test_project_params_is_params_yaml_with_changes() -> None:
    """The tests' typed params: params.yaml's section, with the changes asked for, validated."""
    unet = project_params("unet", encoder="resnet18")
    assert unet.encoder == "resnet18" and unet.model_dump() == {**PROJECT["unet"], "encoder": "resnet18"}
    assert project_params("train.unet", epochs=1).model_dump() == {**PROJECT["train"]["unet"], "epochs": 1}
    assert project_params("postprocess.maskrcnn") == config.section(PROJECT, "postprocess").maskrcnn
    with pytest.raises(ValueError, match="min_size"):
        project_params("postprocess.unet", min_size={"astro": 5})
