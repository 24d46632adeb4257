"""The bad-input corpus: every kind of bad input, run through the stage script that meets it.

Each case builds a tiny Kaggle-format directory (``make_kaggle``), makes the good inputs the stage needs
(in-process, with the library functions the earlier stages call), breaks one thing, then runs the stage as a
subprocess (``python stages/<stage>.py --params params.yaml ...`` or ``python -m cellseg.cli predict|synth ...``)
in a temporary working directory and asserts:

* exit code 1 (2 for what the command line's parser refuses), no ``Traceback`` in stderr;
* the last stderr line is the only line with ``error:`` and names the file (and the CSV row, where there
  is one), the path or the parameter;
* no partial output: every file under the temporary directory (inputs, params, outputs) is byte-for-byte
  what it was before the run, so the stage's output does not exist when there was none before, a previous
  good output (for the cases marked ``prior``, made by running the same stage on good data first) is
  unchanged, and no stray ``.*.tmp`` / ``.*.old`` entry is left beside it.

125 kinds:

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
* params.yaml (16): malformed YAML, not a mapping, file missing, a section not a mapping, an unknown key,
  unknown ``data.source``, ``data.limit_images`` of the wrong type (decode); ``split.fold`` >= ``n_folds``,
  ``split.n_folds`` of the wrong type (split); ``patches.size`` not a multiple of 32, ``patches.jitter``
  out of range, ``patches.size`` larger than the images (patches); ``train.unet.epochs: "x"`` (train_unet);
  ``synth.images: 0`` (synthesize); a missing section (``postprocess``, train_unet) and a missing key
  (``maskrcnn.anchor_sizes``, train_maskrcnn): params.yaml is the one source of defaults.
* Params the library no longer re-checks, refused by the stage that reads them (6): ``patches.per_cell: 0``,
  ``patches.background_fraction: .nan`` (patches); ``synth.seed: -1`` (synthesize); ``unet.augment`` a
  string, ``unet.boundary_width: 0``, ``unet.channels: 2`` (train_unet).
* The U-Net's flow target (3): an unknown ``unet.target`` (flows), an augmentation that bends the vectors,
  flows the flows stage did not compute (train_unet).
* Per-cell-type params (2): ``postprocess.unet.min_size`` naming an unknown cell type (train_unet),
  ``postprocess.maskrcnn.score_threshold`` covering not every cell type and without ``default`` (train_maskrcnn).
* The tune stage (3): ``tune.folds`` more than the validation images, a candidate out of its
  value's range, an empty list of candidates.
* Checkpoints (11): ``cellseg predict --model`` with a foreign torch file, a truncated cellseg checkpoint,
  a cellseg checkpoint without weights or params, and one whose weights do not fit its model; the
  train_unet stage resuming (``train.unet.resume: true``) from a ``last.pt`` of the other model
  (Mask R-CNN), from a U-Net ``last.pt`` without the optimizer state (a ``best.pt`` copied over), and from
  one whose weights do not fit the model the params now describe (e.g. another encoder); bytes flipped
  mid-file in a checkpoint (predict) and in ``last.pt`` (resume), and checkpoints of format 1 (no hash) and 2
  (post-processing params inside ``model_params``).
* Output paths (20): ``cellseg predict --out`` that is the input folder, contains it (``dir`` for
  ``dir/imgs``), lies inside it, is the checkpoint, is ``.``, is ``..``, is a user's folder (with
  ``--overwrite``), is a file, is a link to the input; the decode stage's ``--out`` that is ``data.root`` or
  lies inside it, or is a user's folder; the split stage's ``--out`` that is a folder or lies inside its
  input, or lies under a file; the patches stage's ``--out`` that is the params file; ``--models`` inside an input; evaluate's
  outputs overlapping; ``cellseg synth --out`` a user's folder (with ``--overwrite``) or its own earlier
  output without ``--overwrite``.
* Params, for meaning and within bounds (16): a params path that is a folder, a misspelled section (``trian:``), a YAML alias bomb, a file
  over 1 MiB, nesting 100 deep, non-UTF-8 bytes, a 100,000-character value (echoed cut short), a negative
  seed, a seed beyond 32 bits, ``device: cuda`` without CUDA, a device name that is none, a huge batch size,
  a huge patch size, an infinite ``unet.std``, an unknown Mask R-CNN augmentation, an empty MLflow experiment name.
* Predict inputs and options (5): an image over 4096×4096 pixels, a text file named ``.png``, a folder
  without images, ``--batch-size 0``, ``--device cuda:3`` on a machine without it.
* Tracking stores (3): an unreachable server, a sqlite "store" that is not a database, an unknown scheme
  (MLflow's page-long message cut short).

What real ``train.csv`` files hold and the decode stage accepts, with one warning each, is tested too
(:func:`test_decode_accepts_exact_duplicates_and_blank_metadata`): a row repeating an earlier row exactly
(dropped) and an image whose metadata is blank in all its rows.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
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
from helpers.project import project_params
from helpers.stage_harness import ASTRO, OUTPUTS, STAGE_ARGS, World, base_params, prepare, run


@dataclass(frozen=True)
class Case:
    id: str
    stage: str
    setup: Callable[[World], None]
    expect: tuple[str, ...]  # substrings of the error line; {csv}, {root}, {image0}, {image2}, {work} filled in
    prior: bool = False  # run the stage on good data first: its output must survive unchanged
    code: int = 1  # 2: refused by the command line's parser ("cellseg <command>: error: ..." as its last line)
    needs_no_cuda: bool = False  # the case names a CUDA device: it holds only on a machine without one


def _nested(params: dict, dotted: str, value: object) -> None:
    *path, key = dotted.split(".")
    target = params
    for name in path:
        target = target.setdefault(name, {})
    target[key] = value


def param(dotted: str, value: object) -> Callable[[World], None]:
    return lambda w: _nested(w.params, dotted, value)


def _flows_with(*change: object) -> Callable[[World], None]:
    """The U-Net's target is ``flows`` (its flows folder is the boundary target's, empty), plus ``change``."""

    def apply(w: World) -> None:
        _nested(w.params, "unet.target", "flows")
        if change:
            _nested(w.params, *change)

    return apply


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


def _bomb(w: World, path: Path | None = None, side: int = 20000) -> None:
    """A PNG whose header claims ``side``² pixels (20000: PIL refuses it as a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (path or w.image()).write_bytes(png)


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
    entries = {**_unet_entries(), "model_state": {"w": torch.zeros(2)}}
    save_checkpoint(w.work / w.model, "unet", entries)


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


def _args(*args: str) -> Callable[[World], None]:
    """The command gets ``args`` in place of its usual arguments; ``{root}`` is the Kaggle directory."""
    return lambda w: setattr(w, "args", [a.format(root=w.root) for a in args])


PREDICT = ("--model", "model.pt", "--device", "cpu")  # with a valid checkpoint made by _good_checkpoint


def _unet_params():
    """params.yaml's ``unet``, for a small one-channel resnet18 with random weights."""
    return project_params("unet", encoder="resnet18", encoder_weights="none", channels=1)


def _unet_entries() -> dict:
    """What a U-Net checkpoint stores beside its weights: the model's params and its post-processing params."""
    return {"model_params": _unet_params().model_dump(), "postprocess": project_params("postprocess.unet").model_dump()}


def _good_checkpoint(w: World) -> None:
    """A U-Net checkpoint that loads (resnet18, random weights), as ``model.pt``."""
    from cellseg.models.unet import build_unet

    model = build_unet(_unet_params())
    save_checkpoint(w.work / w.model, "unet", {**_unet_entries(), "model_state": model.state_dict()})


def _predict_with(*args: str, setup: Callable[[World], None] | None = None) -> Callable[[World], None]:
    """``cellseg predict`` on a good checkpoint with ``args`` (and ``setup`` run first)."""

    def apply(w: World) -> None:
        _good_checkpoint(w)
        if setup:
            setup(w)
        _args(*args, *PREDICT)(w)

    return apply


def _user_folder(name: str) -> Callable[[World], None]:
    def make(w: World) -> None:
        (w.work / name).mkdir()
        (w.work / name / "notes.txt").write_text("a user's file")

    return make


def _nested_images(w: World) -> None:
    """images/ moved to dir/imgs/, beside an unrelated file of the user's."""
    (w.work / "dir").mkdir()
    (w.work / "images").rename(w.work / "dir" / "imgs")
    (w.work / "dir" / "unrelated.txt").write_text("keep me")


def _link_to_images(w: World) -> None:
    (w.work / "link").symlink_to(w.work / "images", target_is_directory=True)


def _flip_bytes(path: Path, at: float = 0.6, count: int = 16) -> None:
    """Invert ``count`` bytes at fraction ``at`` of the file (inside a tensor's data, not at its end)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def _flipped_checkpoint(w: World) -> None:
    _good_checkpoint(w)
    _flip_bytes(w.work / w.model)


def _flipped_last(w: World) -> None:
    w.params["train"]["unet"]["resume"] = True
    entries = {"model_params": {}, "model_state": {"w": torch.arange(100_000, dtype=torch.float32)}, "epoch": 1}
    save_checkpoint(w.work / "models/unet/last.pt", "unet", entries)
    _flip_bytes(w.work / "models/unet/last.pt")


def _version_1_checkpoint(w: World) -> None:
    from cellseg.checkpoint import FORMAT

    torch.save({"format": FORMAT, "version": 1, "model": "unet", "model_params": {}, "model_state": {}}, w.work / w.model)


def _version_2_checkpoint(w: World) -> None:
    """A complete checkpoint of format 2 (with its hash, its thresholds inside ``model_params``, no ``postprocess``)."""
    from cellseg.checkpoint import FORMAT, HASH, content_hash
    from cellseg.models.unet import build_unet

    params = {**_unet_params().model_dump(), **project_params("postprocess.unet").model_dump()}
    content = {"format": FORMAT, "version": 2, "model": "unet", "model_params": params,
               "model_state": build_unet(_unet_params()).state_dict()}
    torch.save({**content, HASH: content_hash(content)}, w.work / w.model)


def _unset(dotted: str) -> Callable[[World], None]:
    """The params lose the key (or section) ``dotted``."""

    def apply(w: World) -> None:
        *path, key = dotted.split(".")
        target = w.params
        for name in path:
            target = target[name]
        del target[key]

    return apply


def _alias_bomb(w: World) -> None:
    """"Billion laughs": nine levels of nine aliases each, 9**9 strings once expanded, in 600 bytes."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 9)]
    w.params_text = "\n".join(lines) + "\n"


def _misspelled_section(w: World) -> None:
    w.params["trian"] = w.params.pop("train")


def _huge_image(w: World) -> None:
    """A PNG whose header says 12000×12000 pixels (144 Mpx: under PIL's bomb limit, over cellseg's)."""
    _good_checkpoint(w)
    _bomb(w, w.work / "images" / "huge.png", 12000)


def _text_named_png(w: World) -> None:
    _good_checkpoint(w)
    (w.work / "images" / "notes.png").write_text("not an image")


def _no_images(w: World) -> None:
    _good_checkpoint(w)
    for path in (w.work / "images").iterdir():
        path.rename(path.with_suffix(".txt"))


def _report_in_plots(w: World) -> None:
    w.args = [*STAGE_ARGS["evaluate"][:-1], "plots/compare.md"]


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


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
    Case("params-section-missing", "train_unet", _unset("postprocess"), ("params.yaml: no section 'postprocess'",)),
    Case("params-key-missing", "train_maskrcnn", _unset("maskrcnn.anchor_sizes"), ("params.yaml: maskrcnn.anchor_sizes: Field required",)),
    # --- params the library no longer checks itself: the stage reading params.yaml refuses them ---
    Case("patches-per-cell-zero", "patches", param("patches.per_cell", 0), ("params.yaml", "patches.per_cell", "greater than or equal to 1", "(got 0)")),
    Case("patches-background-fraction-nan", "patches", param("patches.background_fraction", float("nan")),
         ("params.yaml", "patches.background_fraction", "finite number")),
    Case("synth-seed-negative", "synthesize", param("synth.seed", -1), ("params.yaml", "synth.seed", "greater than or equal to 0", "(got -1)")),
    Case("augment-a-string", "train_unet", param("unet.augment", "hflip"), ("params.yaml", "unet.augment", "valid list", "(got 'hflip')")),
    Case("boundary-width-zero", "train_unet", param("unet.boundary_width", 0), ("params.yaml", "unet.boundary_width", "(got 0)")),
    Case("channels-two", "train_unet", param("unet.channels", 2), ("params.yaml", "unet.channels", "Input should be 1 or 3", "(got 2)")),
    Case("target-unknown", "flows", param("unet.target", "cellpose"), ("params.yaml", "unet.target", "'boundary' or 'flows'", "(got 'cellpose')")),
    Case("flows-with-affine-augmentation", "train_unet", _flows_with("unet.augment", ["hflip", "shift_scale_rotate"]),
         ("params.yaml", "unet", "augment 'shift_scale_rotate' bends the flow target's vectors")),
    Case("flows-not-computed", "train_unet", _flows_with(), ("flows/", ".npz: no flows for image", "rerun the flows stage")),
    # --- per-cell-type params (postprocess.*): cell types only, every one covered ---
    Case("min-size-unknown-cell-type", "train_unet", param("postprocess.unet.min_size", {"default": 20, "neuron": 5}),
         ("params.yaml", "postprocess.unet.min_size", "unknown cell type 'neuron'")),
    Case("score-threshold-not-every-cell-type", "train_maskrcnn", param("postprocess.maskrcnn.score_threshold", {"shsy5y": 0.3}),
         ("params.yaml", "postprocess.maskrcnn.score_threshold", "no entry for astro, cort and no 'default'")),
    # --- the tune stage ---
    Case("tune-folds-beyond-images", "tune", param("tune.folds", 20), ("tune: the", "validation images are too few for tune.folds 20; lower tune.folds")),
    Case("tune-candidate-out-of-range", "tune", param("tune.unet.min_size", [0, -5]),
         ("params.yaml", "tune.unet.min_size.1", "greater than or equal to 0", "(got -5)")),
    Case("tune-no-candidates", "tune", param("tune.unet.flow_threshold", []),
         ("params.yaml", "tune.unet.flow_threshold", "at least 1 item")),
    # --- checkpoints ---
    Case("predict-foreign-torch-file", "predict", _foreign_checkpoint, ("{work}/model.pt", "not a cellseg checkpoint")),
    Case("predict-truncated-checkpoint", "predict", _truncated_checkpoint, ("{work}/model.pt", "not a readable cellseg checkpoint")),
    Case("predict-checkpoint-without-weights", "predict", _checkpoint_without_weights, ("{work}/model.pt", "maskrcnn", "model_state")),
    Case("predict-weights-do-not-fit", "predict", _checkpoint_with_wrong_weights, ("{work}/model.pt", "unet", "do not fit")),
    Case("train-resume-other-model", "train_unet", _resume_from_other_model, ("models/unet/last.pt", "checkpoint of model 'maskrcnn', expected 'unet'")),
    Case("train-resume-incomplete-last", "train_unet", _resume_from_best, ("models/unet/last.pt", "cannot resume", "optimizer")),
    Case("train-resume-weights-do-not-fit", "train_unet", _resume_from_other_weights, ("models/unet/last.pt", "cannot resume", "do not fit")),
    Case("predict-checkpoint-bytes-flipped", "predict", _flipped_checkpoint, ("{work}/model.pt", "checkpoint is corrupt", "sha256")),
    Case("train-resume-last-bytes-flipped", "train_unet", _flipped_last, ("models/unet/last.pt", "checkpoint is corrupt")),
    Case("predict-checkpoint-format-1", "predict", _version_1_checkpoint, ("{work}/model.pt", "format version 1; this cellseg reads 4")),
    Case("predict-checkpoint-format-2", "predict", _version_2_checkpoint, ("{work}/model.pt", "format version 2; this cellseg reads 4")),
    # --- output paths: never an input, the working directory, or a folder cellseg did not write ---
    Case("predict-out-is-the-input", "predict", _predict_with("images", "--out", "images", "--overwrite"),
         ("images: an output may not be, contain or lie inside an input; it is the input images",)),
    Case("predict-out-contains-the-input", "predict", _predict_with("dir/imgs", "--out", "dir", "--overwrite", setup=_nested_images),
         ("dir: an output may not be", "it contains the input dir/imgs")),
    Case("predict-out-inside-the-input", "predict", _predict_with("images", "--out", "images/seg"), ("images/seg:", "it lies inside the input images")),
    Case("predict-out-is-the-checkpoint", "predict", _predict_with("images", "--out", "model.pt", "--overwrite"), ("model.pt:", "it is the input model.pt")),
    Case("predict-out-is-dot", "predict", _predict_with("images", "--out", ".", "--overwrite"), (".: is the working directory",)),
    Case("predict-out-is-a-parent", "predict", _predict_with("images", "--out", "..", "--overwrite"), ("..: is a parent of the working directory",)),
    Case("predict-out-is-a-user-folder", "predict", _predict_with("images", "--out", "results", "--overwrite", setup=_user_folder("results")),
         ("results: a folder that cellseg did not write (no .cellseg-output file in it): refusing to replace it",)),
    Case("predict-out-is-a-file", "predict", _predict_with("images", "--out", "params.yaml", "--overwrite"), ("params.yaml: is a file; this output is a folder",)),
    Case("predict-out-is-a-link-to-the-input", "predict", _predict_with("images", "--out", "link", "--overwrite", setup=_link_to_images),
         ("link (a link to {work}/images)", "it is the input images")),
    Case("decode-out-is-the-data-root", "decode", _args("--out", "{root}"), ("{root}: an output may not be", "it is the input {root}")),
    Case("decode-out-inside-the-data-root", "decode", _args("--out", "{root}/decoded"), ("it lies inside the input {root}",)),
    Case("decode-out-is-a-user-folder", "decode", lambda w: (_user_folder("decoded")(w)), ("decoded: a folder that cellseg did not write",)),
    Case("split-out-is-a-folder", "split", lambda w: (w.work / "split.json").mkdir(), ("split.json: is a folder; this output is a file",)),
    Case("split-out-inside-its-input", "split", _args("--decoded", "decoded", "--out", "decoded/split.json"), ("it lies inside the input decoded",)),
    Case("patches-out-is-the-params-file", "patches", _args("--decoded", "decoded", "--split", "split.json", "--out", "params.yaml"),
         ("params.yaml: an output may not be", "it is the input params.yaml")),
    Case("train-models-inside-an-input", "train_unet",
         _args("--decoded", "decoded", "--split", "split.json", "--patches", "patches.parquet", "--flows", "flows", "--models", "decoded/m", "--metrics", "m"),
         ("decoded/m:", "it lies inside the input decoded")),
    Case("evaluate-outputs-overlap", "evaluate", _report_in_plots, ("plots: two outputs overlap; it contains the output plots/compare.md",)),
    Case("split-out-under-a-file", "split",
         lambda w: ((w.work / "notes.txt").write_text("mine"), _args("--decoded", "decoded", "--out", "notes.txt/split.json")(w)),
         ("notes.txt/split.json: lies under", "notes.txt, which is a file, not a folder")),
    Case("synth-out-is-a-user-folder", "synth", lambda w: (_user_folder("mine")(w), _args("--out", "mine", "--images", "1", "--overwrite")(w)),
         ("mine: a folder that cellseg did not write",)),
    Case("synth-out-exists-without-overwrite", "synth", lambda w: None, ("synth: already exists and is not empty; pass --overwrite",), prior=True),
    # --- params: meaning, not only type; the file read within bounds ---
    Case("params-is-a-folder", "decode", lambda w: (setattr(w, "params_arg", "conf"), (w.work / "conf").mkdir()),
         ("conf: cannot read the params file (Is a directory)",)),
    Case("tracking-experiment-empty", "train_unet", lambda w: w.params["tracking"].update(enabled=True, experiment=""),
         ("tracking.experiment", "at least 1 character")),
    Case("params-misspelled-section", "train_unet", _misspelled_section, ("params.yaml: unknown section 'trian': did you mean 'train'?",)),
    Case("params-alias-bomb", "decode", _alias_bomb, ("params.yaml: line 2: YAML aliases (*l0) are not accepted in params",)),
    Case("params-too-large", "decode", lambda w: setattr(w, "params_text", "#" * 2_000_000 + "\n"), ("params.yaml: 2,000,001 bytes", "at most 1,048,576")),
    Case("params-nested-too-deep", "decode", lambda w: setattr(w, "params_text", "data: " + "[" * 100 + "]" * 100 + "\n"), ("nested more than 32 levels deep",)),
    Case("params-not-utf8", "decode", lambda w: setattr(w, "params_text", b"data: {source: \xff}\n"), ("params.yaml: not UTF-8 text",)),
    Case("params-value-echo-is-bounded", "split", param("split.n_folds", "x" * 100_000), ("split.n_folds", "…)")),
    Case("seed-negative", "split", param("split.seed", -1), ("split.seed", "greater than or equal to 0", "(got -1)")),
    Case("seed-beyond-32-bits", "patches", param("patches.seed", 2**40), ("patches.seed", "less than or equal to 4294967295")),
    Case("device-cuda-absent", "train_unet", param("train.unet.device", "cuda"), ("train.unet.device", "'cuda' but this machine has no CUDA device"), needs_no_cuda=True),
    Case("device-not-a-device", "train_unet", param("train.unet.device", "gpu"), ("train.unet.device", "'gpu' is not a device name")),
    Case("batch-size-huge", "train_unet", param("train.unet.batch_size", 10**9), ("train.unet.batch_size", "less than or equal to 4096")),
    Case("patch-size-huge", "patches", param("patches.size", 1 << 20), ("patches.size", "less than or equal to 2048")),
    Case("std-infinite", "train_unet", param("unet.std", float("inf")), ("unet.std", "finite number")),
    Case("augment-unknown", "train_maskrcnn", param("maskrcnn.augment", ["hflip", "spin"]), ("maskrcnn.augment.1", "'spin'")),
    # --- predict: what a folder holds, image sizes, options ---
    Case("predict-image-too-large", "predict", _huge_image, ("images/huge.png: 12000x12000 pixels, more than cellseg reads", "crop it")),
    Case("predict-text-named-png", "predict", _text_named_png, ("images/notes.png: not a readable image",)),
    Case("predict-folder-without-images", "predict", _no_images, ("no images found in images",)),
    Case("predict-batch-size-zero", "predict", _predict_with("images", "--out", "pred", "--batch-size", "0"), ("--batch-size: 0 is below 1",), code=2),
    Case("predict-device-absent", "predict", _predict_with("images", "--out", "pred", "--device", "cuda:3"), ("--device: 'cuda:3' but this machine has",), code=2),
    # --- tracking store ---
    Case("tracking-server-unreachable", "train_unet", lambda w: w.params["tracking"].update(enabled=True, uri="http://127.0.0.1:9"),
         ("MLflow tracking server http://127.0.0.1:9 is unreachable",)),
    Case("tracking-store-not-a-database", "train_unet", lambda w: w.params["tracking"].update(enabled=True, uri="sqlite:///split.json"),
         ("MLflow tracking store sqlite:///", "split.json cannot be opened", "file is not a database")),
    Case("tracking-store-unknown-scheme", "train_unet", lambda w: w.params["tracking"].update(enabled=True, uri="ftp://host/store"),
         ("MLflow tracking store ftp://host/store cannot be opened", "…)")),
]


