"""Anomaly-appearance sources (the "A" of DRAEM/MemSeg/DiffusionAD synthesis).

With ``data.textures=<folder>`` (e.g. DTD's ``images/`` tree) up to ``MAX_TEXTURES``
images are read from it (recursively, sorted, evenly spaced). Without it, offline
sources are used: scikit-image's bundled colour photographs and texture photographs
that none of the synthetic categories is made from, in several crops each.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from orchestrator.data.cache import atomic_save
from orchestrator.data.images import IMAGE_SUFFIXES, open_image
from orchestrator.errors import DatasetError

log = logging.getLogger(__name__)
MAX_TEXTURES = 256
OFFLINE_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel", "retina", "grass", "camera", "coins", "moon")


def _square(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(crop.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


def _offline(size: int) -> np.ndarray:
    out = []
    for name in OFFLINE_SOURCES:
        photo = getattr(skdata, name)()
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        photo = photo[..., :3]
        h, w = photo.shape[:2]
        side = min(h, w) // 2
        # Four quadrant crops and the full frame: more variety than one image per source.
        crops = [photo[y : y + side, x : x + side] for y in (0, h - side) for x in (0, w - side)] + [photo]
        out += [_square(np.ascontiguousarray(c), size) for c in crops]
    return np.stack(out)


def _from_folder(folder: Path, size: int) -> np.ndarray:
    if not folder.is_dir():
        raise DatasetError(f"data.textures folder {folder} does not exist; point it at a folder of images (e.g. DTD's images/) or drop it for offline sources")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"data.textures folder {folder} holds no images (.png/.jpg/.bmp)")
    picks = [files[i] for i in np.linspace(0, len(files) - 1, min(MAX_TEXTURES, len(files))).round().astype(int)]
    return np.stack([_square(np.asarray(open_image(p, "RGB")), size) for p in picks])


def texture_bank(size: int, *, cache_dir: str | Path, source: str | Path | None = None) -> torch.Tensor:
    """[K, 3, size, size] float in [-1, 1], cached as .npy."""
    source_id = str(Path(source).expanduser().resolve()) if source else "offline"
    key = hashlib.sha256(f"{source_id}|{size}|v1".encode()).hexdigest()[:16]
    path = Path(cache_dir) / "textures" / f"{key}.npy"
    if path.exists():
        bank = np.load(path)
    else:
        bank = _from_folder(Path(source_id), size) if source else _offline(size)
        atomic_save(path, bank)
        log.info("texture bank: %d images at %d px -> %s", len(bank), size, path)
    return torch.from_numpy(bank).float().div_(127.5).sub_(1.0)
