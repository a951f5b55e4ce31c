"""``folder``: your own images, with no split files to write.

One category (named after the folder):

    <root>/normal/*.png            defect-free images
    <root>/abnormal/*.png          defective test images (or abnormal/<defect type>/*.png)
    <root>/masks/<stem>.png        one mask per abnormal image (<stem>_mask.png accepted;
                                   for abnormal/<defect>/x.png also masks/<defect>/x.png)
    <root>/test_normal/*.png       optional: defect-free test images

or several: ``<root>/<category>/normal/...`` and so on for each category.

Protocol: with ``test_normal/`` every ``normal/`` image trains and the test split is
``test_normal/`` + ``abnormal/``. Without it a fixed 20 % of ``normal/`` (at least one
image; seeded by the category name, so the same images whatever the run's ``seed``) is
held out as the test normals and the rest trains. Masks are required for every abnormal
image (the test metrics include pixel-level ones); any non-zero pixel is anomalous.
Whether a category is a texture (no foreground estimate under ``data.foreground=auto``)
is unknown: every category is treated as an object, whose foreground estimate falls back
to the whole image when the content fills the frame; set ``data.foreground=off`` to
force textures.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.data.mvtec import CategoryFiles, MaskIndex, TestItem, images_in, require_root
from orchestrator.errors import DatasetError

FOLDER_LAYOUT = "<root>/normal/*.png, <root>/abnormal/[<defect>/]*.png, <root>/masks/[<defect>/]<stem>.png, optional <root>/test_normal/ (or <root>/<category>/normal/... for several)"
HELD_OUT = 0.2  # share of normal/ used as test normals when there is no test_normal/


def held_out(n: int, category: str) -> np.ndarray:
    """Sorted indices of the normal images held out for test (fixed per category name)."""
    count = max(1, int(round(HELD_OUT * n)))
    return np.sort(np.random.default_rng(zlib.crc32(category.encode())).permutation(n)[:count])


@dataclass(frozen=True)
class FolderDataset:
    name: str = "folder"

    def resolve_root(self, root: str | Path | None, cache_dir: str | Path | None) -> Path:
        return require_root(self.name, root, FOLDER_LAYOUT)

    def categories(self, root: Path) -> list[str]:
        if (root / "normal").is_dir():
            return [root.name]
        found = sorted(p.name for p in root.iterdir() if (p / "normal").is_dir())
        if not found:
            raise DatasetError(f"no normal/ folder in {root} or its subfolders: expected {FOLDER_LAYOUT}")
        return found

    def is_texture(self, category: str) -> bool:
        return False

    def scan(self, root: Path, category: str) -> CategoryFiles:
        folder = root if (root / "normal").is_dir() and category == root.name else root / category
        if not (folder / "normal").is_dir():
            raise DatasetError(f"category {category!r} not found under {root}; found: {', '.join(self.categories(root))}")
        normal = images_in(folder / "normal")
        if (folder / "test_normal").is_dir():
            train, test_normal = normal, images_in(folder / "test_normal")
            if not train:
                raise DatasetError(f"{folder / 'normal'} holds no images: put the defect-free training images there")
        else:
            if len(normal) < 2:
                raise DatasetError(f"{folder / 'normal'} holds {len(normal)} image(s); it needs at least 2 (some are held out for test), or add {folder / 'test_normal'}/")
            held = set(held_out(len(normal), category).tolist())
            train = [p for i, p in enumerate(normal) if i not in held]
            test_normal = [p for i, p in enumerate(normal) if i in held]
        test = [TestItem(p, "good", None) for p in test_normal]
        abnormal = folder / "abnormal"
        groups = [(abnormal, "abnormal")] if abnormal.is_dir() else []
        groups += [(d, d.name) for d in sorted(p for p in abnormal.iterdir() if p.is_dir())] if abnormal.is_dir() else []
        for images_dir, defect in groups:
            nested = folder / "masks" / images_dir.relative_to(abnormal)
            indexes = [MaskIndex(nested)] + ([MaskIndex(folder / "masks")] if nested != folder / "masks" else [])
            for image in images_in(images_dir):
                mask = next((m for index in indexes if (m := index.find(image.stem, ("", "_mask"))) is not None), None)
                if mask is None:
                    raise DatasetError(f"anomalous test image {image} has no mask: expected {nested / (image.stem + '.png')} (or {image.stem}_mask.png)")
                test.append(TestItem(image, defect, mask))
        if not any(item.defect != "good" for item in test):
            raise DatasetError(f"{abnormal} is missing or holds no images: put the defective test images there (with masks in {folder / 'masks'}/)")
        return CategoryFiles(tuple(train), tuple(test))
