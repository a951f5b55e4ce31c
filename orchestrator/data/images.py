"""Decoding and preprocessing of image and mask files (the only image-file reads of a category)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from orchestrator.errors import ConfigError, DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing as the papers do it: resize, optional centre crop (then [-1, 1] via
    :func:`to_unit_range` at batch time, so the cache stores compact uint8)."""

    image_size: int  # resize to image_size x image_size (bilinear images, nearest masks)
    crop_size: int | None = None  # optional centre crop after the resize

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"image_size must be >= 8, got {self.image_size}")
        if self.crop_size is not None and not 0 < self.crop_size <= self.image_size:
            raise ConfigError(f"crop_size must be in (0, image_size={self.image_size}] or null, got {self.crop_size}")

    @property
    def output_size(self) -> int:
        """H = W of the preprocessed arrays."""
        return self.crop_size or self.image_size

    def tag(self) -> str:
        """Short human-readable name used in cache folder names, e.g. ``r256c224``."""
        return f"r{self.image_size}" + (f"c{self.crop_size}" if self.crop_size else "")


def open_image(path: Path, mode: str) -> Image.Image:
    """Decode fully (``load()``), so a truncated file fails here and names the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except FileNotFoundError:
        raise DatasetError(f"missing image file {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"corrupt or truncated image {path} ({exc}); re-extract or replace that file") from None


def centre_crop(array: np.ndarray, size: int) -> np.ndarray:
    """Central ``size`` x ``size`` window of an [H, W, ...] array."""
    h, w = array.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return array[top : top + size, left : left + size]


def load_image(path: Path, preprocess: Preprocess) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [3, S, S] and the file's original (width, height)."""
    image = open_image(path, "RGB")
    original = image.size
    array = np.asarray(image.resize((preprocess.image_size, preprocess.image_size), Image.BILINEAR))
    if preprocess.crop_size:
        array = centre_crop(array, preprocess.crop_size)
    return np.ascontiguousarray(array.transpose(2, 0, 1)), original


def load_mask(path: Path, preprocess: Preprocess, image_size: tuple[int, int], image_path: Path) -> np.ndarray:
    """uint8 {0, 1} [S, S]; any non-zero pixel is anomalous (MVTec masks are 0/255, but
    resaved or antialiased masks hold other values). ``image_size`` is the (width, height)
    of ``image_path``, the image the mask belongs to: the two must match."""
    mask = open_image(path, "L")
    if mask.size != image_size:
        raise DatasetError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]}; a mask must have its image's size"
        )
    # Binarise before the resize so nearest-neighbour sampling cannot drop faint values.
    binary = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8))
    array = np.asarray(binary.resize((preprocess.image_size, preprocess.image_size), Image.NEAREST))
    if preprocess.crop_size:
        array = centre_crop(array, preprocess.crop_size)
    return np.ascontiguousarray(array, dtype=np.uint8)


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W] (numpy, memory-mapped numpy or torch) -> float32 tensor in [-1, 1]."""
    if isinstance(images, torch.Tensor) and images.device.type != "cpu":
        return images.float().div_(127.5).sub_(1.0)
    # numpy does the arithmetic: on a busy 2-core machine torch's multi-threaded
    # elementwise ops measured ~10x slower than numpy's single-threaded loop.
    # np.asarray(..., float32) copies, so read-only memory maps are fine (no torch warning).
    array = np.asarray(images.numpy() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
    np.divide(array, 127.5, out=array)
    np.subtract(array, 1.0, out=array)
    return torch.from_numpy(array)
