"""Decoding and preprocessing of image and mask files (the only PNG/BMP reads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from orchestrator.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Preprocess:
    image_size: int  # resize to image_size x image_size (bilinear images, nearest masks)
    crop_size: int | None = None  # optional centre crop after the resize

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise DatasetError(f"image_size must be >= 8, got {self.image_size}")
        if self.crop_size is not None and not 0 < self.crop_size <= self.image_size:
            raise DatasetError(f"crop_size must be in (0, image_size={self.image_size}], got {self.crop_size}")

    @property
    def output_size(self) -> int:
        return self.crop_size or self.image_size

    def tag(self) -> str:
        return f"r{self.image_size}" + (f"c{self.crop_size}" if self.crop_size else "")


def open_image(path: Path, mode: str) -> Image.Image:
    """Decode fully (so truncated files fail here, naming the file)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except FileNotFoundError:
        raise DatasetError(f"missing image file {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"corrupt or truncated image {path}: {exc}; re-extract or delete that file") from None


def _centre_crop(array: np.ndarray, size: int) -> np.ndarray:
    h, w = array.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return array[top : top + size, left : left + size]


def load_image(path: Path, preprocess: Preprocess) -> np.ndarray:
    """uint8 [3, S, S]."""
    image = open_image(path, "RGB").resize((preprocess.image_size, preprocess.image_size), Image.BILINEAR)
    array = np.asarray(image)
    if preprocess.crop_size:
        array = _centre_crop(array, preprocess.crop_size)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_mask(path: Path, preprocess: Preprocess, image_shape: tuple[int, int]) -> np.ndarray:
    """uint8 {0, 1} [S, S]; any non-zero pixel is anomalous. ``image_shape`` is the
    original (width, height) of the image the mask belongs to."""
    mask = open_image(path, "L")
    if mask.size != image_shape:
        raise DatasetError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is {image_shape[0]}x{image_shape[1]}; masks must match their image size")
    array = np.asarray(mask.resize((preprocess.image_size, preprocess.image_size), Image.NEAREST)) > 0
    if preprocess.crop_size:
        array = _centre_crop(array, preprocess.crop_size)
    return array.astype(np.uint8)


def image_size_of(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"corrupt or truncated image {path}: {exc}") from None


def to_unit_range(images: np.ndarray):
    """uint8 [..., H, W] (numpy or torch) -> float32 torch tensor in [-1, 1]."""
    import torch

    tensor = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return tensor.float().div_(127.5).sub_(1.0)
