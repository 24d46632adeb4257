"""Fuzzing the parsers that meet raw input: the RLE decoder and the Kaggle reader followed by decode.

Each fuzz target runs twice: a quick variant (300 cases per test) and a ``slow`` one (10,000 cases per
test; ``pytest -m slow tests/test_fuzz.py``, ~4 min on 2 cores). ``make test`` runs ``-m "not slow"``; a
bare ``pytest`` runs both.

* ``cellseg.rle.decode(text, (h, w))`` on arbitrary text and on near-valid token lists returns a boolean
  mask of that shape (whose pixels are what ``rle.pixels`` lists) or raises ``RLEError``, nothing else.
* ``read_kaggle`` then ``decode_dataset`` on arbitrary bytes, arbitrary text and mutations of a valid
  ``train.csv`` (cells dropped, duplicated or replaced by random strings in any column, rows dropped or
  duplicated, columns reordered, dropped, added or duplicated, header names replaced) either succeeds
  or raises a ``CellsegError`` and leaves no output behind; a mutated table that decodes has one instance
  per CSV row, with that row's id and annotation (nothing skipped or shifted).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cellseg import rle
from cellseg.decode import INSTANCES_TABLE, decode_dataset
from cellseg.errors import CellsegError
from cellseg.sources.kaggle import CSV_COLUMNS, read_kaggle

QUICK, SLOW = 300, 10_000


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much,
                               HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------- RLE

ODD_TOKENS = ["", "+1", "-0", "0", "1e3", "0x10", "1_0", "nan", "inf", "1.0", "١٢", "٣", "１", "9" * 19, "9" * 25,
              str(2**63), str(2**63 - 1), str(-(2**63)), str(-(2**63) - 1), "\x00", "½", "²"]
shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))
separators = st.sampled_from([" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u2003", "\x1c", ","])


@st.composite
def near_valid_rle(draw) -> tuple[str, tuple[int, int]]:
    """Start/length tokens around the image's bounds, sometimes replaced by odd tokens, odd separators."""
    shape = draw(shapes)
    n = shape[0] * shape[1]
    numbers = st.one_of(st.integers(-2, n + 2), st.integers(-(2**64), 2**64))
    tokens = draw(st.lists(st.one_of(numbers.map(str), st.sampled_from(ODD_TOKENS), st.text(max_size=4)), max_size=12))
    text = ""
    for token in tokens:
        text += token + draw(separators)
    return text, shape


@st.composite
def sorted_runs(draw) -> tuple[str, tuple[int, int]]:
    """Mostly valid: increasing starts with lengths near the gaps (touching, overlapping, past the end)."""
    shape = draw(shapes)
    n = shape[0] * shape[1]
    starts = sorted(draw(st.lists(st.integers(-1, n + 1), max_size=8)))
    tokens = []
    for k, start in enumerate(starts):
        gap = (starts[k + 1] if k + 1 < len(starts) else n + 1) - start
        tokens += [start, draw(st.integers(-1, max(gap + 1, 1)))]
    return " ".join(map(str, tokens)), shape


def _check_rle(text: str, shape: tuple[int, int]) -> None:
    try:
        mask = rle.decode(text, shape)
    except rle.RLEError:
        event("refused")
        return
    event("decoded")
    assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == shape
    assert np.array_equal(np.flatnonzero(mask), rle.pixels(text, shape))


def _rle_arbitrary(text: str, shape: tuple[int, int]) -> None:
    _check_rle(text, shape)


def _rle_near_valid(case: tuple[str, tuple[int, int]]) -> None:
    _check_rle(*case)


rle_texts = st.text(max_size=80)
rle_cases = st.one_of(near_valid_rle(), sorted_runs())


@fuzz(QUICK)
@given(rle_texts, shapes)
def test_rle_decode_arbitrary_text(text: str, shape: tuple[int, int]) -> None:
    _rle_arbitrary(text, shape)


@fuzz(QUICK)
@given(rle_cases)
def test_rle_decode_near_valid(case: tuple[str, tuple[int, int]]) -> None:
    _rle_near_valid(case)


