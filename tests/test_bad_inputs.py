"""The bad-input corpus: every kind of bad input, run through the stage script that meets it.

Each case builds a tiny Kaggle-format directory (``make_kaggle``), makes the good inputs the stage needs
(in-process, with the library functions the earlier stages call), breaks one thing, then runs the stage as a
subprocess (``python stages/<stage>.py --params params.yaml ...`` or ``python -m cellseg.cli predict ...``)
in a temporary working directory and asserts:

* exit code 1, no ``Traceback`` in stderr;
* the last stderr line is the only line starting with ``error: `` and names the file (and the CSV row,
  where there is one) or the parameter;
* no partial output: every file under the temporary directory (inputs, params, outputs) is byte-for-byte
  what it was before the run, so the stage's output does not exist when there was none before, a previous
  good output (for the cases marked ``prior``, made by running the same stage on good data first) is
  unchanged, and no stray ``.*.tmp`` / ``.*.old`` entry is left beside it.

61 kinds:

* RLE, decode stage (9): non-integer token, integer beyond 64 bits, odd token count, zero length,
  negative length, start below 1, runs out of order, overlapping runs, a run past the image end.
* train.csv, decode stage (19): file missing, empty file, header only, a missing column, an extra column,
  a duplicated column name, a ragged row, non-UTF-8 bytes, a duplicate annotation whose other fields differ,
  an empty annotation, an unknown cell type, width not an integer, width infinite, width beyond any image,
  width disagreeing with the PNG, a per-image field differing between an image's rows, a blank line, a
  trailing comma on every row, a row with too few fields.
* Image ids, decode stage (3): a path separator, ``..`` inside, ``..`` alone.
* Images, decode stage (9): missing, empty, truncated, not an image, a decompression bomb, a directory
  named like the file, 16-bit, RGB colour, wrong size.
* params.yaml (14): malformed YAML, not a mapping, file missing, a section not a mapping, an unknown key,
  unknown ``data.source``, ``data.limit_images`` of the wrong type (decode); ``split.fold`` >= ``n_folds``,
  ``split.n_folds`` of the wrong type (split); ``patches.size`` not a multiple of 32, ``patches.jitter``
  out of range, ``patches.size`` larger than the images (patches); ``train.unet.epochs: "x"`` (train_unet);
  ``synth.images: 0`` (synthesize).
* Checkpoints (7): ``cellseg predict --model`` with a foreign torch file, a truncated cellseg checkpoint,
  a cellseg checkpoint without weights or params, and one whose weights do not fit its model; the
  train_unet stage resuming (``train.unet.resume: true``) from a ``last.pt`` of the other model
  (Mask R-CNN), from a U-Net ``last.pt`` without the optimizer state (a ``best.pt`` copied over), and from
  one whose weights do not fit the model the params now describe (e.g. another encoder).

What real ``train.csv`` files hold and the decode stage accepts, with one warning each, is tested too
(:func:`test_decode_accepts_exact_duplicates_and_blank_metadata`): a row repeating an earlier row exactly
(dropped) and an image whose metadata is blank in all its rows.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cellseg.checkpoint import save_checkpoint
from helpers.stage_harness import ASTRO, OUTPUTS, World, base_params, prepare, run


@dataclass(frozen=True)
class Case:
    id: str
    stage: str
    setup: Callable[[World], None]
    expect: tuple[str, ...]  # substrings of the error line; {csv}, {root}, {image0}, {image2}, {work} filled in
    prior: bool = False  # run the stage on good data first: its output must survive unchanged


def _nested(params: dict, dotted: str, value: object) -> None:
    *path, key = dotted.split(".")
    target = params
    for name in path:
        target = target.setdefault(name, {})
    target[key] = value


def param(dotted: str, value: object) -> Callable[[World], None]:
    return lambda w: _nested(w.params, dotted, value)


def annotation(text: str) -> Callable[[World], None]:
    """Row 6 of train.csv (the second cell of image sh0000000001) gets ``text`` as its RLE."""
    return lambda w: w.set_cells(4, "annotation", text)


def _append_line(w: World, line: str) -> None:
    with open(w.csv, "a") as handle:
        handle.write(line + "\n")


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _colour(w: World) -> None:
    grey = np.asarray(Image.open(w.image(ASTRO)))
    Image.fromarray(np.stack([grey, grey, 255 - grey], axis=-1)).save(w.image(ASTRO))


def _bomb(w: World) -> None:
    """A PNG whose header claims 20000×20000 pixels (PIL refuses it as a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    w.image().write_bytes(png)


def _image_dir(w: World) -> None:
    path = w.image()
    path.unlink()
    path.mkdir()


def _blank_line(w: World) -> None:
    lines = w.csv.read_text().splitlines()
    lines.insert(3, "")  # line 4: skipped silently, it would shift the row number of every later error
    w.csv.write_text("\n".join(lines) + "\n")


def _trailing_commas(w: World) -> None:
    """Every data row one field longer than the header: pandas would take the first column as an index."""
    lines = w.csv.read_text().splitlines()
    w.csv.write_text("\n".join([lines[0], *(line + "," for line in lines[1:])]) + "\n")


def _duplicate_column_name(w: World) -> None:
    lines = w.csv.read_text().splitlines()
    lines[0] = lines[0].replace("sample_date", "cell_type")
    w.csv.write_text("\n".join(lines) + "\n")


def _foreign_checkpoint(w: World) -> None:
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, w.work / w.model)


