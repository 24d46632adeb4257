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
