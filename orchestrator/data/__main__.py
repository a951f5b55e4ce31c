"""Dataset command line: list, verify and prepare datasets; write the synthetic one.

    python -m orchestrator.data list                                       # the datasets
    python -m orchestrator.data list dataset=visa data.root=/data/visa     # its categories, with counts
    python -m orchestrator.data verify dataset=btad data.root=/data/btad [categories=[01,02]]
    python -m orchestrator.data prepare dataset=mvtec_ad data.root=/data/mvtec image_size=256 crop_size=224
    python -m orchestrator.data prepare dataset=mvtec_ad data.root=/data/mvtec method=diffusionad scale=paper
    python -m orchestrator.data make-synthetic [out=/some/folder]

Keys are the sweep's (``dataset=``, ``data.root=``, ``data.cache_dir=``,
``data.val_fraction=``, ``data.foreground=``, ``data.textures=``, ``categories=[a,b]``,
``seed=``, ``method=``, ``scale=``, ``method.<field>=``) plus ``image_size=`` /
``crop_size=`` (prepare; without them the preprocessing of ``method`` at ``scale``,
default paper, is used) and ``out=`` (make-synthetic). ``prepare`` builds exactly the
cache a sweep with the same keys reads. ``verify`` decodes every file and checks every
anomalous test image has a mask of its size; it exits with status 2 and one line naming
the first problem.
"""

from __future__ import annotations

import dataclasses

import logging
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orchestrator.config import Settings, build_settings, parse_overrides, resolve_method_config
from orchestrator.errors import ConfigError, DatasetError, UserError

COMMANDS = ("list", "verify", "prepare", "make-synthetic")
EXTRA_KEYS = ("image_size", "crop_size", "out")  # keys of this CLI only (not Settings)


def parse(tokens: list[str]) -> tuple[Settings, dict[str, Any], dict[str, Any], set[str]]:
    """(settings, method field overrides, this CLI's extra keys, the settings keys given)."""
    values, method = parse_overrides(tokens)
    extra = {key: values.pop(key) for key in EXTRA_KEYS if key in values}
    values.pop("help", None)
    return build_settings(values), method, extra, set(values)


def chosen_categories(settings: Settings) -> tuple[Any, Path, list[str]]:
    """(adapter, resolved root, categories: those asked for, else all found)."""
    from orchestrator.data import get_adapter

    adapter = get_adapter(settings.dataset)
    root = adapter.resolve_root(settings.data.root, settings.data.cache_dir)
    found = adapter.categories(root)
    if not settings.categories:
        return adapter, root, found
    unknown = [c for c in settings.categories if c not in found]
    if unknown:
        raise ConfigError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in {settings.dataset} at {root}; valid: {', '.join(found)}")
    return adapter, root, list(settings.categories)


def counts(files) -> tuple[int, int, int, Counter]:
    """(train, test good, test anomalous, test images per defect type)."""
    defects = Counter(item.defect for item in files.test)
    good = defects.get("good", 0)
    return len(files.train), good, len(files.test) - good, defects


# ---------------------------------------------------------------------------- list


def cmd_list(settings: Settings, given: set[str]) -> None:
    from orchestrator.data import DATASETS

    if not given & {"dataset", "data.root"}:
        print("datasets: " + ", ".join(DATASETS))
        print("categories and counts: python -m orchestrator.data list dataset=<name> data.root=<folder>")
        return
    adapter, root, categories = chosen_categories(settings)
    print(f"{settings.dataset} at {root}: {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}")
    print(f"  {'category':<16} {'train':>7} {'test good':>10} {'test anomalous':>15}  texture")
    for category in categories:
        train, good, bad, _ = counts(adapter.scan(root, category))
        print(f"  {category:<16} {train:>7} {good:>10} {bad:>15}  {'yes' if adapter.is_texture(category) else 'no'}")


# ---------------------------------------------------------------------------- verify


def image_size(path: Path) -> tuple[int, int]:
    """Decode ``path`` fully (a truncated file fails here, naming it); its (width, height)."""
    from orchestrator.data.images import open_image

    return open_image(path, "L").size


def check_mask(pair: tuple[Path, Path]) -> tuple[int, int]:
    """Check a mask against its image; (width, height)."""
    image, mask = pair
    size, mask_size = image_size(image), image_size(mask)
    if mask_size != size:
        raise DatasetError(f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is {size[0]}x{size[1]}; "
                           f"a mask must have its image's size")
    return size


