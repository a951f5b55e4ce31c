"""VisA (Visual Anomaly, Zou et al. 2022): 12 object categories, read in either of two layouts.

Original release (what the download extracts to), split by the official one-class CSV:

    <root>/split_csv/1cls.csv          columns object,split,label,image,mask
    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png

``image`` and ``mask`` are paths relative to ``<root>``; ``split`` is train|test; ``label``
is normal|anomaly; ``mask`` is empty for normal rows. VisA masks hold small values
(1, 2, ... or 255): every non-zero pixel is anomalous (the shared mask loader
binarises). The CSV has no defect types: anomalous images get the defect type
``anomaly``, unless ``<root>/<object>/image_anno.csv`` (columns image,label, shipped with
the release) names them.

Converted tree (the official ``prepare_data.py`` output, MVTec AD layout): no
``split_csv/`` but ``<root>/<category>/train/good``; masks ``ground_truth/<defect>/<stem>.png``
(``<stem>_mask.png`` is accepted too).

All 12 categories are objects (no textures).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from orchestrator.data.mvtec import CategoryFiles, MVTecLayout, TestItem, require_root
from orchestrator.errors import DatasetError

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LAYOUT = ("<root>/split_csv/1cls.csv (columns object,split,label,image,mask; paths relative to <root>) "
               "or a converted tree <root>/<category>/train/good, test/<defect>, ground_truth/<defect>/<stem>.png")
CONVERTED = MVTecLayout("visa", textures=frozenset(), mask_suffix="", layout=VISA_LAYOUT)


@dataclass(frozen=True)
class Row:
    line: int
    split: str
    label: str
    image: str
    mask: str


def read_split_csv(path: Path) -> dict[str, list[Row]]:
    """Rows of 1cls.csv by object, checked for columns and values."""
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise DatasetError(f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(header) or 'nothing'}); "
                                   f"expected the header {','.join(COLUMNS)} of VisA's split_csv/1cls.csv")
            rows: dict[str, list[Row]] = defaultdict(list)
            for line, raw in enumerate(reader, start=2):
                value = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                split, label = value["split"].lower(), value["label"].lower()
                if split not in ("train", "test") or label not in ("normal", "anomaly") or not value["image"]:
                    raise DatasetError(f"{path} line {line}: expected split train|test, label normal|anomaly and an image path, "
                                       f"got {value['split']!r}, {value['label']!r}, {value['image']!r}")
                rows[value["object"]].append(Row(line, split, label, value["image"], value["mask"]))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); re-extract VisA's split_csv/1cls.csv") from None
    if not rows:
        raise DatasetError(f"{path} has no rows; re-extract VisA's split_csv/1cls.csv")
    return rows


def defect_names(root: Path, category: str) -> dict[str, str]:
    """image path (relative to root) -> defect label from the optional image_anno.csv."""
    path = root / category / "image_anno.csv"
    if not path.is_file():
        return {}
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not {"image", "label"} <= set(reader.fieldnames or []):
                return {}
            return {r["image"].strip(): r["label"].strip().replace(",", "+") for r in reader if r.get("image") and r.get("label")}
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}  # optional metadata only: the split CSV is the source of truth


@dataclass(frozen=True)
class VisaDataset:
    name: str = "visa"

    def resolve_root(self, root: str | Path | None, cache_dir: str | Path | None) -> Path:
        return require_root(self.name, root, VISA_LAYOUT)

    @staticmethod
    def is_original(root: Path) -> bool:
        """Original release (split CSV) unless the tree is a converted one without split_csv/."""
        if (root / "split_csv").is_dir():
            return True
        converted = any((p / "train" / "good").is_dir() for p in root.iterdir() if p.is_dir())
        if not converted:
            raise DatasetError(f"{root / SPLIT_CSV} is missing and {root} holds no converted category (<category>/train/good); expected {VISA_LAYOUT}")
        return False

    def categories(self, root: Path) -> list[str]:
        if not self.is_original(root):
            return CONVERTED.categories(root)
        return sorted(self._rows(root))

    def _rows(self, root: Path) -> dict[str, list[Row]]:
        path = root / SPLIT_CSV
        if not path.is_file():
            raise DatasetError(f"{path} is missing: VisA's original release ships split_csv/1cls.csv; restore it, or point data.root at a converted tree")
        return read_split_csv(path)

    def is_texture(self, category: str) -> bool:
        return False

    def scan(self, root: Path, category: str) -> CategoryFiles:
        if not self.is_original(root):
            return CONVERTED.scan(root, category)
        rows = self._rows(root)
        if category not in rows:
            raise DatasetError(f"category {category!r} not in {root / SPLIT_CSV}; found: {', '.join(sorted(rows))}")
        names = defect_names(root, category)
        csv_path = root / SPLIT_CSV
        train, test = [], []
        for row in rows[category]:
            image = root / row.image
            if not image.is_file():
                raise DatasetError(f"{csv_path} line {row.line} names {image}, which is missing; re-extract VisA or fix data.root")
            if row.split == "train":
                if row.label != "normal":
                    raise DatasetError(f"{csv_path} line {row.line}: a training image labelled {row.label!r}; the one-class split trains on normal images only")
                train.append(image)
            elif row.label == "normal":
                test.append(TestItem(image, "good", None))
            else:
                mask = root / row.mask if row.mask else None
                if mask is None or not mask.is_file():
                    expected = mask or f"a path in the mask column of line {row.line}"
                    raise DatasetError(f"anomalous test image {image} has no mask: expected {expected} (listed in {csv_path})")
                defect = names.get(row.image, "anomaly")
                test.append(TestItem(image, "anomaly" if defect.lower() in ("good", "normal", "") else defect, mask))
        if not train:
            raise DatasetError(f"{csv_path} lists no training images for {category}; re-extract VisA's split_csv/1cls.csv")
        if not test:
            raise DatasetError(f"{csv_path} lists no test images for {category}; re-extract VisA's split_csv/1cls.csv")
        return CategoryFiles(tuple(train), tuple(test))