@pytest.mark.slow
@fuzz(SLOW)
@given(rle_texts, shapes)
def test_rle_decode_arbitrary_text_slow(text: str, shape: tuple[int, int]) -> None:
    _rle_arbitrary(text, shape)


@pytest.mark.slow
@fuzz(SLOW)
@given(rle_cases)
def test_rle_decode_near_valid_slow(case: tuple[str, tuple[int, int]]) -> None:
    _rle_near_valid(case)


# --------------------------------------------------------------------------- train.csv → read_kaggle → decode

IDS = ["sh0000000000", "sh0000000001", "as1000000000", "co2000000001"]
ODD_VALUES = ["", " ", "0", "-1", "40", "48", "41", "48.0", "4.8e1", "inf", "-inf", "nan", "NaN", "NA", "null", "1e20",
              "99999999999999999999", "18446744073709551615", "0x30", "１", "True", "shsy5y", "astro", "cort", "neuron",
              "..", ".", "a/b", "../sh0000000000", "sh0000000000.png", "1 2", "1 2 3", "5 0", "0 3", "1900 30", "1 1920",
              "1 1921", "3 2 1 1", "1 5 3 1", "\"", "'", ",", "\n", "\r", "\r\n", "\x00", "\ufeffid", *IDS, *CSV_COLUMNS]
values = st.one_of(st.sampled_from(ODD_VALUES), st.text(max_size=12), st.integers(-5, 2000).map(str))


@pytest.fixture
def template(make_kaggle) -> Path:
    """A valid Kaggle directory (2 images per type, 40×48) whose train/ every example links to."""
    return make_kaggle()


@st.composite
def mutated_rows(draw, rows: list[list[str]]) -> list[list[str]]:
    """A valid table (header first) with 1-4 random edits."""
    rows = [list(r) for r in rows]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(
            ["set", "set", "set", "drop_cell", "dup_cell", "drop_row", "dup_row", "permute", "drop_col", "add_col",
             "dup_col", "rename", "truncate_rows"]
        ))
        if not rows:
            break
        width = max(len(r) for r in rows)
        r = draw(st.integers(1, max(len(rows) - 1, 1))) if len(rows) > 1 else 0
        c = draw(st.integers(0, max(width - 1, 0)))
        if op == "set" and len(rows) > 1:
            row = rows[r]
            if c < len(row):
                row[c] = draw(values)
        elif op == "drop_cell" and c < len(rows[r]):
            del rows[r][c]
        elif op == "dup_cell" and c < len(rows[r]):
            rows[r].insert(c, rows[r][c])
        elif op == "drop_row" and len(rows) > 1:
            del rows[r]
        elif op == "dup_row":
            rows.insert(draw(st.integers(1, len(rows))), list(rows[r]))
        elif op == "permute":
            order = draw(st.permutations(range(width)))
            rows = [[row[k] for k in order if k < len(row)] for row in rows]
        elif op == "drop_col":
            rows = [[v for k, v in enumerate(row) if k != c] for row in rows]
        elif op == "add_col":
            name, value = draw(values), draw(values)
            rows = [row[:c] + [name if i == 0 else value] + row[c:] for i, row in enumerate(rows)]
        elif op == "dup_col":
            rows = [row[:c] + row[c : c + 1] + row[c:] for row in rows]
        elif op == "rename" and c < len(rows[0]):
            rows[0][c] = draw(values)
        elif op == "truncate_rows":
            rows = rows[: draw(st.integers(0, len(rows)))]
    return rows


