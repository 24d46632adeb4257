"""The torch device a run uses: named in params or on the command line, checked to exist before any work."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DEVICE_NAMES = "auto (CUDA when present), cpu, cuda, cuda:<index> or mps"


def check_device(name: str) -> str:
    """``name`` when it names a device this machine has; otherwise ``ValueError`` saying what there is."""
    if name in ("auto", "cpu"):
        return name
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("'mps' but this machine has no Apple MPS device; use auto or cpu")
        return name
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise ValueError(f"{name!r} is not a device name; expected {DEVICE_NAMES}")
    count = torch.cuda.device_count()
    if int(match.group(1) or 0) >= count:
        has = f"{count} CUDA device(s) (cuda:0..cuda:{count - 1})" if count else "no CUDA device"
        raise ValueError(f"{name!r} but this machine has {has}; use auto or cpu")
    return name


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; otherwise the named device (checked by :func:`check_device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(check_device(name))


def free_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device``: CUDA's free memory; for the CPU, Linux's ``MemAvailable`` capped by the
    cgroup (container) limit. None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        cgroup = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if cgroup != "max":
            free = min(free, int(cgroup) - used)
    except (OSError, ValueError):
        pass
    return max(free, 0)
