"""Decode a category once, cache it as .npy, and build its validation split.

Cache key = (format version, dataset, absolute root, category, preprocessing,
val_fraction, seed, foreground mode). A category is written into a
temporary folder that is renamed into place when complete, so two processes preparing
the same category at once cannot expose a half-written cache (the loser of the rename
discards its copy; both copies are identical, being seeded). Every later call only
memory-maps the .npy files: no image is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from orchestrator.data.foreground import foreground_masks
from orchestrator.data.images import Preprocess, load_image, load_mask
from orchestrator.data.mvtec import CategoryFiles
from orchestrator.data.validation_defects import make_validation_anomalies
from orchestrator.errors import DatasetError
from orchestrator.files import publish_folder, write_file

log = logging.getLogger(__name__)

FORMAT = 3  # bump when what is cached (or how it is computed) changes; 3: validation defects of orchestrator/data/validation_defects.py
ARRAYS = ("train_images", "train_foreground", "val_images", "val_masks", "val_labels", "test_images", "test_masks", "test_labels")


@dataclass
class CategoryData:
    """One category, preprocessed, as (memory-mapped) numpy arrays; H = W = the
    preprocessing's output size. Convert images with :func:`orchestrator.data.images.to_unit_range`."""

    dataset: str
    category: str
    train_images: np.ndarray  # uint8 [N, 3, H, W] normal training images (validation normals removed)
    train_foreground: np.ndarray  # uint8 {0,1} [N, 1, H, W]
    val_images: np.ndarray  # uint8 [V, 3, H, W] held-out normals, then validation defects made from them
    val_masks: np.ndarray  # uint8 {0,1} [V, H, W]
    val_labels: np.ndarray  # int64 {0,1} [V]
    test_images: np.ndarray  # uint8 [M, 3, H, W]
    test_masks: np.ndarray  # uint8 {0,1} [M, H, W]
    test_labels: np.ndarray  # int64 {0,1} [M]
    test_defect_types: list[str]  # "good" or the defect folder name, per test image


@dataclass
class ValidationSplit:
    train_images: np.ndarray  # uint8 [N - n_val, 3, H, W] the normals left for training
    val_images: np.ndarray  # uint8 [2 n_val, 3, H, W] held-out normals, then their anomalous copies
    val_masks: np.ndarray  # uint8 {0,1} [2 n_val, H, W]
    val_labels: np.ndarray  # int64 {0,1} [2 n_val]
    val_source: np.ndarray  # int64 [n_val] index into the full training set of each held-out normal


def category_salt(category: str) -> int:
    """Stable per-category number, so categories sharing a seed get different draws."""
    return zlib.crc32(category.encode())


def cache_folder(cache_dir: str | Path, dataset: str, root: Path, category: str, preprocess: Preprocess,
                 val_fraction: float, seed: int, foreground: str) -> Path:
    """Where a category's arrays live for this key (see the module docstring)."""
    ident = json.dumps([FORMAT, dataset, str(Path(root).resolve()), category, preprocess.tag(), float(val_fraction), int(seed), foreground])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return Path(cache_dir) / "arrays" / dataset / category / f"{preprocess.tag()}-{digest}"


def atomic_save(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary file renamed into place."""
    write_file(path, lambda handle: np.save(handle, array))


def read_cached(folder: Path, dataset: str, category: str) -> CategoryData | None:
    """The cached category, or None when absent or unreadable (then it is rebuilt)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')} != {FORMAT}")
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        if len(meta["test_defect_types"]) != len(arrays["test_images"]):
            raise ValueError("test_defect_types does not match test_images")
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", folder, exc)
        return None
    return CategoryData(dataset, category, **arrays, test_defect_types=list(meta["test_defect_types"]))


def write_cache(folder: Path, arrays: dict[str, np.ndarray], defects: list[str]) -> None:
    """Publish every array and meta.json as ``folder`` at once; if another process got
    there first, keep theirs."""

    def fill(tmp: Path) -> None:
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name])
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "test_defect_types": defects}))

    publish_folder(folder, fill, is_complete=lambda f: read_cached(f, "", "") is not None)