def verify_category(adapter: Any, root: Path, category: str, workers: int) -> tuple[Any, int]:
    """Every file of ``category`` decoded, every mask matched to its image; (files, files opened)."""
    from tqdm.auto import tqdm

    from orchestrator.data.cache import check_test_classes

    files = adapter.scan(root, category)
    check_test_classes([item.defect for item in files.test], f"{adapter.name}/{category}")
    singles = list(files.train) + [item.image for item in files.test if item.mask is None]
    pairs = [(item.image, item.mask) for item in files.test if item.mask is not None]
    total = len(singles) + len(pairs)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=total, desc=f"verify {category}", leave=False, unit="img", disable=None) as bar:
        # map() yields in order, so the first failing file (in listing order) is the one reported.
        for _ in pool.map(image_size, singles):
            bar.update()
        for _ in pool.map(check_mask, pairs):
            bar.update()
    return files, len(singles) + 2 * len(pairs)


def cmd_verify(settings: Settings) -> None:
    adapter, root, categories = chosen_categories(settings)
    workers = min(8, os.cpu_count() or 1)  # PIL decodes outside the GIL
    opened = 0
    for category in categories:
        files, n = verify_category(adapter, root, category, workers)
        opened += n
        train, good, bad, defects = counts(files)
        types = ", ".join(f"{d} {c}" for d, c in sorted(defects.items()) if d != "good")
        print(f"{settings.dataset}/{category}: train {train} | test good {good} | test anomalous {bad} ({types}): ok")
    print(f"verified {len(categories)} categor{'y' if len(categories) == 1 else 'ies'} of {settings.dataset} at {root}: "
          f"{opened} files decoded, every anomalous test image has a mask of its size")


# ---------------------------------------------------------------------------- prepare


def preprocess_for(settings: Settings, method: dict[str, Any], extra: dict[str, Any]):
    from orchestrator.data import Preprocess

    if "image_size" in extra or "crop_size" in extra:
        if "image_size" not in extra:
            raise ConfigError("crop_size= needs image_size= too (e.g. image_size=256 crop_size=224)")
        try:
            image = int(extra["image_size"])
            crop = None if extra.get("crop_size") in (None, "null", "none", "None") else int(extra["crop_size"])
        except (TypeError, ValueError):
            raise ConfigError(f"image_size and crop_size must be integers, got {extra.get('image_size')!r}, {extra.get('crop_size')!r}") from None
        return Preprocess(image, crop)
    config = resolve_method_config(settings.method, settings.scale or "paper", method)
    return Preprocess(config.image_size, config.crop_size)


def cmd_prepare(settings: Settings, method: dict[str, Any], extra: dict[str, Any]) -> None:
    from tqdm.auto import tqdm

    from orchestrator.data.cache import cache_folder

    preprocess = preprocess_for(settings, method, extra)
    adapter, root, categories = chosen_categories(settings)
    data = settings.data
    spec = dataclasses.replace(settings.data_spec(), root=str(root))
    for category in tqdm(categories, desc=f"prepare {settings.dataset} {preprocess.tag()}", unit="category", disable=None):
        loaded = spec.load(category, preprocess)
        folder = cache_folder(data.cache_dir, settings.dataset, root, category, preprocess, data.val_fraction, settings.seed,
                              data.foreground)
        tqdm.write(f"{settings.dataset}/{category} at {preprocess.tag()}: train {len(loaded.train_images)}, val {len(loaded.val_images)}, "
                   f"test {len(loaded.test_images)} -> {folder}")
    print(f"prepared {len(categories)} categor{'y' if len(categories) == 1 else 'ies'} in {Path(data.cache_dir) / 'arrays' / settings.dataset}")


# ---------------------------------------------------------------------------- make-synthetic


def cmd_make_synthetic(settings: Settings, extra: dict[str, Any]) -> None:
    from orchestrator.data import synthetic

    out = Path(str(extra["out"])).expanduser() if extra.get("out") else synthetic.dataset_root(Path(settings.data.cache_dir).expanduser())
    root = synthetic.generate(out)
    print(f"synthetic dataset ({', '.join(synthetic.CATEGORIES)}) in {root}; use it with dataset=synthetic data.root={root}")


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if args else 2
    command, tokens = args[0], args[1:]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if command not in COMMANDS:
            raise ConfigError(f"unknown command {command!r}; valid: {', '.join(COMMANDS)} (python -m orchestrator.data --help)")
        settings, method, extra, given = parse(tokens)
        unused = set(extra) - {"prepare": {"image_size", "crop_size"}, "make-synthetic": {"out"}}.get(command, set())
        if unused:
            raise ConfigError(f"{', '.join(sorted(unused))}= is not used by {command}: image_size=/crop_size= are for prepare, out= for make-synthetic")
        if command == "list":
            cmd_list(settings, given)
        elif command == "verify":
            cmd_verify(settings)
        elif command == "prepare":
            cmd_prepare(settings, method, extra)
        else:
            cmd_make_synthetic(settings, extra)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
