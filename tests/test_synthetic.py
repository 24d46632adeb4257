"""Tests of the synthetic Kaggle-format data set (cellseg.sources.synthetic)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage as ndi

import cellseg.io
from cellseg import appearance
from cellseg.io import MARKER
from cellseg.rle import decode, encode, pixels
from cellseg.sources import synthetic
from cellseg.celltypes import CELL_TYPES
from cellseg.sources.synthetic import synthesize

REPO = Path(__file__).resolve().parents[1]
SHAPE = (520, 704)
COLUMNS = [
    "id",
    "annotation",
    "width",
    "height",
    "cell_type",
    "plate_time",
    "sample_date",
    "sample_id",
    "elapsed_timedelta",
]
CELLS_PER_IMAGE = {"shsy5y": (100, 800), "astro": (15, 150), "cort": (5, 150)}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("synth") / "raw"
    return out, synthesize(out, 6, seed=0)


@pytest.fixture(scope="module")
def measured(generated) -> dict[str, tuple[str, dict[str, float]]]:
    """Each generated image's cell type and :func:`cellseg.appearance.measure` statistics, measured once."""
    root, table = generated
    return {
        image_id: (rows["cell_type"].iloc[0],
                   appearance.measure(_image(root, image_id), [pixels(rle, SHAPE) for rle in rows["annotation"]]).image)
        for image_id, rows in table.groupby("id")
    }


@pytest.fixture(scope="module")
def real_medians() -> dict[str, dict[str, float]]:
    """The real images' per-type medians recorded by ``bench/synthetic_realism.py``."""
    return json.loads((REPO / "bench" / "synthetic_realism.json").read_text())["summary"]["real"]


def _read_csv(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)


def _image(root: Path, image_id: str) -> np.ndarray:
    with Image.open(root / "train" / f"{image_id}.png") as image:
        assert image.mode == "L"
        assert image.size == (704, 520)
        return np.asarray(image)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_csv_has_the_competition_columns_and_matches_the_returned_table(generated):
    root, table = generated
    assert list(table.columns) == COLUMNS
    assert (root / "train.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    on_disk = _read_csv(root)
    assert len(on_disk) == len(table)
    pd.testing.assert_frame_equal(on_disk, table.astype(str), check_dtype=False)
    assert set(table["width"]) == {704} and set(table["height"]) == {520}


def test_one_png_per_image_and_nothing_else(generated):
    root, table = generated
    ids = table["id"].unique()
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(f"{i}.png" for i in ids)
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "train", "train.csv"]  # MARKER: cellseg wrote it
    for image_id in ids:
        image = _image(root, image_id)
        assert image.dtype == np.uint8
        assert 110 < image.mean() < 145


def test_ids_are_unique_12_hex_and_metadata_is_consistent(generated):
    _, table = generated
    per_image = table.drop(columns="annotation").drop_duplicates()
    assert per_image["id"].is_unique, "one cell type, sample and time per image"
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in per_image["id"])
    for row in per_image.itertuples():
        hours, minutes, seconds = map(int, re.fullmatch(r"(\d+)h(\d\d)m(\d\d)s", row.plate_time).groups())
        assert row.elapsed_timedelta == str(pd.Timedelta(hours=hours, minutes=minutes, seconds=seconds))
        assert re.fullmatch(rf"{row.cell_type}\[[a-z-]+\]_[A-H]\d{{1,2}}-\d_Vessel-\d+_Ph_\d", row.sample_id)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", row.sample_date)


def test_every_annotation_is_one_nonempty_component_and_reencodes(generated):
    _, table = generated
    for rle in table["annotation"]:
        mask = decode(rle, SHAPE)
        assert mask.any()
        assert ndi.label(mask)[1] == 1
        assert encode(mask) == rle


def test_cells_per_image_within_the_type_ranges(generated):
    _, table = generated
    counts = table.groupby(["cell_type", "id"]).size()
    for (cell_type, _), count in counts.items():
        low, high = CELLS_PER_IMAGE[cell_type]
        assert low <= count <= high, (cell_type, count)


def test_images_share_sample_ids_within_one_type(generated):
    _, table = generated
    per_image = table.drop_duplicates("id")
    sizes = per_image.groupby("sample_id").size()
    assert sizes.max() >= 2, "some well must be imaged more than once"
    assert per_image.groupby("sample_id")["cell_type"].nunique().max() == 1
    assert per_image.groupby("sample_id")["plate_time"].nunique().equals(sizes)


def test_wells_hold_one_to_four_images_over_a_full_set():
    layout = synthetic._layout(606, seed=0)
    types = pd.Series([t for _, t, _ in layout])
    assert types.value_counts().to_dict() == {"cort": 320, "shsy5y": 155, "astro": 131}
    sizes = pd.Series([visit.sample_id for _, _, visit in layout]).value_counts()
    assert sizes.min() >= 1 and sizes.max() == 4
    assert (sizes >= 2).sum() > 50


def test_three_images_cover_the_three_types(tmp_path):
    table = synthesize(tmp_path / "raw", 3, seed=5)
    assert sorted(table["cell_type"].unique()) == sorted(CELL_TYPES)