def _truncated_checkpoint(w: World) -> None:
    save_checkpoint(w.work / w.model, "maskrcnn", {"model_params": {}, "model_state": {"w": torch.zeros(5000)}})
    _truncate(w.work / w.model)


def _checkpoint_without_weights(w: World) -> None:
    save_checkpoint(w.work / w.model, "maskrcnn", {"epoch": 3})


def _checkpoint_with_wrong_weights(w: World) -> None:
    params = {"encoder": "resnet18", "channels": 1}
    save_checkpoint(w.work / w.model, "unet", {"model_params": params, "model_state": {"w": torch.zeros(2)}})


def _resume_from_other_model(w: World) -> None:
    w.params["train"]["unet"]["resume"] = True
    save_checkpoint(w.work / "models/unet/last.pt", "maskrcnn", {"model_params": {}, "model_state": {}, "epoch": 1})


def _resume_from_best(w: World) -> None:
    w.params["train"]["unet"]["resume"] = True
    save_checkpoint(w.work / "models/unet/last.pt", "unet", {"model_params": {}, "model_state": {}, "epoch": 1, "best": 0.1})


def _resume_from_other_weights(w: World) -> None:
    w.params["train"]["unet"]["resume"] = True
    entries = {"model_params": {}, "model_state": {"w": torch.zeros(2)}, "epoch": 1, "best": 0.1, "history": [], "run_id": None,
               "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": {}}
    save_checkpoint(w.work / "models/unet/last.pt", "unet", entries)


def _duplicate_with_other_sample_id(w: World) -> None:
    """Row 5 repeated as row 20, but with another ``sample_id``: not an exact duplicate, so not dropped."""
    table = w.table()
    w.write_table(pd.concat([table, table.iloc[[3]].assign(sample_id="other")], ignore_index=True))


def _short_row(w: World) -> None:
    """Row 6 loses its last field (pandas pads it with an empty string)."""
    lines = w.csv.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0]
    w.csv.write_text("\n".join(lines) + "\n")