def check_test_classes(defects: list[str], label: str) -> None:
    """The test metrics (image AUROC, pixel AUROC, AUPRO) need normal and anomalous test
    images: a test split of one class fails here, before any decoding or training."""
    anomalous = sum(d != "good" for d in defects)
    if 0 < anomalous < len(defects):
        return
    missing, fix = ("anomalous", "anomalous test images with their masks") if not anomalous else ("normal (good)", "good test images")
    raise DatasetError(f"{label}: the test split has {len(defects)} image(s) but no {missing} one; the test metrics (AUROC, AUPRO) "
                       f"need both classes: add {fix}, or leave the category out (categories=[...])")


@dataclass
class DecodedCategory:
    train_images: np.ndarray  # uint8 [N, 3, H, W]
    test_images: np.ndarray  # uint8 [M, 3, H, W]
    test_masks: np.ndarray  # uint8 {0,1} [M, H, W]
    test_labels: np.ndarray  # int64 {0,1} [M]
    test_defect_types: list[str]


def decode_category(files: CategoryFiles, preprocess: Preprocess, label: str) -> DecodedCategory:
    """Decode and preprocess every file of a category (the only image decoding)."""
    size = preprocess.output_size
    # The bars are closed (cleared) before an error propagates, so a corrupt file's
    # "error: ..." line starts its own line.
    with tqdm(files.train, desc=f"decode {label} train", leave=False) as bar:
        train = [load_image(path, preprocess)[0] for path in bar]
    test_images, test_masks = [], []
    with tqdm(files.test, desc=f"decode {label} test", leave=False) as bar:
        for item in bar:
            image, original = load_image(item.image, preprocess)
            test_images.append(image)
            # Good images have no mask file: their mask is all zeros.
            test_masks.append(np.zeros((size, size), np.uint8) if item.mask is None else load_mask(item.mask, preprocess, original, item.image))
    return DecodedCategory(
        train_images=np.stack(train),
        test_images=np.stack(test_images),
        test_masks=np.stack(test_masks),
        test_labels=np.array([int(item.defect != "good") for item in files.test], np.int64),
        test_defect_types=[item.defect for item in files.test],
    )


def validation_split(train_images: np.ndarray, val_fraction: float, seed: int, is_object: bool, label: str = "") -> ValidationSplit:
    """Hold out ``val_fraction`` of the normal training images (seeded, at least one) and
    add one anomaly made from each of them by a generator no method trains on
    (:mod:`orchestrator.data.validation_defects`). Takes only training images, so the
    validation split cannot depend on the test set."""
    n = len(train_images)
    if not 0 < val_fraction < 1:
        raise DatasetError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise DatasetError(f"{label}: {n} training image(s) and data.val_fraction={val_fraction} leave none for training; lower it or add images")
    order = np.random.default_rng([seed, category_salt(label)]).permutation(n)
    held, kept = np.sort(order[:n_val]), np.sort(order[n_val:])
    normals = np.ascontiguousarray(train_images[held])
    anomalous, masks, _ = make_validation_anomalies(normals, foreground_masks(normals, is_object), seed, category_salt(label))
    size = train_images.shape[-1]
    return ValidationSplit(
        train_images=np.ascontiguousarray(train_images[kept]),
        val_images=np.concatenate([normals, anomalous]),
        val_masks=np.concatenate([np.zeros((n_val, size, size), np.uint8), masks]),
        val_labels=np.array([0] * n_val + [1] * n_val, np.int64),
        val_source=held.astype(np.int64),
    )


def build_arrays(decoded: DecodedCategory, split: ValidationSplit, is_object: bool) -> dict[str, np.ndarray]:
    """The arrays :func:`write_cache` stores, named as in :class:`CategoryData`."""
    return {
        "train_images": split.train_images,
        "train_foreground": foreground_masks(split.train_images, is_object),
        "val_images": split.val_images,
        "val_masks": split.val_masks,
        "val_labels": split.val_labels,
        "test_images": decoded.test_images,
        "test_masks": decoded.test_masks,
        "test_labels": decoded.test_labels,
    }
