"""Run-length encoding in the Sartorius competition's convention.

An annotation is a string of space-separated ``start length`` pairs. Starts are 1-based and pixels are
numbered in row-major order of the H×W image (pixel ``(r, c)`` is number ``r * W + c + 1``). Runs are
strictly increasing and do not touch or overlap. An empty string is an empty mask.

Both directions are vectorized with NumPy: no Python loop over runs or pixels.
"""

from __future__ import annotations

import numpy as np

from cellseg.errors import DataError


class RLEError(DataError):
    """A run-length string is malformed; the message names the problem and the token position."""


def parse(rle: str, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``rle`` for an image of ``n_pixels`` pixels and return 0-based ``(starts, lengths)``."""
    tokens = rle.split()
    if not tokens:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if len(tokens) % 2:
        raise RLEError(f"odd number of tokens ({len(tokens)}): every start needs a length")
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(i for i, t in enumerate(tokens) if not _is_int(t))
        raise RLEError(f"token {bad + 1} ({tokens[bad][:20]!r}) is not an integer (or exceeds 64 bits)") from None
    starts, lengths = values[0::2], values[1::2]
    _check(starts < 1, "start", "is below 1", starts, 0)
    _check(lengths < 1, "length", "is not positive", lengths, 1)
    # exclusive, 0-based; clipped first so that starts/lengths near 2**63 cannot overflow past the check below
    ends = np.minimum(starts, n_pixels + 1) - 1 + np.minimum(lengths, n_pixels + 1)
    _check(ends > n_pixels, "run starting at", f"runs past the end of the image ({n_pixels} pixels)", starts, 0)
    if len(starts) > 1:
        # a run may touch the previous one but must start at or after its end
        disorder = starts[1:] - 1 < ends[:-1]
        _check(np.concatenate([[False], disorder]), "run starting at", "is out of order or overlaps the previous run", starts, 0)
    return starts - 1, lengths


def _is_int(token: str) -> bool:
    try:
        value = int(token)
    except ValueError:
        return False
    return -(2**63) <= value < 2**63


def _check(bad: np.ndarray, what: str, problem: str, values: np.ndarray, offset: int) -> None:
    """Raise for the first true entry of ``bad`` (a per-pair flag), naming its 1-based token position."""
    if bad.any():
        pair = int(np.argmax(bad))
        raise RLEError(f"token {2 * pair + offset + 1}: {what} {int(values[pair])} {problem}")


def pixels(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode ``rle`` into the sorted flat (row-major) indices of its pixels in an image of ``shape``.

    Costs O(area) rather than O(H×W): the form to use when painting many cells into one image.
    """
    starts, lengths = parse(rle, shape[0] * shape[1])
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(int(lengths.sum()), dtype=np.int64)


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode ``rle`` into a boolean mask of ``shape`` (H, W)."""
    mask = np.zeros(shape[0] * shape[1], dtype=bool)
    mask[pixels(rle, shape)] = True
    return mask.reshape(shape)


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D boolean mask as a competition RLE string (empty string for an empty mask)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return encode_pixels(np.flatnonzero(mask))


def encode_labels(labels: np.ndarray) -> list[str]:
    """The competition RLE string of every label 1..max of a 2-D label image ("" for a label absent), from one
    sort of its pixels (no mask per label)."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")  # stable: each label's pixels stay ascending
    bounds = np.searchsorted(flat[order], np.arange(1, int(flat.max(initial=0)) + 2))
    return [encode_pixels(order[bounds[k] : bounds[k + 1]]) for k in range(len(bounds) - 1)]


def encode_pixels(pixels: np.ndarray) -> str:
    """Encode sorted, unique flat (row-major) pixel indices as a competition RLE string."""
    if len(pixels) == 0:
        return ""
    breaks = np.flatnonzero(np.diff(pixels) != 1) + 1
    starts = pixels[np.concatenate([[0], breaks])]
    lengths = np.diff(np.concatenate([[0], breaks, [len(pixels)]]))
    runs = np.empty(2 * len(starts), dtype=np.int64)
    runs[0::2] = starts + 1
    runs[1::2] = lengths
    return " ".join(map(str, runs.tolist()))
