"""Dataset registry and the cached, preprocessed view every trial uses.

    list_categories(dataset, root)                  -> category names
    load_category(dataset, category, preprocess, root=..., cache_dir=...) -> CategoryData
    texture_bank(size, cache_dir=..., source=None)  -> anomaly-appearance images

Datasets are adapters onto the MVTec AD layout (orchestrator/data/layout.py). The
``synthetic`` dataset is generated into the cache on first use and is the default.
"""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.data import synthetic
from orchestrator.data.cache import CategoryData, build, cache_folder, read_cached, write_cache
from orchestrator.data.images import Preprocess, to_unit_range
from orchestrator.data.layout import MVTecLayout
from orchestrator.data.textures import texture_bank
from orchestrator.errors import DatasetError

log = logging.getLogger(__name__)

DATASETS = {
    "mvtec_ad": MVTecLayout("mvtec_ad"),
    "mpdd": MVTecLayout("mpdd", textures=frozenset()),
    "synthetic": MVTecLayout("synthetic", textures=synthetic.TEXTURES),
}

__all__ = ["DATASETS", "CategoryData", "Preprocess", "list_categories", "load_category", "texture_bank", "to_unit_range"]


def adapter(dataset: str):
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[dataset]


def resolve_root(dataset: str, root: str | Path | None, cache_dir: str | Path | None = None, seed: int = 0) -> Path | None:
    """The folder to read; the synthetic dataset is generated on first use when no root is given."""
    if root is not None:
        return Path(root).expanduser()
    if dataset == "synthetic":
        from orchestrator.config import default_cache_dir

        return synthetic.generate(synthetic.dataset_root(Path(cache_dir or default_cache_dir()), seed=0), seed=0)
    return None


def list_categories(dataset: str, root: str | Path | None, cache_dir: str | Path | None = None) -> list[str]:
    return adapter(dataset).categories(resolve_root(dataset, root, cache_dir))


def load_category(dataset: str, category: str, preprocess: Preprocess, *, root: str | Path | None = None,
                  cache_dir: str | Path, val_fraction: float = 0.2, seed: int = 0, foreground: str = "auto",
                  textures: str | Path | None = None) -> CategoryData:
    """The preprocessed category, decoded on the first call and read from the cache after.
    ``textures`` is the anomaly-appearance source of the validation anomalies (None = offline)."""
    layout = adapter(dataset)
    folder_root = resolve_root(dataset, root, cache_dir)
    folder = cache_folder(Path(cache_dir), dataset, folder_root, category, preprocess, val_fraction, seed, foreground, textures)
    cached = read_cached(folder, dataset, category)
    if cached is not None:
        return cached
    files = layout.scan(folder_root, category)
    is_object = {"auto": not layout.is_texture(category), "on": True, "off": False}[foreground]
    bank = texture_bank(preprocess.output_size, cache_dir=cache_dir, source=textures)
    log.info("preparing %s/%s at %s (cached in %s)", dataset, category, preprocess.tag(), folder)
    arrays = build(files, preprocess, is_object, val_fraction, seed, bank, f"{dataset}/{category}")
    write_cache(folder, arrays, [item.defect for item in files.test])
    return read_cached(folder, dataset, category)