CSV_ROW6 = ("{csv}", "row 6 (id 'sh0000000001')")
CASES: list[Case] = [
    # --- RLE (decode) ---
    Case("rle-non-integer", "decode", annotation("1 2 x 3"), ("{csv}", "row 6", "malformed RLE", "token 3 ('x') is not an integer")),
    Case("rle-beyond-64-bits", "decode", annotation("99999999999999999999 1"), ("{csv}", "row 6", "token 1", "exceeds 64 bits")),
    Case("rle-odd-count", "decode", annotation("1 2 3"), ("{csv}", "row 6", "odd number of tokens (3)")),
    Case("rle-zero-length", "decode", annotation("5 0"), ("{csv}", "row 6", "token 2: length 0 is not positive")),
    Case("rle-negative-length", "decode", annotation("5 -2"), ("{csv}", "row 6", "token 2: length -2 is not positive")),
    Case("rle-start-below-1", "decode", annotation("0 3"), ("{csv}", "row 6", "token 1: start 0 is below 1")),
    Case("rle-out-of-order", "decode", annotation("100 2 10 2"), ("{csv}", "row 6", "token 3: run starting at 10 is out of order"), prior=True),
    Case("rle-overlapping", "decode", annotation("10 5 12 2"), ("{csv}", "row 6", "token 3: run starting at 12 is out of order or overlaps")),
    Case("rle-past-image-end", "decode", annotation("1900 30"), ("{csv}", "row 6", "runs past the end of the image (1920 pixels)")),
    # --- train.csv (decode) ---
    Case("csv-missing", "decode", lambda w: w.csv.unlink(), ("{csv}", "annotation file is missing")),
    Case("csv-empty", "decode", lambda w: w.csv.write_text(""), ("{csv}", "file is empty")),
    Case("csv-header-only", "decode", lambda w: w.write_table(w.table().iloc[:0]), ("{csv}", "no annotation rows"), prior=True),
    Case("csv-missing-column", "decode", lambda w: w.write_table(w.table().drop(columns="cell_type")), ("{csv}", "missing column(s) cell_type")),
    Case("csv-extra-column", "decode", lambda w: w.write_table(w.table().assign(score="1")), ("{csv}", "unexpected column(s) score")),
    Case("csv-duplicate-column-name", "decode", _duplicate_column_name, ("{csv}", "missing column(s) sample_date")),
    Case("csv-ragged-row", "decode", lambda w: _append_line(w, "a,b,c,d,e,f,g,h,i,j,k"), ("{csv}", "not a readable CSV")),
    Case("csv-not-utf8", "decode", lambda w: w.csv.write_bytes(w.csv.read_bytes().replace(b"2020", b"\xff\xfe20")), ("{csv}", "not a readable CSV")),
    Case(
        "csv-duplicate-annotation", "decode", _duplicate_with_other_sample_id,
        ("{csv}", "row 20 (id 'sh0000000001')", "duplicate annotation (same as row 5, other fields differ)"), prior=True,
    ),
    Case("csv-empty-annotation", "decode", annotation(""), (*CSV_ROW6, "annotation is empty")),
    Case("csv-unknown-cell-type", "decode", lambda w: w.set_cells(4, "cell_type", "neuron"), (*CSV_ROW6, "unknown cell_type 'neuron'")),
    Case("csv-width-not-integer", "decode", lambda w: w.set_cells(4, "width", "48.5"), (*CSV_ROW6, "width '48.5' is not a positive integer")),
    Case("csv-width-infinite", "decode", lambda w: w.set_cells([0, 1, 2], "width", "inf"), ("{csv}", "row 2", "width 'inf' is not a positive integer"), prior=True),
    Case("csv-width-huge", "decode", lambda w: w.set_cells([0, 1, 2], "width", "1e20"), ("{csv}", "row 2", "width '1e20' is not a positive integer")),
    Case(
        "csv-size-disagrees-with-png", "decode", lambda w: w.set_cells([0, 1, 2], "height", "41"),
        ("{image0} (id 'sh0000000000', first row 2 of {csv})", "image is 48x40 (width x height) but the CSV says 48x41"),
    ),
    Case("csv-per-image-field-differs", "decode", lambda w: w.set_cells(4, "sample_id", "other"), (*CSV_ROW6, "sample_id 'other' differs")),
    Case("csv-blank-line", "decode", _blank_line, ("{csv}", "row 4: blank row")),
    Case("csv-short-row", "decode", _short_row, ("{csv}", "row 6: 8 field(s), the header has 9 (a row cut short?)")),
    Case("csv-trailing-comma-on-every-row", "decode", _trailing_commas, ("{csv}", "row 2 has more fields than the header (9)")),
    # --- image ids (decode) ---
    Case("id-path-separator", "decode", lambda w: w.set_cells([0, 1, 2], "id", "train/sh0000000000"), ("{csv}", "row 2", "not a safe file name")),
    Case("id-dotdot-inside", "decode", lambda w: w.set_cells([0, 1, 2], "id", "..sh0000000000"), ("{csv}", "row 2", "not a safe file name")),
    Case("id-dotdot", "decode", lambda w: w.set_cells([0, 1, 2], "id", ".."), ("{csv}", "row 2 (id '..')", "not a safe file name")),
    # --- images (decode) ---
    Case("image-missing", "decode", lambda w: w.image().unlink(), ("{image0} (id 'sh0000000000', first row 2 of {csv})", "image file is missing")),
    Case("image-empty", "decode", lambda w: w.image().write_bytes(b""), ("{image0}", "first row 2", "not a readable image")),
    Case("image-truncated", "decode", lambda w: _truncate(w.image(ASTRO), 0.7), ("{image2}", "not a readable image"), prior=True),
    Case("image-not-an-image", "decode", lambda w: w.image().write_text("id,annotation\n"), ("{image0}", "first row 2", "not a readable image")),
    Case("image-decompression-bomb", "decode", _bomb, ("{image0}", "first row 2", "not a readable image", "decompression bomb")),
    Case("image-is-a-directory", "decode", _image_dir, ("{image0}", "first row 2", "image file is missing")),
    Case(
        "image-16-bit", "decode",
        lambda w: Image.fromarray(np.full((40, 48), 1000, np.uint16)).save(w.image()),
        ("{image0}", "first row 2", "expected an 8-bit greyscale image", "'I;16'"),
    ),
    Case("image-rgb-colour", "decode", _colour, ("{image2}", "expected an 8-bit greyscale image, got PIL mode 'RGB'")),
    Case(
        "image-wrong-size", "decode", lambda w: Image.fromarray(np.zeros((40, 40), np.uint8)).save(w.image()),
        ("{image0}", "first row 2", "image is 40x40 (width x height) but the CSV says 48x40"),
    ),
    # --- params.yaml ---
    Case("params-malformed-yaml", "decode", lambda w: setattr(w, "params_text", "data: {source: kaggle\nsplit: [\n"), ("params.yaml", "not valid YAML"), prior=True),
    Case("params-not-a-mapping", "decode", lambda w: setattr(w, "params_text", "- data\n- split\n"), ("params.yaml", "expected a mapping of sections")),
    Case("params-missing", "decode", lambda w: setattr(w, "params_arg", "nope.yaml"), ("nope.yaml", "params file is missing")),
    Case("params-section-not-a-mapping", "split", param("split", 4), ("params.yaml", "split: expected a mapping, got int")),
    Case("params-unknown-key", "split", param("split.folds", 3), ("params.yaml", "split.folds", "Extra inputs are not permitted")),
    Case("data-source-unknown", "decode", param("data.source", "zenodo"), ("params.yaml", "data.source", "'zenodo'")),
    Case("data-limit-images-wrong-type", "decode", param("data.limit_images", "ten"), ("params.yaml", "data.limit_images", "'ten'")),
    Case("split-fold-out-of-range", "split", param("split.fold", 2), ("params.yaml", "split", "fold 2 is out of range for n_folds 2"), prior=True),
    Case("split-n-folds-wrong-type", "split", param("split.n_folds", "two"), ("params.yaml", "split.n_folds", "'two'")),
    Case("patches-size-not-multiple-of-32", "patches", param("patches.size", 40), ("params.yaml", "patches.size", "multiple of 32"), prior=True),
    Case("patches-jitter-out-of-range", "patches", param("patches.jitter", 1.5), ("params.yaml", "patches.jitter", "1.5")),
    Case("patches-size-exceeds-images", "patches", param("patches.size", 64), ("patches.size: 64 exceeds image",)),
    Case("train-epochs-wrong-type", "train_unet", param("train.unet.epochs", "x"), ("params.yaml", "train.unet.epochs", "'x'")),
    Case("synth-images-zero", "synthesize", param("synth.images", 0), ("params.yaml", "synth.images", "(got 0)"), prior=True),
    # --- checkpoints ---
    Case("predict-foreign-torch-file", "predict", _foreign_checkpoint, ("{work}/model.pt", "not a cellseg checkpoint")),
    Case("predict-truncated-checkpoint", "predict", _truncated_checkpoint, ("{work}/model.pt", "not a readable cellseg checkpoint")),
    Case("predict-checkpoint-without-weights", "predict", _checkpoint_without_weights, ("{work}/model.pt", "maskrcnn", "model_state")),
    Case("predict-weights-do-not-fit", "predict", _checkpoint_with_wrong_weights, ("{work}/model.pt", "unet", "do not fit")),
    Case("train-resume-other-model", "train_unet", _resume_from_other_model, ("models/unet/last.pt", "checkpoint of model 'maskrcnn', expected 'unet'")),
    Case("train-resume-incomplete-last", "train_unet", _resume_from_best, ("models/unet/last.pt", "cannot resume", "optimizer")),
    Case("train-resume-weights-do-not-fit", "train_unet", _resume_from_other_weights, ("models/unet/last.pt", "cannot resume", "do not fit")),
]


