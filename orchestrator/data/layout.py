"""Dataset adapters: each maps a dataset's own layout onto one view —
category -> normal training images, test images with defect type and mask path.

MVTec AD's layout is the lingua franca:
    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect or good>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.data.images import IMAGE_SUFFIXES
from orchestrator.errors import DatasetError

MVTEC_LAYOUT = "<root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png, <root>/<category>/ground_truth/<defect>/<stem>_mask.png"


@dataclass(frozen=True)
class TestItem:
    image: Path
    defect: str  # "good" or the defect type
    mask: Path | None  # None for good images (all-zero mask)


@dataclass(frozen=True)
class CategoryFiles:
    train: tuple[Path, ...]
    test: tuple[TestItem, ...]


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


@dataclass
class MVTecLayout:
    """MVTec AD (and MPDD, and any tree in the same layout)."""

    name: str = "mvtec_ad"
    textures: frozenset[str] = field(default_factory=lambda: frozenset({"carpet", "grid", "leather", "tile", "wood"}))

    def check_root(self, root: Path | None) -> Path:
        if root is None:
            raise DatasetError(f"dataset {self.name} needs data.root=<folder> laid out as {MVTEC_LAYOUT}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"dataset root {root} does not exist; expected a folder laid out as {MVTEC_LAYOUT}")
        return root

    def categories(self, root: Path | None) -> list[str]:
        root = self.check_root(root)
        found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())
        if not found:
            raise DatasetError(f"no categories under {root}: expected {MVTEC_LAYOUT}")
        return found

    def is_texture(self, category: str) -> bool:
        return category in self.textures

    def scan(self, root: Path | None, category: str) -> CategoryFiles:
        root = self.check_root(root)
        folder = root / category
        if not folder.is_dir():
            raise DatasetError(f"category {category!r} not found under {root}; found: {', '.join(self.categories(root))}")
        good = folder / "train" / "good"
        if not good.is_dir():
            raise DatasetError(f"{good} is missing: expected {MVTEC_LAYOUT}")
        train = images_in(good)
        if not train:
            raise DatasetError(f"{good} holds no images (.png/.jpg/.bmp)")
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
                if not mask.exists():
                    raise DatasetError(f"anomalous test image {image} has no mask: expected {mask}")
                items.append(TestItem(image, defect, mask))
        if not items:
            raise DatasetError(f"{test_root} holds no test images: expected {test_root}/<defect or good>/*.png")
        return CategoryFiles(tuple(train), tuple(items))
