"""Result rows and the clocks and memory probes the benchmarks share."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

MB = 2**20
LAUNCHER = Path(__file__).with_name("child.py")


@dataclass
class Result:
    """One row of the results table. ``ratio`` is ``baseline time / this time`` (above 1: faster)."""

    part: str
    case: str
    impl: str
    seconds: float | None = None
    rate: float | None = None
    unit: str = ""
    peak_mb: float | None = None
    ratio: float | None = None
    baseline: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""


def against(result: Result, baseline: str, baseline_seconds: float, minimum: float | None = None,
            target: str = "") -> Result:
    """A copy of ``result`` with its ratio against ``baseline`` and, given ``minimum``, whether it is met."""
    ratio = baseline_seconds / result.seconds
    met = None if minimum is None else ratio >= minimum
    return Result(**{**vars(result), "ratio": ratio, "baseline": baseline, "target": target, "met": met})


def clock(work: Callable[[], object]) -> float:
    """Wall seconds of ``work()``."""
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def traced_peak_mb(work: Callable[[], object]) -> float:
    """Peak MiB that Python and NumPy allocate during ``work()`` (tracemalloc; C libraries' own mallocs unseen)."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1] / MB
    finally:
        tracemalloc.stop()


def each(function: Callable[[object], object], items: Iterable[object]) -> None:
    """Call ``function`` on every item, dropping the results (so that they never pile up in memory)."""
    for item in items:
        function(item)


def run_child(command: list[str], cwd: Path, log: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``command`` to completion: ``(wall seconds, peak RSS in MiB)`` of that child, its output in ``log``.

    The child is started by the small launcher ``child.py``, which reads its peak RSS with ``os.wait4``.
    """
    with log.open("w") as out:
        launched = subprocess.run([sys.executable, str(LAUNCHER), *command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=out, text=True, check=True)
    report = json.loads(launched.stdout)
    if report["returncode"]:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(command)} failed with exit code {report['returncode']}:\n{tail}")
    return report["seconds"], report["maxrss_kib"] / 1024