def _snapshot(top: Path) -> dict[str, str]:
    """Every file and directory under ``top``: relative path → content digest ('dir' for directories)."""
    return {
        str(p.relative_to(top)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(top.rglob("*"))
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_in_one_line_and_writes_nothing(case: Case, make_kaggle, tmp_path: Path) -> None:
    root = make_kaggle()
    work = tmp_path / "work"
    work.mkdir()
    w = World(root=root, work=work, params=base_params(root))
    prepare(w, case.stage)
    if case.prior:
        w.write_params()
        good = run(w, case.stage)
        assert good.returncode == 0, good.stderr
        assert all((work / out).exists() for out in OUTPUTS[case.stage][:1])
    case.setup(w)
    w.write_params()
    before = _snapshot(tmp_path)

    done = run(w, case.stage)

    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.rstrip("\n").splitlines()
    assert lines, "no error message"
    last = lines[-1]
    assert last.startswith("error: "), done.stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == [last]
    for part in case.expect:
        part = part.format(
            csv=w.csv, root=root, work=work,
            image0=root / "train" / "sh0000000000.png", image2=root / "train" / "as1000000000.png",
        )
        assert part in last, f"{part!r} not in {last!r}"
    after = _snapshot(tmp_path)
    assert after == before, sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    for out in OUTPUTS[case.stage]:
        if not case.prior:
            assert not (work / out).exists()
        assert not list((work / out).parent.glob(".*.tmp")) and not list((work / out).parent.glob(".*.old"))


def test_corpus_size() -> None:
    """The module docstring counts the kinds; keep it in step with the table."""
    assert len(CASES) >= 24
    assert f"{len(CASES)} kinds" in __doc__
    assert len({c.id for c in CASES}) == len(CASES)


def test_decode_accepts_exact_duplicates_and_blank_metadata(make_kaggle, tmp_path: Path) -> None:
    """What real train.csv files hold: a row repeating an earlier row exactly is dropped, an image without
    metadata (blank in all its rows) is kept; one warning each, and the stage succeeds."""
    root = make_kaggle()
    work = tmp_path / "work"
    work.mkdir()
    w = World(root=root, work=work, params=base_params(root))
    prepare(w, "decode")
    table = w.table()
    table.loc[[0, 1, 2], ["sample_id", "plate_time"]] = ""  # all rows of sh0000000000
    w.write_table(pd.concat([table, table.iloc[[3]]], ignore_index=True))  # row 20 repeats row 5
    w.write_params()

    done = run(w, "decode")

    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 2, warnings
    assert "dropped 1 row(s)" in warnings[0] and "sh0000000001 (rows 20)" in warnings[0]
    assert "blank metadata accepted" in warnings[1] and "plate_time (1), sample_id (1) of 6" in warnings[1]
    images = pd.read_parquet(work / "decoded" / "images.parquet").set_index("image_id")
    assert len(images) == 6 and images.loc["sh0000000000", "sample_id"] == ""
    assert len(pd.read_parquet(work / "decoded" / "instances.parquet")) == 18