def _serialise(rows: list[list[str]], quoted: bool) -> str:
    if not quoted:  # no quoting at all: commas, quotes and newlines inside values break the structure
        return "".join(",".join(row) + "\n" for row in rows)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _read_and_decode(template: Path, content: bytes, rows: list[list[str]] | None) -> str:
    """Write ``content`` as train.csv beside a link to the template's images; read and decode it.

    Returns the outcome ("decoded" or "refused: <error class>"); anything but success or a ``CellsegError``
    (which must leave no output behind) fails the test. ``rows`` (header first), where given, is the table
    ``content`` holds: on success every one of its rows must have been decoded, in order, with its own id
    and annotation (none skipped but exact repeats of an earlier row, none shifted).
    """
    with tempfile.TemporaryDirectory(prefix="fuzz-csv-") as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        os.symlink(template / "train", root / "train")
        (root / "train.csv").write_bytes(content)
        out = Path(tmp) / "decoded"
        try:
            data = read_kaggle(root)
            images = decode_dataset(data, out)
        except CellsegError as exc:
            assert not out.exists()
            assert sorted(p.name for p in Path(tmp).iterdir()) == ["data"]
            return f"refused: {type(exc).__name__}"
        instances = pd.read_parquet(out / INSTANCES_TABLE)
        assert len(instances) == len(data.annotations) == images["n_cells"].sum()
        if rows is not None:
            header, records = rows[0], rows[1:]
            header = [header[0].removeprefix("\ufeff"), *header[1:]]  # a BOM opening the file is not data
            first = {}  # an exact repeat of an earlier row is dropped (with a warning): each row's first line
            for line, record in enumerate(records, 2):
                first.setdefault(tuple(record), line)
            kept = [(line, record) for line, record in enumerate(records, 2) if first[tuple(record)] == line]
            assert len(instances) == len(kept)
            got = instances.sort_values("row")
            assert got["row"].tolist() == [line for line, _ in kept]
            for column, name in (("image_id", "id"), ("annotation", "annotation")):
                assert got[column].tolist() == [record[header.index(name)] for _, record in kept]
        return "decoded"


def _csv_bytes(template: Path, content: bytes) -> None:
    event(_read_and_decode(template, content, None))


def _csv_text(template: Path, text: str) -> None:
    event(_read_and_decode(template, text.encode("utf-8", "surrogatepass"), None))


def _csv_mutation(template: Path, data: st.DataObject) -> None:
    rows = list(csv.reader(io.StringIO((template / "train.csv").read_text())))
    mutated = data.draw(mutated_rows(rows), label="rows")
    quoted = data.draw(st.booleans(), label="quoted")
    text = _serialise(mutated, quoted)
    event(_read_and_decode(template, text.encode("utf-8", "surrogatepass"), mutated if quoted else None))


csv_binaries = st.binary(max_size=400)
csv_texts = st.one_of(
    st.text(max_size=400),
    st.lists(st.lists(values, max_size=11).map(",".join), max_size=8).map(lambda lines: ",".join(CSV_COLUMNS) + "\n" + "\n".join(lines)),
)


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch) -> None:
    monkeypatch.setattr("cellseg.decode.tqdm", lambda iterable, **_: iterable)


@fuzz(QUICK)
@given(csv_binaries)
def test_csv_arbitrary_bytes(template: Path, content: bytes) -> None:
    _csv_bytes(template, content)


@fuzz(QUICK)
@given(csv_texts)
def test_csv_arbitrary_text(template: Path, text: str) -> None:
    _csv_text(template, text)


@fuzz(QUICK)
@given(st.data())
def test_csv_mutations(template: Path, data: st.DataObject) -> None:
    _csv_mutation(template, data)


@pytest.mark.slow
@fuzz(SLOW)
@given(csv_binaries)
def test_csv_arbitrary_bytes_slow(template: Path, content: bytes) -> None:
    _csv_bytes(template, content)


@pytest.mark.slow
@fuzz(SLOW)
@given(csv_texts)
def test_csv_arbitrary_text_slow(template: Path, text: str) -> None:
    _csv_text(template, text)


@pytest.mark.slow
@fuzz(SLOW)
@given(st.data())
def test_csv_mutations_slow(template: Path, data: st.DataObject) -> None:
    _csv_mutation(template, data)


def test_a_valid_csv_survives_the_harness(template: Path) -> None:
    """The harness itself: the template, read back through the csv module and rewritten, decodes fully."""
    rows = list(csv.reader(io.StringIO((template / "train.csv").read_text())))
    assert len(rows) == 19
    assert _read_and_decode(template, _serialise(rows, quoted=True).encode(), rows) == "decoded"
    permuted = [[row[k] for k in (3, 0, 8, 1, 2, 4, 5, 6, 7)] for row in rows]
    assert _read_and_decode(template, _serialise(permuted, quoted=True).encode(), permuted) == "decoded"
