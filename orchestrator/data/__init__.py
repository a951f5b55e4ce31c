"""Datasets: registry, preprocessing cache and validation split.

    list_categories(dataset, root, cache_dir=None)                          -> category names
    load_category(dataset, category, preprocess, root=..., cache_dir=...)   -> CategoryData
    texture_bank(size, cache_dir=..., source=None)                          -> anomaly-appearance images
    to_unit_range(uint8 images)                                             -> float32 tensor in [-1, 1]

Every dataset is an adapter onto the MVTec AD layout (orchestrator/data/mvtec.py,
orchestrator/data/registry.py). ``synthetic`` is generated into the cache on first use
and is the default. The first ``load_category`` of a key decodes the images and writes
.npy arrays; every later one only memory-maps them. Command line (list, verify, prepare,
make-synthetic): ``python -m orchestrator.data --help``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from orchestrator.data.cache import (CategoryData, build_arrays, cache_folder, check_test_classes, decode_category, read_cached,
                                     validation_split, write_cache)
from orchestrator.data.foreground import ForegroundMode
from orchestrator.data.images import Preprocess, to_unit_range
from orchestrator.errors import DatasetError
from orchestrator.data.registry import DATASETS, DatasetAdapter, get_adapter
from orchestrator.data.textures import texture_bank

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "CategoryData", "DataSpec", "DatasetAdapter", "ForegroundMode", "Preprocess", "list_categories",
           "load_category", "texture_bank", "to_unit_range"]


@dataclass(frozen=True)
class DataSpec:
    """Which data a model is trained and evaluated on: the dataset, where it is, and how
    it is split. Two equal specs read the same cached arrays."""

    dataset: str
    root: str | None  # None = the dataset's default (synthetic: generated under cache_dir)
    cache_dir: str
    val_fraction: float
    seed: int  # seeds the validation split
    foreground: str = "auto"  # auto | on | off
    textures: str | None = None  # folder of anomaly-appearance images; None = offline sources

    def categories(self) -> list[str]:
        return list_categories(self.dataset, self.root, self.cache_dir)

    def resolved_root(self) -> Path:
        """The dataset folder read (``root``, or the dataset's default; absolute)."""
        return get_adapter(self.dataset).resolve_root(self.root, self.cache_dir).resolve()

    def load(self, category: str, preprocess: Preprocess) -> CategoryData:
        return load_category(self.dataset, category, preprocess, root=self.root, cache_dir=self.cache_dir, val_fraction=self.val_fraction,
                             seed=self.seed, foreground=self.foreground, require_test_classes=True)

    def texture_bank(self, size: int):
        return texture_bank(size, cache_dir=self.cache_dir, source=self.textures)

    def split_sizes(self, categories: list[str] | tuple[str, ...]) -> dict[str, tuple[int, int]]:
        """category -> (training images, images an evaluation predicts on: validation normals
        and defects + test), counted from the file listing (nothing is decoded)."""
        adapter = get_adapter(self.dataset)
        root = adapter.resolve_root(self.root, self.cache_dir)
        sizes = {}
        for category in categories:
            try:
                files = adapter.scan(root, category)
            except DatasetError:  # reported with its fix when the sweep prepares the data; sizes only inform estimates
                sizes[category] = (0, 0)
                continue
            held = max(1, int(round(self.val_fraction * len(files.train))))
            sizes[category] = (max(0, len(files.train) - held), 2 * held + len(files.test))
        return sizes


def list_categories(dataset: str, root: str | Path | None, cache_dir: str | Path | None = None) -> list[str]:
    """Category names of ``dataset`` under ``root`` (None: the dataset's default; for
    ``synthetic`` that generates it under ``cache_dir``, or the default cache dir)."""
    adapter = get_adapter(dataset)
    return adapter.categories(adapter.resolve_root(root, cache_dir))


def load_category(dataset: str, category: str, preprocess: Preprocess, *, root: str | Path | None = None,
                  cache_dir: str | Path, val_fraction: float = 0.2, seed: int = 0, foreground: str = "auto",
                  require_test_classes: bool = False) -> CategoryData:
    """The preprocessed category with its validation split, decoded on the first call and
    read (memory-mapped) from the cache after.

    foreground: "auto" (the dataset's object categories get estimated foreground masks,
    textures all ones), "on" or "off" (force). The validation anomalies come from
    :mod:`orchestrator.data.validation_defects`, which uses no texture source.
    require_test_classes: raise DatasetError when the test split lacks normal or anomalous
    images (a sweep's test metrics need both; checked before decoding).
    """
    adapter = get_adapter(dataset)
    mode = ForegroundMode.parse(foreground)
    folder_root = adapter.resolve_root(root, cache_dir)
    folder = cache_folder(cache_dir, dataset, folder_root, category, preprocess, val_fraction, seed, mode.value)
    label = f"{dataset}/{category}"
    cached = read_cached(folder, dataset, category)
    if cached is not None:
        if require_test_classes:
            check_test_classes(cached.test_defect_types, label)
        return cached

    files = adapter.scan(folder_root, category)
    if require_test_classes:
        check_test_classes([item.defect for item in files.test], label)
    is_object = mode is ForegroundMode.ON or (mode is ForegroundMode.AUTO and not adapter.is_texture(category))
    log.info("preparing %s at %s: %d train, %d test images (cached in %s)", label, preprocess.tag(), len(files.train), len(files.test), folder)
    decoded = decode_category(files, preprocess, label)
    split = validation_split(decoded.train_images, val_fraction, seed, is_object, label)
    write_cache(folder, build_arrays(decoded, split, is_object), decoded.test_defect_types)
    result = read_cached(folder, dataset, category)
    assert result is not None, f"cache {folder} unreadable right after writing it"
    return result
