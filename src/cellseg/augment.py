"""Augmentations by name (params ``unet.augment``, ``maskrcnn.augment``): albumentations transforms that move
the mask with nearest interpolation, so that target classes and instance labels stay exact."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import albumentations as A
import cv2



def _hflip() -> A.BasicTransform:
    return A.HorizontalFlip(p=0.5)


def _vflip() -> A.BasicTransform:
    return A.VerticalFlip(p=0.5)


def _rotate90() -> A.BasicTransform:
    return A.RandomRotate90(p=0.5)


def _transpose() -> A.BasicTransform:
    return A.Transpose(p=0.5)


def _brightness_contrast() -> A.BasicTransform:
    return A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)


def _gamma() -> A.BasicTransform:
    return A.RandomGamma(gamma_limit=(80, 120), p=0.5)


def _blur() -> A.BasicTransform:
    return A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.2), p=0.25)


def _noise() -> A.BasicTransform:
    return A.GaussNoise(std_range=(0.01, 0.05), p=0.25)


def _shift_scale_rotate() -> A.BasicTransform:
    return A.Affine(
        scale=(0.85, 1.15),
        translate_percent=(-0.0625, 0.0625),
        rotate=(-45, 45),
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_REFLECT_101,
        p=0.5,
    )


AUGMENTATIONS: dict[str, Callable[[], A.BasicTransform]] = {
    "hflip": _hflip,
    "vflip": _vflip,
    "rotate90": _rotate90,
    "transpose": _transpose,
    "brightness_contrast": _brightness_contrast,
    "gamma": _gamma,
    "blur": _blur,
    "noise": _noise,
    "shift_scale_rotate": _shift_scale_rotate,
}


# The augmentations that move pixels, and those of them that are symmetries of the pixel grid (they move a flow
# target's vectors exactly: :func:`cellseg.flows.turn_applied`).
MOVES_PIXELS = ("hflip", "vflip", "rotate90", "transpose", "shift_scale_rotate")
SYMMETRIC = ("hflip", "vflip", "rotate90", "transpose")


def build_augmentations(names: Sequence[str], seed: int | None = None) -> A.Compose:
    """Compose the named augmentations (:data:`AUGMENTATIONS`, in the order given); no names: identity.

    Geometric transforms move the mask with nearest interpolation, so that target classes stay exact; the
    output names the transforms applied (``applied_transforms``), which a flow target's vectors follow.
    """
    return A.Compose(
        [AUGMENTATIONS[n]() for n in names], mask_interpolation=cv2.INTER_NEAREST, seed=seed,
        save_applied_params=True,
    )
