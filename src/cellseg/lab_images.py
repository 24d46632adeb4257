"""A lab's own images for ``cellseg predict``: PNG, TIFF (16-bit included) or JPEG, grey or colour, read into
the grey 8-bit form the models were trained on.

The rules, in order:

1. **One 2-D image a file.** A multi-page TIFF (a z-stack, a time series, channels as pages) or an animated
   PNG/GIF is refused, naming its pages; split it first (Fiji: Image › Stacks › Stack to Images).
2. **Grey.** Colour (RGB, RGBA, palette, CMYK) becomes its luminance,
   ``0.2125 R + 0.7154 G + 0.0721 B`` (scikit-image's ``rgb2gray``, ITU-R BT.709); alpha is dropped. An RGB
   export of a grey image therefore gives back that grey image exactly.
3. **Intensity.** An 8-bit image is used as it is: the models were trained on the competition's 8-bit images
   as they are. Any other depth (16-bit, 32-bit, float) has no fixed relation to those grey levels, so it is
   mapped linearly to the competition's statistics: every competition image has mean 128, and their median
   standard deviation is :data:`TRAINING_STD` grey levels. The image is shifted to mean 128 and scaled to that
   standard deviation, then rounded and clipped to 0..255 (a flat image becomes 128).

The grey image in the file's own units (16-bit values for a 16-bit file) is kept too, for the per-cell mean
intensity.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage.color import rgb2gray

from cellseg.errors import DataError
from cellseg.io import opened_image

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
MAX_PIXELS = 2**27  # 134 million pixels (11,585²): the label image alone then takes half a GiB
TRAINING_MEAN = 128.0  # the mean grey level of every competition image (../shared/sartorius: 127.75..128.12)
TRAINING_STD = 13.6  # their median standard deviation, in grey levels (astro 8.0, shsy5y 12.8, cort 15.1)


@dataclass(frozen=True)
class LabImage:
    """One image file read for prediction: ``grey`` in the file's own units (H×W; float for colour files of
    more than 8 bits), ``model_input`` (uint8 H×W, rule 3 of the module docstring) and ``kind`` (e.g. "16-bit
    grey")."""

    path: Path
    grey: np.ndarray
    model_input: np.ndarray
    kind: str


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, after checking rule 1 and :data:`MAX_PIXELS`; a
    :class:`DataError` names the file otherwise."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        with _tiff(path) as tif:
            shape = _tiff_layout(path, tif)[0]
    else:
        with opened_image(path) as image:
            _single_frame(path, image)
            shape = (image.height, image.width)
    if shape[0] * shape[1] > MAX_PIXELS:
        raise DataError(f"{path}: {shape[1]}x{shape[0]} pixels, more than cellseg reads ({MAX_PIXELS:,}); crop it")
    return shape


def read_image(path: str | Path) -> LabImage:
    """Read one image file by the module docstring's rules; a :class:`DataError` names the file otherwise."""
    path = Path(path)
    image_shape(path)
    pixels = _read_tiff(path) if path.suffix.lower() in TIFF_SUFFIXES else _read_pil(path)
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.dtype.kind not in "uif":
        raise DataError(f"{path}: pixels of type {pixels.dtype} are not an intensity image")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise DataError(f"{path}: holds values that are not finite (NaN or infinity)")
    colour = pixels.ndim == 3
    grey = _luminance(pixels) if colour else pixels
    kind = f"{pixels.dtype.itemsize * 8}-bit{' float' * (pixels.dtype.kind == 'f')} {'colour' if colour else 'grey'}"
    return LabImage(path, grey, to_model_input(grey), kind)


def to_model_input(grey: np.ndarray) -> np.ndarray:
    """A grey image as the uint8 image the models take: itself when 8-bit, otherwise standardised to the
    competition's mean and standard deviation (rule 3)."""
    if grey.dtype == np.uint8:
        return grey
    values = grey.astype(np.float64)
    spread = values.std()
    scaled = TRAINING_MEAN + (values - values.mean()) * (TRAINING_STD / spread if spread > 0 else 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _luminance(pixels: np.ndarray) -> np.ndarray:
    """The BT.709 luminance of an H×W×C colour image (C ≥ 3; grey + alpha: the grey): uint8 for 8-bit
    colour, else float in the file's units."""
    if pixels.shape[2] < 3:
        return np.ascontiguousarray(pixels[..., 0])
    rgb = pixels[..., :3]
    if rgb.dtype == np.uint8:
        return np.rint(rgb2gray(rgb) * 255).astype(np.uint8)
    return rgb2gray(rgb.astype(np.float64))


def _tiff(path: Path) -> AbstractContextManager[tifffile.TiffFile]:
    """The TIFF file opened with tifffile (errors as :func:`cellseg.io.opened_image`'s)."""
    return opened_image(path, tifffile.TiffFile, (tifffile.TiffFileError,))


def _single_frame(path: Path, image: Image.Image) -> None:
    """Rule 1 for PIL's formats: refuse an animated file."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise DataError(f"{path}: {frames} frames; cellseg segments one 2-D image a file: save each frame apart")


def _tiff_layout(path: Path, tif: tifffile.TiffFile) -> tuple[tuple[int, int], str]:
    """(height, width) and axes of a single-image TIFF; rule 1 refuses the rest."""
    pages = len(tif.pages)
    if pages == 0 or not tif.series:
        raise DataError(f"{path}: not a readable image (a TIFF without an image in it)")
    if pages > 1 or len(tif.series) != 1:
        raise DataError(
            f"{path}: a multi-page TIFF ({pages} pages, {len(tif.series)} series); cellseg segments one 2-D image "
            "a file: split the stack first (Fiji: Image > Stacks > Stack to Images)"
        )
    series = tif.series[0]
    axes, shape = series.axes, series.shape
    sizes = dict(zip(axes, shape))
    if set(axes) - {"Y", "X", "S"} or "S" in axes and sizes["S"] not in (1, 2, 3, 4):
        raise DataError(f"{path}: a TIFF of axes {axes} and shape {shape}; cellseg reads a 2-D grey or colour image")
    return (sizes["Y"], sizes["X"]), axes


def _read_tiff(path: Path) -> np.ndarray:
    """A TIFF's pixels as H×W or H×W×S (samples last)."""
    with _tiff(path) as tif:
        _, axes = _tiff_layout(path, tif)
        pixels = tif.series[0].asarray()
    if "S" in axes:
        pixels = np.moveaxis(pixels, axes.index("S"), -1)
    return pixels


def _read_pil(path: Path) -> np.ndarray:
    """A PNG, JPEG or BMP's pixels as H×W (grey, any depth) or H×W×C (colour; palettes expanded)."""
    with opened_image(path) as image:
        _single_frame(path, image)
        image.load()
        if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
        elif image.mode == "1":
            image = image.convert("L")
        return np.asarray(image)
