"""DAGM 2007 (Weakly Supervised Learning for Industrial Optical Inspection): ten
synthetic texture classes, ``Class1`` ... ``Class10``, 512x512 grayscale PNGs.

    <root>/Class<k>/Train/*.PNG
    <root>/Class<k>/Train/Label/Labels.txt
    <root>/Class<k>/Train/Label/<stem>_label.PNG
    <root>/Class<k>/Test/...            (same as Train)

``Labels.txt``: a header line, then one row per image, whitespace separated:
``index  flag  image  0  label`` where flag 1 = defective, ``image`` is the file in the
folder above, ``label`` its mask in ``Label/`` (``<stem>_label.PNG``; may be absent or 0 for
flag 0). DAGM's masks are coarse ellipses around each defect (weak labels), so pixel
metrics on DAGM are only indicative.

Protocol (unsupervised, as in the anomaly-detection literature that uses DAGM): train =
the non-defective (flag 0) images of ``Train/``; test = every image of ``Test/``, labelled
by its flag, defective ones with their ``Label/`` mask and the defect type ``defect``.
The defective training images are not used. All classes are textures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from orchestrator.data.mvtec import CategoryFiles, MaskIndex, TestItem, child, natural_key, require_root
from orchestrator.data.images import IMAGE_SUFFIXES
from orchestrator.errors import DatasetError

DAGM_LAYOUT = "<root>/Class<k>/{Train,Test}/*.PNG with {Train,Test}/Label/Labels.txt and Label/<stem>_label.PNG"
CLASS = re.compile(r"class\d+", re.IGNORECASE)


@dataclass(frozen=True)
class LabelRow:
    defective: bool
    image: str
    label: str | None  # mask file name, None when not given


def read_labels(path: Path) -> list[LabelRow]:
    """Rows of a DAGM Labels.txt (the header line is skipped, or read if it is a row)."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing: every DAGM Train/ and Test/ folder has Label/Labels.txt; re-extract the class")
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc}); re-extract the class") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        is_row = len(fields) >= 3 and fields[1] in ("0", "1") and Path(fields[2]).suffix.lower() in IMAGE_SUFFIXES
        if not is_row:
            if number == 1:
                continue  # the header line
            raise DatasetError(f"{path} line {number}: expected 'index flag(0|1) image 0 label', got {line.strip()!r}")
        label = fields[4] if len(fields) >= 5 and fields[4] != "0" else None
        rows.append(LabelRow(fields[1] == "1", fields[2], label))
    if not rows:
        raise DatasetError(f"{path} lists no images: expected a header line then rows 'index flag image 0 label'")
    return rows


@dataclass(frozen=True)
class DagmDataset:
    name: str = "dagm"

    def resolve_root(self, root: str | Path | None, cache_dir: str | Path | None) -> Path:
        return require_root(self.name, root, DAGM_LAYOUT)

    def categories(self, root: Path) -> list[str]:
        found = [p.name for p in root.iterdir() if p.is_dir() and CLASS.fullmatch(p.name)
                 and child(p, "Train").is_dir() and child(p, "Test").is_dir()]
        if not found:
            hint = f"; {root} looks like one class: set data.root={root.parent}" if child(root, "Train").is_dir() else ""
            raise DatasetError(f"no DAGM classes under {root}: expected {DAGM_LAYOUT}{hint}")
        return sorted(found, key=natural_key)

    def is_texture(self, category: str) -> bool:
        return True

    def _split(self, folder: Path, split: str, masks_needed: bool) -> list[tuple[Path, bool, Path | None]]:
        """(image, defective, mask or None) for each row of <split>/Label/Labels.txt."""
        images = child(folder, split)
        if not images.is_dir():
            raise DatasetError(f"{images} is missing: expected {DAGM_LAYOUT}")
        labels = child(images, "Label")
        masks = MaskIndex(labels)
        out = []
        for row in read_labels(child(labels, "Labels.txt")):
            image = child(images, row.image)
            if not image.is_file():
                raise DatasetError(f"{image} is listed in {labels / 'Labels.txt'} but missing; re-extract the class")
            mask = None
            if row.defective and masks_needed:
                stem = Path(row.label).stem if row.label else f"{image.stem}_label"
                mask = masks.find(stem, ("",)) or masks.find(image.stem, ("_label",))
                if mask is None:
                    raise DatasetError(f"anomalous test image {image} has no mask: expected {labels / (row.label or image.stem + '_label.PNG')}")
            out.append((image, row.defective, mask))
        return out

    def scan(self, root: Path, category: str) -> CategoryFiles:
        folder = root / category
        if not folder.is_dir():
            raise DatasetError(f"class {category!r} not found under {root}; found: {', '.join(self.categories(root))}")
        train = [image for image, defective, _ in self._split(folder, "Train", masks_needed=False) if not defective]
        if not train:
            raise DatasetError(f"{child(folder, 'Train') / 'Label' / 'Labels.txt'} lists no non-defective image to train on")
        test = [TestItem(image, "defect" if defective else "good", mask) for image, defective, mask in self._split(folder, "Test", masks_needed=True)]
        return CategoryFiles(tuple(train), tuple(test))