def _snapshot(top: Path) -> dict[str, str]:
    """Every file and directory under ``top``: relative path → content digest ('dir' for directories)."""
    return {
        str(p.relative_to(top)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(top.rglob("*"))
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_in_one_line_and_writes_nothing(case: Case, make_kaggle, tmp_path: Path) -> None:
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
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

    assert done.returncode == case.code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.rstrip("\n").splitlines()
    assert lines, "no error message"
    last = lines[-1]
    prefix = "error: " if case.code == 1 else f"cellseg {case.stage}: error: "
    assert last.startswith(prefix), done.stderr[-3000:]
    assert [line for line in lines if "error:" in line] == [last]
    for part in case.expect:
        part = part.format(
            csv=w.csv, root=root, work=work,
            image0=root / "train" / "sh0000000000.png", image2=root / "train" / "as1000000000.png",
        )
        assert part in last, f"{part!r} not in {last!r}"
    after = _snapshot(tmp_path)
    assert after == before, sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    for out in OUTPUTS[case.stage]:
        if not case.prior and str((work / out).relative_to(tmp_path)) not in before:
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


def test_what_the_machine_refuses_is_one_line_too(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A full disk or a missing permission mid-run (an ``OSError``) ends in one ``error:`` line naming the path,
    and the atomic output it was writing leaves nothing behind."""
    import errno

    from cellseg.stage import guarded
    from cellseg.io import atomic_path

    def fill_the_disk() -> None:
        with atomic_path(tmp_path / "out", directory=True) as tmp:
            (tmp / "part.png").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "part.png"))

    assert guarded(fill_the_disk) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and lines[-1].endswith("part.png: No space left on device")
    assert list(tmp_path.iterdir()) == []
