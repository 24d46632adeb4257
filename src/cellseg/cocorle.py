"""COCO's compressed RLE for the competition's masks, converted without building full-size masks.

Masks move between the competition's row-major runs and COCO's column-major RLE all instances at once: going
from one order to the other is transposing each mask, done by :func:`_transpose_runs` on every run of every
instance together. The COCO strings themselves are made by pycocotools (from the column-major counts) and
read back by a vectorized copy of its decoder, so the result is byte for byte what
``pycocotools.mask.encode`` gives for the full mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from cellseg import rle
from cellseg.errors import DataError

_CHUNK = 2000  # instances converted at once: bounds memory, and keeps the arrays small enough to stay fast
_PYCOCO_BATCH = 255  # pycocotools 2.0.11 area()/toBbox() overflow a uint8 on longer lists under NumPy 2

Runs = tuple[np.ndarray, np.ndarray, np.ndarray]  # 0-based starts, lengths, owner (instance index, sorted)
Describe = Callable[[int], str]  # an item's index → how error messages name it


def batched(function: Callable[[list[dict]], np.ndarray], rles: list[dict]) -> np.ndarray:
    """Apply a pycocotools batch function to ``rles`` a slice at a time (see ``_PYCOCO_BATCH``)."""
    parts = [function(rles[i : i + _PYCOCO_BATCH]) for i in range(0, len(rles), _PYCOCO_BATCH)]
    return np.concatenate(parts or [np.zeros(0)])


def rle_to_coco(
    annotations: Sequence[str],
    heights: np.ndarray,
    widths: np.ndarray,
    describe: Describe = "annotation {}".format,
) -> list[dict]:
    """Competition RLE strings (masks of ``heights[k]`` × ``widths[k]``) → COCO compressed RLE dicts (str counts).

    A malformed string raises :class:`DataError` starting with ``describe(k)``.
    """
    return _in_chunks(_rle_to_coco, annotations, np.asarray(heights, np.int64), np.asarray(widths, np.int64), describe)


def coco_to_rle(rles: Sequence[dict], describe: Describe = "annotation {}".format) -> list[str]:
    """COCO compressed RLE dicts (``size`` [h, w], ``counts`` str or bytes) → competition RLE strings.

    A malformed RLE raises :class:`DataError` starting with ``describe(k)``.
    """
    heights = np.array([int(r["size"][0]) for r in rles], np.int64)
    widths = np.array([int(r["size"][1]) for r in rles], np.int64)
    return _in_chunks(_coco_to_rle, rles, heights, widths, describe)


def _in_chunks(
    convert: Callable[..., list], items: Sequence, heights: np.ndarray, widths: np.ndarray, describe: Describe
) -> list:
    """``convert`` applied to :data:`_CHUNK` items at a time, the results concatenated."""
    converted = []
    for a in range(0, len(items), _CHUNK):
        b = a + _CHUNK
        converted += convert(items[a:b], heights[a:b], widths[a:b], lambda k, a=a: describe(a + k))
    return converted


def _rle_to_coco(annotations: Sequence[str], heights: np.ndarray, widths: np.ndarray, describe: Describe) -> list[dict]:
    starts, lengths, owner = _transpose_runs(*_parse_runs(annotations, heights * widths, describe), heights, widths)
    counts = _counts(starts, lengths, owner, heights * widths)
    uncompressed = [{"counts": c, "size": [h, w]} for c, h, w in zip(counts, heights.tolist(), widths.tolist())]
    return [
        {"size": r["size"], "counts": r["counts"].decode("ascii")}
        for r in mask_utils.frPyObjects(uncompressed, 0, 0)  # sizes are taken from each dict
    ]


def _coco_to_rle(rles: Sequence[dict], heights: np.ndarray, widths: np.ndarray, describe: Describe) -> list[str]:
    strings = [r["counts"].encode("ascii") if isinstance(r["counts"], str) else bytes(r["counts"]) for r in rles]
    counts, n_counts, valid = _decompress(strings, heights * widths)
    if not valid.all():
        bad = int(np.argmin(valid))
        raise DataError(
            f"{describe(bad)}: malformed RLE (bad characters, negative counts, or counts that do not add up to "
            f"the {heights[bad]}x{widths[bad]} image)"
        )
    # column-major runs of a mask are the row-major runs of its transpose, so transposing (w × h) gives it back
    starts, lengths, owner = _transpose_runs(*_runs_from_counts(counts, n_counts), widths, heights)
    pairs = np.empty(2 * len(starts), np.int64)
    pairs[0::2], pairs[1::2] = starts + 1, lengths
    tokens = list(map(str, pairs.tolist()))
    ends = 2 * np.cumsum(np.bincount(owner, minlength=len(rles)))
    return [" ".join(tokens[a:b]) for a, b in zip([0, *ends[:-1].tolist()], ends.tolist())]


def _parse_runs(annotations: Sequence[str], n_pixels: np.ndarray, describe: Describe) -> Runs:
    """All runs of all annotations, validated as strictly as :func:`cellseg.rle.parse` does.

    All at once when every string is well-formed; otherwise string by string with ``rle.parse``, which names
    the problem.
    """
    runs = _parse_well_formed(annotations, n_pixels)
    if runs is not None:
        return runs
    parsed = []
    for k, annotation in enumerate(annotations):
        try:
            parsed.append(rle.parse(annotation, int(n_pixels[k])))
        except rle.RLEError as exc:
            raise DataError(f"{describe(k)}: malformed RLE: {exc}") from None
    n_runs = [len(s) for s, _ in parsed]
    return (
        np.concatenate([s for s, _ in parsed]),
        np.concatenate([length for _, length in parsed]),
        np.repeat(np.arange(len(parsed)), n_runs),
    )


def _parse_well_formed(annotations: Sequence[str], n_pixels: np.ndarray) -> Runs | None:
    """All runs, parsed at once, or ``None`` unless every string passes the checks of ``rle.parse``."""
    n_tokens = np.fromiter((len(a.split()) for a in annotations), np.int64, len(annotations))
    try:
        tokens = np.fromstring(" ".join(annotations), dtype=np.int64, sep=" ")
    except ValueError:  # a token that is not an integer
        return None
    if len(tokens) != n_tokens.sum() or (n_tokens % 2).any():
        return None
    owner = np.repeat(np.arange(len(annotations)), n_tokens // 2)
    starts, lengths, limit = tokens[0::2] - 1, tokens[1::2], n_pixels[owner]
    # tokens beyond int64 saturate at its maximum: bounding starts and lengths first keeps ``ends`` exact
    if not ((starts >= 0) & (starts < limit) & (lengths >= 1) & (lengths <= limit)).all():
        return None
    ends = starts + lengths
    follows = np.ones(len(starts), bool)
    follows[1:] = (owner[1:] != owner[:-1]) | (starts[1:] >= ends[:-1])
    if not ((ends <= limit) & follows).all():
        return None
    return starts, lengths, owner


def _transpose_runs(
    starts: np.ndarray, lengths: np.ndarray, owner: np.ndarray, heights: np.ndarray, widths: np.ndarray
) -> Runs:
    """Row-major runs of masks (mask ``k`` is ``heights[k]`` × ``widths[k]``) → row-major runs of their transposes.

    Input runs must be grouped by owner (sorted) but may touch or overlap; output runs are sorted, disjoint and
    merged. Each mask is painted, transposed, into its bounding box with one empty pad pixel closing every line,
    all boxes end to end in one flat array; the output runs are that array's edges, mapped back.
    """
    n = len(heights)
    width = widths[owner]
    row, col = np.divmod(starts, width)
    # a run that wraps onto the next image rows becomes one segment per row
    n_seg = (col + lengths - 1) // width + 1
    run = np.repeat(np.arange(len(starts)), n_seg)
    k = np.arange(len(run)) - np.repeat(np.cumsum(n_seg) - n_seg, n_seg)
    seg_owner, seg_row = owner[run], row[run] + k
    seg_c0 = np.where(k == 0, col[run], 0)
    seg_c1 = np.minimum(width[run], col[run] + lengths[run] - k * width[run])
    # bounding box per mask (empty masks keep a 0 × 0 box)
    present = np.flatnonzero(np.bincount(seg_owner, minlength=n))
    first = np.searchsorted(seg_owner, present)
    y0, y1, x0, x1 = (np.zeros(n, np.int64) for _ in range(4))
    y0[present] = np.minimum.reduceat(seg_row, first)
    y1[present] = np.maximum.reduceat(seg_row, first) + 1
    x0[present] = np.minimum.reduceat(seg_c0, first)
    x1[present] = np.maximum.reduceat(seg_c1, first)
    line = y1 - y0 + 1  # one transposed line per mask column, plus the pad pixel
    size = (x1 - x0) * line
    offset = np.cumsum(size) - size
    # paint: pixel (r, c) of mask o goes to offset[o] + (c - x0[o]) * line[o] + (r - y0[o]); a segment's pixels
    # are line[o] apart, so positions are a cumulative sum of steps, each segment's first step jumping to it
    o = seg_owner
    first_pos = offset[o] + (seg_c0 - x0[o]) * line[o] + (seg_row - y0[o])
    n_px = seg_c1 - seg_c0
    last_pos = first_pos + (n_px - 1) * line[o]
    steps = np.repeat(line[o], n_px)
    steps[np.cumsum(n_px) - n_px] = first_pos - np.concatenate([[0], last_pos[:-1]])
    painted = np.zeros(int(size.sum()) + 1, bool)
    painted[np.cumsum(steps) + 1] = True  # painted[0] stays empty, so that edges pair up as (start, end)
    edges = np.flatnonzero(painted[1:] != painted[:-1])
    begin, end = edges[0::2], edges[1::2]
    new_owner = np.searchsorted(offset, begin, side="right") - 1
    o = new_owner
    column, r = np.divmod(begin - offset[o], line[o])
    new_starts = (x0[o] + column) * heights[o] + y0[o] + r
    new_lengths = end - begin
    # runs that continue from the end of one transposed line onto the next one merge
    joins = np.zeros(len(new_starts), bool)
    joins[1:] = (new_owner[1:] == new_owner[:-1]) & (new_starts[1:] == new_starts[:-1] + new_lengths[:-1])
    keep = np.flatnonzero(~joins)
    return new_starts[keep], np.add.reduceat(new_lengths, keep), new_owner[keep]


def _counts(starts: np.ndarray, lengths: np.ndarray, owner: np.ndarray, n_pixels: np.ndarray) -> list[np.ndarray]:
    """Uncompressed COCO counts per mask (alternating background and foreground, background first)."""
    n = len(n_pixels)
    n_runs = np.bincount(owner, minlength=n)
    # per mask the boundaries 0, s0, e0, ..., sk, ek, n_pixels; the counts are their differences
    head = 2 * (np.cumsum(n_runs) - n_runs) + 2 * np.arange(n)
    bounds = np.empty(2 * len(starts) + 2 * n, np.int64)
    at = 2 * np.arange(len(starts)) + 2 * owner + 1
    bounds[at], bounds[at + 1] = starts, starts + lengths
    bounds[head], bounds[head + 2 * n_runs + 1] = 0, n_pixels
    differences = np.diff(bounds)
    n_counts = 2 * n_runs + 1 - (bounds[head + 2 * n_runs] == n_pixels)  # no trailing background count
    return [differences[a : a + m] for a, m in zip(head.tolist(), n_counts.tolist())]


def _decompress(strings: list[bytes], n_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pycocotools' ``rleFrString``, vectorized: all counts, the number per string, and which strings are valid.

    Each character holds 5 bits of a value, least significant first; its bit 0x20 says another character
    follows, bit 0x10 of a value's last character is the sign. From the fourth value of a string on, a value is
    a delta to the count two before. A string is valid when its characters are in range, it ends a value, no
    value is longer than 7 characters, and its counts are non-negative and sum to the image's pixel count.
    """
    n = len(strings)
    sizes = np.fromiter(map(len, strings), np.int64, n)
    chars = np.frombuffer(b"".join(strings), np.uint8).astype(np.int64) - 48
    owner = np.repeat(np.arange(n), sizes)
    last = (chars & 0x20) == 0
    string_end = (np.cumsum(sizes) - 1)[sizes > 0]
    terminated = np.ones(n, bool)
    terminated[sizes > 0] = last[string_end]
    last[string_end] = True  # so that no value runs on into the next string
    value_end = np.flatnonzero(last)
    value_begin = np.concatenate([[0], value_end[:-1] + 1])
    n_chunks = value_end - value_begin + 1
    position = np.arange(len(chars)) - np.repeat(value_begin, n_chunks)
    values = np.add.reduceat((chars & 0x1F) << (5 * np.minimum(position, 7)), value_begin)
    values = np.where(chars[value_end] & 0x10, values - (1 << (5 * np.minimum(n_chunks, 7))), values)
    value_owner = owner[value_end]
    n_counts = np.bincount(value_owner, minlength=n)
    index = np.arange(len(values)) - np.repeat(np.cumsum(n_counts) - n_counts, n_counts)
    odd = index % 2 == 1
    odd_counts = _segment_cumsum(np.where(odd, values, 0), n_counts)
    even_counts = _segment_cumsum(np.where(~odd & (index > 0), values, 0), n_counts)
    counts = np.where(index == 0, values, np.where(odd, odd_counts, even_counts))
    flawed = ((chars < 0) | (chars >= 64)).astype(np.int64)
    flawed_values = ((counts < 0) | (n_chunks > 7)).astype(np.int64)
    valid = (
        terminated
        & (np.bincount(owner, weights=flawed, minlength=n) == 0)
        & (np.bincount(value_owner, weights=flawed_values, minlength=n) == 0)
        & (_segment_sum(counts, n_counts) == n_pixels)
    )
    return counts, n_counts, valid


def _segment_cumsum(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each segment (segments of ``sizes`` consecutive values), exact in int64."""
    total = np.concatenate([[0], np.cumsum(values)])
    return total[1:] - np.repeat(total[np.cumsum(sizes) - sizes], sizes)


def _segment_sum(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Sum of each segment (0 for an empty one), exact in int64."""
    total = np.concatenate([[0], np.cumsum(values)])
    ends = np.cumsum(sizes)
    return total[ends] - total[ends - sizes]


def _runs_from_counts(counts: np.ndarray, n_counts: np.ndarray) -> Runs:
    """Foreground runs (empty ones dropped) of uncompressed COCO counts, ``n_counts[k]`` of them for mask ``k``."""
    owner = np.repeat(np.arange(len(n_counts)), n_counts)
    index = np.arange(len(counts)) - np.repeat(np.cumsum(n_counts) - n_counts, n_counts)
    foreground = (index % 2 == 1) & (counts > 0)
    begins = _segment_cumsum(counts, n_counts) - counts
    return begins[foreground], counts[foreground], owner[foreground]
