"""MVTec AD layout, the lingua franca every dataset adapter maps onto.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect or good>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

An adapter only lists files (:class:`CategoryFiles`); decoding, preprocessing and caching
are shared (orchestrator/data/cache.py). A dataset in another layout (VisA's split CSV,
DAGM's label folders) is a new module with a class offering the same four methods as
:class:`MVTecLayout`, registered in orchestrator/data/registry.py. Trees that differ only
in folder names (BTAD's ``ok``/``ko``, masks named ``<stem>.png``) reuse
:class:`MVTecLayout` with other field values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.data.images import IMAGE_SUFFIXES
from orchestrator.errors import DatasetError

MVTEC_LAYOUT = "<root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png, <root>/<category>/ground_truth/<defect>/<stem>_mask.png"
MVTEC_AD_TEXTURES = frozenset({"carpet", "grid", "leather", "tile", "wood"})


@dataclass(frozen=True)
class TestItem:
    __test__ = False  # not a pytest test class, despite the name

    image: Path
    defect: str  # "good" or the defect type
    mask: Path | None  # None for good images (all-zero mask)


@dataclass(frozen=True)
class CategoryFiles:
    train: tuple[Path, ...]  # normal training images
    test: tuple[TestItem, ...]


def images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted (hidden files skipped)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def natural_key(name: str) -> list:
    """Sort key putting ``Class2`` before ``Class10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def require_root(name: str, root: str | Path | None, layout: str) -> Path:
    """``data.root`` as a Path, checked to be a folder (real datasets have no default)."""
    if root is None:
        raise DatasetError(f"dataset {name} needs data.root=<folder> laid out as {layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder; expected {layout}")
    return root


class MaskIndex:
    """The image files of a mask folder by lower-case stem, so a mask is found whatever its
    extension or case (``000_mask.png``, ``000.png``, ``000.bmp``, ``0577_label.PNG``)."""

    def __init__(self, folder: Path):
        self.files = {p.stem.lower(): p for p in images_in(folder)} if folder.is_dir() else {}

    def find(self, stem: str, suffixes: tuple[str, ...]) -> Path | None:
        for suffix in suffixes:
            path = self.files.get(f"{stem}{suffix}".lower())
            if path is not None:
                return path
        return None


def child(folder: Path, name: str) -> Path:
    """``folder/name``, matching the name case-insensitively when that exact one is absent
    (``Train`` vs ``train``); the exact path when nothing matches (for error messages)."""
    exact = folder / name
    if exact.exists() or not folder.is_dir():
        return exact
    for p in folder.iterdir():
        if p.name.lower() == name.lower():
            return p
    return exact


@dataclass(frozen=True)
class MVTecLayout:
    """MVTec AD, and any tree in the same layout (MPDD ships in it too; BTAD and converted
    VisA trees differ only in the normal folder's name and the mask names)."""

    name: str = "mvtec_ad"
    textures: frozenset[str] = field(default=MVTEC_AD_TEXTURES)  # categories without a foreground/background split
    good: str = "good"  # name of the normal folders (train/<good>, test/<good>); their defect type is "good"
    mask_suffix: str = "_mask"  # ground_truth/<defect>/<stem><mask_suffix>.png; <stem>[_mask].<any image ext> is accepted too
    layout: str = MVTEC_LAYOUT  # shown in error messages

    def resolve_root(self, root: str | Path | None, cache_dir: str | Path | None) -> Path:
        """The folder to read (``data.root``); real datasets have no default."""
        return require_root(self.name, root, self.layout)

    def categories(self, root: Path) -> list[str]:
        found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())
        if not found:
            hint = f"; {root} looks like one category: set data.root={root.parent}" if (root / "train").is_dir() else ""
            raise DatasetError(f"no categories under {root}: expected {self.layout}{hint}")
        return found

    def is_texture(self, category: str) -> bool:
        return category in self.textures

    def scan(self, root: Path, category: str) -> CategoryFiles:
        folder = root / category
        if not folder.is_dir():
            raise DatasetError(f"category {category!r} not found under {root}; found: {', '.join(self.categories(root))}")
        good = folder / "train" / self.good
        if not good.is_dir():
            raise DatasetError(f"{good} is missing: expected {self.layout}")
        train = images_in(good)
        if not train:
            raise DatasetError(f"{good} holds no images: expected {good}/*.png (or .jpg/.bmp/.tif)")
        test_root = folder / "test"
        if not test_root.is_dir():
            raise DatasetError(f"{test_root} is missing: expected {self.layout}")
        items = []
        for defect_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            defect = "good" if defect_dir.name == self.good else defect_dir.name
            masks = None
            for image in images_in(defect_dir):
                if defect == "good":
                    items.append(TestItem(image, "good", None))
                    continue
                masks = masks or MaskIndex(folder / "ground_truth" / defect_dir.name)
                mask = masks.find(image.stem, tuple(dict.fromkeys((self.mask_suffix, "", "_mask"))))
                if mask is None:
                    expected = folder / "ground_truth" / defect_dir.name / f"{image.stem}{self.mask_suffix}.png"
                    raise DatasetError(f"anomalous test image {image} has no mask: expected {expected}")
                items.append(TestItem(image, defect, mask))
        if not items:
            raise DatasetError(f"{test_root} holds no test images: expected {test_root}/<defect or {self.good}>/*.png")
        return CategoryFiles(tuple(train), tuple(items))
