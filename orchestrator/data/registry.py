"""Dataset registry: name -> adapter.

An adapter lists a dataset's files in one common shape and knows which categories are
textures; everything after (decoding, preprocessing, caching, validation split) is shared.
Adding a dataset = one module with a class satisfying :class:`DatasetAdapter` (usually
MVTecLayout with another file listing) plus one line here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from orchestrator.data.btad import btad
from orchestrator.data.dagm import DagmDataset
from orchestrator.data.folder import FolderDataset
from orchestrator.data.generality_set import GeneralityDataset
from orchestrator.data.mvtec import CategoryFiles, MVTecLayout
from orchestrator.data.synthetic import SyntheticDataset
from orchestrator.data.visa import VisaDataset
from orchestrator.errors import DatasetError


class DatasetAdapter(Protocol):
    name: str

    def resolve_root(self, root: str | Path | None, cache_dir: str | Path | None) -> Path:
        """The dataset folder to read (checked to exist); ``root`` None = the dataset's default."""

    def categories(self, root: Path) -> list[str]:
        """Category names under ``root``, sorted."""

    def is_texture(self, category: str) -> bool:
        """True where anomalies may go anywhere (no foreground estimate under foreground=auto)."""

    def scan(self, root: Path, category: str) -> CategoryFiles:
        """The category's files; raises DatasetError naming what is missing."""


DATASETS: dict[str, DatasetAdapter] = {
    "mvtec_ad": MVTecLayout("mvtec_ad"),
    "mpdd": MVTecLayout("mpdd", textures=frozenset()),  # MPDD ships in the MVTec layout; all six categories are objects
    "visa": VisaDataset(),  # original release (split_csv/1cls.csv) or a converted MVTec-layout tree; all objects
    "btad": btad(),  # MVTec layout with ok/ko folders and <stem>.png masks; no category marked as texture (see btad.py)
    "dagm": DagmDataset(),  # Class1..Class10, Labels.txt; train = Train/ non-defective, test = all of Test/; all textures
    "folder": FolderDataset(),  # your own normal/, abnormal/, masks/ (see folder.py for the protocol)
    "synthetic": SyntheticDataset(),
    "generality": GeneralityDataset(),  # frozen real-photo set for bench.generality; defects no method trains or selects on
}


def get_adapter(dataset: str) -> DatasetAdapter:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DatasetError(f"unknown dataset {dataset!r}; valid: {', '.join(sorted(DATASETS))}") from None
