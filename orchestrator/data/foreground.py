"""Foreground masks: where synthetic anomalies may be placed on object categories
(DiffusionAD §IV-D and MemSeg restrict them to the object; textures use the whole image).

Objects are photographed on a fairly uniform background, so the foreground is estimated
per image, from the image alone: pixels whose colour is far from the median border colour,
cleaned by a morphological closing and hole filling. An estimate covering almost nothing
(e.g. an object that fills the frame, so the border is object too) falls back to all ones.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from scipy import ndimage

from orchestrator.errors import ConfigError

THRESHOLD = 30.0  # colour distance (uint8 units, Euclidean over RGB) from the background colour
MIN_FRACTION = 0.02  # an estimate covering less than this share of the image is not trusted


class ForegroundMode(str, Enum):
    AUTO = "auto"  # estimate for the dataset's object categories, all ones for its textures
    ON = "on"  # estimate for every category
    OFF = "off"  # all ones for every category

    @classmethod
    def parse(cls, value: str | ForegroundMode) -> ForegroundMode:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown data.foreground {value!r}; valid: {', '.join(m.value for m in cls)}") from None


def estimate_foreground(image: np.ndarray) -> np.ndarray:
    """uint8 [3, H, W] -> uint8 {0, 1} [1, H, W]."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[:, 0, :], pixels[:, -1, :], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None]
    mask = np.linalg.norm(pixels - background, axis=0) > THRESHOLD
    # Closing joins an object's pieces split by dark/specular parts; filling removes holes
    # left where the object's colour resembles the background.
    mask = ndimage.binary_closing(mask, structure=np.ones((5, 5)), iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    if mask.mean() < MIN_FRACTION:
        mask = np.ones_like(mask)
    return mask[None].astype(np.uint8)


def foreground_masks(images: np.ndarray, is_object: bool) -> np.ndarray:
    """uint8 {0, 1} [N, 1, H, W] for uint8 images [N, 3, H, W]: estimated per image for
    objects, all ones for textures."""
    if not is_object or len(images) == 0:
        return np.ones((images.shape[0], 1, *images.shape[2:]), np.uint8)
    return np.stack([estimate_foreground(image) for image in images])
