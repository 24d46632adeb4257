"""cellseg.io: strict JSON output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cellseg.io import write_json


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
