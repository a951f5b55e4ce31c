"""Foreground masks for anomaly synthesis on object categories (DiffusionAD §IV-D, MemSeg).

Objects are photographed on a fairly uniform background, so the foreground is estimated
per image as the pixels whose colour is far from the median border colour, cleaned by a
morphological closing and hole filling. Textures (and failed estimates) use all ones.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

THRESHOLD = 30.0  # colour distance (uint8 units) from the background colour
MIN_FRACTION = 0.02  # an estimate covering less than this is not trusted


def estimate_foreground(image: np.ndarray) -> np.ndarray:
    """uint8 [3, H, W] -> uint8 {0, 1} [1, H, W]."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[:, 0, :], pixels[:, -1, :], pixels[:, :, 0], pixels[:, :, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None]
    mask = np.linalg.norm(pixels - background, axis=0) > THRESHOLD
    mask = ndimage.binary_closing(mask, structure=np.ones((5, 5)), iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    if mask.mean() < MIN_FRACTION:
        mask = np.ones_like(mask)
    return mask[None].astype(np.uint8)


def foreground_masks(images: np.ndarray, is_object: bool) -> np.ndarray:
    """uint8 [N, 1, H, W]: estimated for objects, all ones for textures."""
    if not is_object:
        return np.ones((images.shape[0], 1, *images.shape[2:]), np.uint8)
    return np.stack([estimate_foreground(i) for i in images]) if len(images) else np.zeros((0, 1, *images.shape[2:]), np.uint8)
