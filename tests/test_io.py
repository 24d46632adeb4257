"""cellseg.io: strict JSON output; atomic outputs that never replace a folder cellseg did not write, and the
debris of killed runs cleared by the next one."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cellseg.errors import DataError
from cellseg.io import MARKER, atomic_path, write_json


def _refuse(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")


def test_write_json_is_strict_json(tmp_path: Path) -> None:
    """NaN and infinities (e.g. a type accuracy over no detection) become null: any JSON reader can read the file."""
    metrics = {"map": 0.5, "type_accuracy": math.nan, "nested": [np.float64("inf"), {"x": -math.inf}], "n": 3}
    write_json(tmp_path / "m.json", metrics)
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=_refuse) == {
        "map": 0.5, "type_accuracy": None, "nested": [None, {"x": None}], "n": 3,
    }
    with pytest.raises(ValueError, match="NaN"):
        json.loads('{"a": NaN}', parse_constant=_refuse)  # the check above can fail


def _write_tree(path: Path, text: str) -> None:
    with atomic_path(path, directory=True) as tmp:
        (tmp / "data.txt").write_text(text)


def test_a_tree_is_marked_and_only_a_marked_or_empty_folder_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_tree(out, "one")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "data.txt"]
    _write_tree(out, "two")
    assert (out / "data.txt").read_text() == "two"
    (tmp_path / "empty").mkdir()
    _write_tree(tmp_path / "empty", "three")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="mine: a folder that cellseg did not write"):
        _write_tree(mine, "four")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    with pytest.raises(DataError, match="is a folder; this output is a file"):
        write_json(mine, {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file; this output is a folder"):
        _write_tree(tmp_path / "file", "five")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "mine", "out"]  # no debris


def test_a_link_to_a_tree_replaces_its_target(tmp_path: Path) -> None:
    _write_tree(tmp_path / "target", "one")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    _write_tree(tmp_path / "link", "two")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "data.txt").read_text() == "two"


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_debris_of_dead_writers_is_cleared_and_a_live_writers_kept(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getpid()
    stale_dir = tmp_path / f".out.{dead}.abc123.tmp"
    stale_dir.mkdir()
    (stale_dir / "half.png").write_bytes(b"half")
    stale_file = tmp_path / f".split.json.{dead}.xyz.tmp"
    stale_file.write_text("{")
    busy = tmp_path / f".out.{live}.def456.tmp"
    busy.mkdir()
    unrelated = tmp_path / f".other.{dead}.q.tmp"
    unrelated.write_text("not this output's")
    _write_tree(tmp_path / "out", "one")
    write_json(tmp_path / "split.json", {"train": []})
    assert not stale_dir.exists() and not stale_file.exists()
    assert busy.exists() and unrelated.exists()


def test_a_kill_between_the_two_renames_puts_the_previous_output_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_tree(out, "previous")
    out.rename(tmp_path / ".out.old")  # what a kill after the first rename leaves
    with pytest.raises(RuntimeError):
        with atomic_path(out, directory=True):
            raise RuntimeError("this run fails too")
    assert (out / "data.txt").read_text() == "previous" and not (tmp_path / ".out.old").exists()


def test_kill_9_leaves_debris_that_the_next_run_removes(tmp_path: Path) -> None:
    """``cellseg synth`` killed with SIGKILL mid-write; the next run of it clears its temporary folder."""
    command = [sys.executable, "-m", "cellseg.cli", "synth", "--out", "synth", "--images", "300"]
    proc = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".synth.*.tmp/train/*.png")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    debris = list(tmp_path.glob(".synth.*.tmp"))
    assert len(debris) == 1 and not (tmp_path / "synth").exists()
    done = subprocess.run([*command[:-1], "2"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]
    assert len(list((tmp_path / "synth" / "train").glob("*.png"))) == 2
