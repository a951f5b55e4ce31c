"""MVTec AD layout, the lingua franca every dataset adapter maps onto.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect or good>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

An adapter only lists files (:class:`CategoryFiles`); decoding, preprocessing and caching
are shared (orchestrator/data/cache.py). A dataset in another layout (VisA's split CSV,
DAGM's label folders) is a new module with a class offering the same four methods as
:class:`MVTecLayout`, registered in orchestrator/data/registry.py.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class MVTecLayout:
    """MVTec AD, and any tree in the same layout (MPDD ships in it too)."""

    name: str = "mvtec_ad"
    textures: frozenset[str] = field(default=MVTEC_AD_TEXTURES)  # categories without a foreground/background split

    def resolve_root(self, root: str | Path | None, cache_dir: str | Path | None) -> Path:
        """The folder to read (``data.root``); real datasets have no default."""
        if root is None:
            raise DatasetError(f"dataset {self.name} needs data.root=<folder> laid out as {MVTEC_LAYOUT}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"dataset root {root} does not exist or is not a folder; expected {MVTEC_LAYOUT}")
        return root

    def categories(self, root: Path) -> list[str]:
        found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())
        if not found:
            hint = f"; {root} looks like one category: set data.root={root.parent}" if (root / "train").is_dir() else ""
            raise DatasetError(f"no categories under {root}: expected {MVTEC_LAYOUT}{hint}")
        return found

    def is_texture(self, category: str) -> bool:
        return category in self.textures

    def scan(self, root: Path, category: str) -> CategoryFiles:
        folder = root / category
        if not folder.is_dir():
            raise DatasetError(f"category {category!r} not found under {root}; found: {', '.join(self.categories(root))}")
        good = folder / "train" / "good"
        if not good.is_dir():
            raise DatasetError(f"{good} is missing: expected {MVTEC_LAYOUT}")
        train = images_in(good)
        if not train:
            raise DatasetError(f"{good} holds no images: expected {good}/*.png (or .jpg/.bmp/.tif)")
        test_root = folder / "test"
        if not test_root.is_dir():
            raise DatasetError(f"{test_root} is missing: expected {MVTEC_LAYOUT}")
        items = []
        for defect_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for image in images_in(defect_dir):
                if defect == "good":
                    items.append(TestItem(image, "good", None))
                    continue
                mask = folder / "ground_truth" / defect / f"{image.stem}_mask.png"
                if not mask.is_file():
                    raise DatasetError(f"anomalous test image {image} has no mask: expected {mask}")
                items.append(TestItem(image, defect, mask))
        if not items:
            raise DatasetError(f"{test_root} holds no test images: expected {test_root}/<defect or good>/*.png")
        return CategoryFiles(tuple(train), tuple(items))
