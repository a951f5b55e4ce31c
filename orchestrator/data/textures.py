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
from tqdm.auto import tqdm

from orchestrator.data.cache import atomic_save
from orchestrator.data.images import IMAGE_SUFFIXES, open_image
from orchestrator.errors import DatasetError

log = logging.getLogger(__name__)
FORMAT = 2  # bump when how the bank is built changes
MAX_TEXTURES = 256  # decoding all 5,640 DTD images would dominate a smoke run
# No photo the generality set is cut from (brick, grass, gravel): a method would otherwise
# train on that texture labelled anomalous (tests/test_generality.py compares by content).
OFFLINE_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel", "retina", "clock", "camera", "coins", "moon")


def _square(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(crop.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


def _offline(size: int) -> np.ndarray:
    from skimage import data as skdata  # imported here: ~1 s, needed only when building

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


def _from_files(files: list[Path], size: int) -> np.ndarray:
    """At most MAX_TEXTURES files, evenly spaced over the sorted list (DTD's folders are
    its classes, so this samples every class)."""
    picks = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, min(MAX_TEXTURES, len(files))).round().astype(int))]
    return np.stack([_square(np.asarray(open_image(p, "RGB")), size) for p in tqdm(picks, desc="decode textures", leave=False)])


def _source_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"data.textures folder {folder} does not exist; point it at a folder of images (e.g. DTD's images/) or drop it for offline sources")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"data.textures folder {folder} holds no images: expected {folder}/**/*.jpg (or .png/.bmp/.tif)")
    return files


def texture_bank(size: int, *, cache_dir: str | Path, source: str | Path | None = None) -> torch.Tensor:
    """Anomaly-appearance sources, [K, 3, size, size] float32 in [-1, 1] (centre-square
    crops resized to ``size``). ``source``: a folder searched recursively (e.g. DTD's
    images/), or None for the offline scikit-image photos. Decoded once, cached as .npy
    keyed by the source, its file list and ``size``."""
    if source:
        folder = Path(source).expanduser().resolve()
        files = _source_files(folder)
        # The file list (names and sizes) is part of the key: editing the folder rebuilds.
        ident = "|".join([str(folder), *(f"{p.relative_to(folder)}:{p.stat().st_size}" for p in files)])
    else:
        files, ident = [], "offline:" + ",".join(OFFLINE_SOURCES)
    key = hashlib.sha256(f"{ident}|{size}|{FORMAT}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / "textures" / f"{key}.npy"
    try:
        bank = np.load(path)
    except (OSError, ValueError):  # absent (or unreadable): build it
        bank = _from_files(files, size) if source else _offline(size)
        atomic_save(path, bank)
        log.info("texture bank: %d images at %d px -> %s", len(bank), size, path)
    return torch.from_numpy(bank).float().div_(127.5).sub_(1.0)