def test_cells_follow_their_types_border_profile(measured):
    """As in the real images: a dark band 2–3 px inside each cell, the bright rim on its outermost annotated
    pixels, the background 3 px out; each image's measured profile has the shape (correlation ≥ 0.85; cort,
    whose drawn rim is 2–4 grey levels short of the real one, about 0.9) and the depth (within 30 %) of its
    type's fitted one."""
    for cell_type, stats in measured.values():
        fitted = np.array(synthetic._LOOK[cell_type].profile)
        distances = synthetic._PROFILE_START + np.arange(len(fitted))
        profile = np.array([stats[f"profile/{d:+d}"] for d in distances])
        assert np.corrcoef(profile, fitted)[0, 1] >= 0.85, cell_type
        assert 0.7 <= np.ptp(profile) / np.ptp(fitted) <= 1.3, cell_type
        assert stats["profile/+0"] > stats["profile/+3"] + 3 > stats["profile/-3"] + 6, cell_type


def test_cells_texture_stands_out_from_the_background_as_in_the_real_images(measured, real_medians):
    """The cells' high-pass texture over the background's, per image, is within ×/÷ 1.5 of the real images'
    median for the type (``bench/synthetic_realism.json``: astro 4.6, whose bodies are grainy on a flat
    background; cort and shsy5y 2.4, whose backgrounds are busy). With astro's grain at 4, before it was fitted
    (2026-12-06), astro was at 2.1."""
    for cell_type, stats in measured.values():
        ratio = stats["texture/cells"] / stats["texture/background"]
        real = real_medians[cell_type]
        expected = real["texture/cells"] / real["texture/background"]
        assert expected / 1.5 <= ratio <= expected * 1.5, (cell_type, ratio, expected)
    assert {cell_type for cell_type, _ in measured.values()} == set(CELL_TYPES)


def test_cort_background_is_busy_as_in_the_real_images(measured, real_medians):
    """Real cort backgrounds are full of unannotated bundles of neurites and debris in bright rings: per cort
    image, the background's high-pass texture is at least 0.6 of the real median (12.9), its bright outliers at
    least half of it (2.7 %), its dark ones within ×/÷ 1.5 (3.8 %). Without the bundles and large specks
    (before 2026-12-06) they were 6.5 and 0.2 %."""
    real = real_medians["cort"]
    cort = {image_id: stats for image_id, (cell_type, stats) in measured.items() if cell_type == "cort"}
    for image_id, stats in cort.items():
        assert stats["texture/background"] >= 0.6 * real["texture/background"], image_id
        assert stats["background_bright"] >= 0.5 * real["background_bright"], image_id
        assert real["background_dark"] / 1.5 <= stats["background_dark"] <= 1.5 * real["background_dark"], image_id
    assert len(cort) == 3


def test_overlap_is_small_but_present(generated):
    _, table = generated
    rows = table[table["cell_type"] == "shsy5y"]
    image_id = rows["id"].iloc[0]
    count = sum(decode(rle, SHAPE).astype(np.int32) for rle in rows.loc[rows["id"] == image_id, "annotation"])
    covered = np.count_nonzero(count)
    assert 0 < np.count_nonzero(count > 1) < 0.1 * covered


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    synthesize(tmp_path / "a", 3, seed=7)
    synthesize(tmp_path / "b", 3, seed=7)
    synthesize(tmp_path / "c", 3, seed=8)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert (tmp_path / "a" / "train.csv").read_bytes() != (tmp_path / "c" / "train.csv").read_bytes()


def test_image_k_does_not_depend_on_the_number_of_images(tmp_path):
    short = synthesize(tmp_path / "short", 2, seed=3)
    long = synthesize(tmp_path / "long", 4, seed=3)
    first_two = long[long["id"].isin(short["id"].unique())].reset_index(drop=True)
    pd.testing.assert_frame_equal(first_two, short)
    for name in (tmp_path / "short" / "train").iterdir():
        assert name.read_bytes() == (tmp_path / "long" / "train" / name.name).read_bytes()


def test_box_encoder_matches_full_image_encoder():
    rng = np.random.default_rng(0)
    cases = [(rng.random((7, 9)) < 0.5, 3, 4), (rng.random((5, 12)) < 0.6, 515, 692)]
    full_width = np.zeros((4, 704), dtype=bool)
    full_width[0, 700:] = full_width[1, :5] = full_width[1, 300:] = full_width[2, :] = full_width[3, :1] = True
    cases.append((full_width, 10, 0))
    for mask, r0, c0 in cases:
        image = np.zeros(SHAPE, dtype=bool)
        image[r0 : r0 + mask.shape[0], c0 : c0 + mask.shape[1]] = mask
        assert synthetic._encode_box(mask, r0, c0) == encode(image)


class _Boom(RuntimeError):
    pass


def _failing_write_png(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    real = cellseg.io.write_png
    calls = []

    def write_png(path, array):
        calls.append(path)
        if len(calls) > after:
            raise _Boom("disk full")
        real(path, array)

    monkeypatch.setattr(cellseg.io, "write_png", write_png)


def test_failure_midway_leaves_no_partial_output(tmp_path, monkeypatch):
    _failing_write_png(monkeypatch, after=2)
    with pytest.raises(_Boom):
        synthesize(tmp_path / "raw", 4, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "raw"
    synthesize(out, 1, seed=0)
    before = _files(out)
    _failing_write_png(monkeypatch, after=2)
    with pytest.raises(_Boom):
        synthesize(out, 4, seed=1)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
