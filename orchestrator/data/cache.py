"""Decode a category once, cache it as .npy, and build its validation split.

Cache key = (dataset, absolute root, category, preprocessing, val_fraction, seed,
foreground mode, format version). Arrays are written to a temporary file and renamed,
so concurrent preparers never expose half a file; the second call of a trial only
memory-maps .npy files and never decodes an image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from orchestrator.data.images import Preprocess, image_size_of, load_image, load_mask, to_unit_range

log = logging.getLogger(__name__)
FORMAT = 1
# Validation anomalies: visible but not always opaque (a stand-in for real defects that
# are sometimes subtle); Perlin settings as in training.
VAL_OPACITY = (0.5, 1.0)
ARRAYS = ("train_images", "train_foreground", "val_images", "val_masks", "val_labels", "test_images", "test_masks", "test_labels")


@dataclass
class CategoryData:
    dataset: str
    category: str
    train_images: np.ndarray  # uint8 [N, 3, H, W] normal training images (validation normals removed)
    train_foreground: np.ndarray  # uint8 {0,1} [N, 1, H, W]
    val_images: np.ndarray  # uint8 [V, 3, H, W] held-out normals + synthetic anomalies made from them
    val_masks: np.ndarray  # uint8 {0,1} [V, H, W]
    val_labels: np.ndarray  # int64 {0,1} [V]
    test_images: np.ndarray  # uint8 [M, 3, H, W]
    test_masks: np.ndarray  # uint8 {0,1} [M, H, W]
    test_labels: np.ndarray  # int64 {0,1} [M]
    test_defect_types: list[str]  # "good" or the defect folder name, per test image


def atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npy", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def cache_folder(cache_dir: Path, dataset: str, root: Path | None, category: str, preprocess: Preprocess,
                 val_fraction: float, seed: int, foreground: str, textures: str | Path | None = None) -> Path:
    source = str(Path(textures).expanduser().resolve()) if textures else None
    ident = json.dumps([FORMAT, dataset, str(root.resolve()) if root else None, category, preprocess.tag(), val_fraction, seed, foreground, source])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return Path(cache_dir) / "arrays" / dataset / category / f"{preprocess.tag()}-{digest}"


def read_cached(folder: Path, dataset: str, category: str) -> CategoryData | None:
    meta = folder / "meta.json"
    if not meta.exists():
        return None
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    defects = json.loads(meta.read_text())["test_defect_types"]
    return CategoryData(dataset, category, **arrays, test_defect_types=defects)


def build(files, preprocess: Preprocess, is_object: bool, val_fraction: float, seed: int, textures: torch.Tensor, label: str) -> dict:
    """Decode every file of a category and make its validation split."""
    from orchestrator.data.foreground import foreground_masks

    train = np.stack([load_image(p, preprocess) for p in tqdm(files.train, desc=f"decode {label} train", leave=False)])
    test_images, test_masks = [], []
    size = preprocess.output_size
    for item in tqdm(files.test, desc=f"decode {label} test", leave=False):
        test_images.append(load_image(item.image, preprocess))
        if item.mask is None:
            test_masks.append(np.zeros((size, size), np.uint8))
        else:
            test_masks.append(load_mask(item.mask, preprocess, image_size_of(item.image)))
    labels = np.array([0 if item.defect == "good" else 1 for item in files.test], np.int64)

    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(round(val_fraction * len(train)))) if val_fraction > 0 else 0
    if n_val >= len(train):
        from orchestrator.errors import DatasetError

        raise DatasetError(f"{label}: only {len(train)} training images; data.val_fraction={val_fraction} leaves none for training")
    val_normal, train_kept = train[np.sort(order[:n_val])], train[np.sort(order[n_val:])]
    val_fg = foreground_masks(val_normal, is_object)
    anomalous, masks = synthesize_validation_anomalies(val_normal, val_fg, textures, seed)
    return {
        "train_images": train_kept,
        "train_foreground": foreground_masks(train_kept, is_object),
        "val_images": np.concatenate([val_normal, anomalous]),
        "val_masks": np.concatenate([np.zeros((n_val, size, size), np.uint8), masks]),
        "val_labels": np.array([0] * n_val + [1] * n_val, np.int64),
        "test_images": np.stack(test_images),
        "test_masks": np.stack(test_masks),
        "test_labels": labels,
    }


def synthesize_validation_anomalies(normals: np.ndarray, foreground: np.ndarray, textures: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic anomaly per held-out normal (methods.anomaly_synthesis, seeded);
    samples whose mask came out empty are drawn again."""
    from methods.anomaly_synthesis import synthesize_anomalies

    generator = torch.Generator().manual_seed(seed + 7919)
    images = to_unit_range(normals)
    fg = torch.from_numpy(np.ascontiguousarray(foreground)).float()
    out_images = torch.empty_like(images)
    out_masks = torch.zeros(len(images), 1, *images.shape[-2:])
    todo = torch.arange(len(images))
    for _ in range(100):
        pick = torch.randint(0, len(textures), (len(todo),), generator=generator)
        result = synthesize_anomalies(images[todo], textures[pick], fg[todo], generator, opacity=VAL_OPACITY)
        ok = result.masks.flatten(1).sum(1) >= 16  # at least a few pixels
        out_images[todo[ok]], out_masks[todo[ok]] = result.images[ok], result.masks[ok]
        todo = todo[~ok]
        if len(todo) == 0:
            break
    else:  # pathological foreground: fall back to the whole image as the allowed region
        result = synthesize_anomalies(images[todo], textures[: len(todo)], torch.ones_like(fg[todo]), generator, opacity=VAL_OPACITY)
        out_images[todo], out_masks[todo] = result.images, result.masks
    uint8 = ((out_images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return uint8, (out_masks[:, 0] > 0.5).numpy().astype(np.uint8)


def write_cache(folder: Path, arrays: dict, defects: list[str]) -> None:
    for name in ARRAYS:
        atomic_save(folder / f"{name}.npy", arrays[name])
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as handle:
        json.dump({"test_defect_types": defects, "format": FORMAT}, handle)
    os.replace(tmp, folder / "meta.json")  # written last: its presence marks a complete cache
