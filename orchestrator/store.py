"""Content-addressed store of trained models: train once, evaluate many. Plain storage,
no Ray: the coordination of concurrent trainings lives in orchestrator/ray_backend.py.

A model's key is the sha256 of everything that determines its weights: the method name,
the method config's *training* fields (``train_field``), the data it is trained on (the
:class:`DataSpec` with an absolute root, and the categories) and the version of the code
that trains it — the method's module with what it imports from ``methods/``, the
training loop, the preprocessing and the dataset's adapter (:func:`code_files`), so a new
method or a new dataset adapter leaves every other model's key alone. A trial whose key
already exists loads the weights and only evaluates.

Layout: ``<storage_path>/models/<key>/{model.pt, meta.json}``, published atomically
(orchestrator/files.py), so a reader never sees half a model.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from methods import METHODS
from methods.base import MethodConfig, config_fingerprint, training_fields
from orchestrator.data import DataSpec
from orchestrator.data.registry import get_adapter
from orchestrator.files import publish_folder

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Orchestrator code every trained model depends on: the training loop and the preprocessing.
TRAINING_CODE = ("orchestrator/training.py", "orchestrator/data/images.py", "orchestrator/data/cache.py",
                 "orchestrator/data/foreground.py", "orchestrator/data/textures.py")


def imported_method_modules(path: Path) -> set[str]:
    """``methods.*`` modules a source file imports (absolute imports, as the project writes them)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "methods":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from methods import unet` names a module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "methods")
    return found


def module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def code_files(method: str, dataset: str, root: Path = PROJECT_ROOT) -> list[Path]:
    """The sources a trained model of ``method`` on ``dataset`` depends on: the method's
    module and, transitively, every ``methods`` module it imports; the training code; the
    dataset adapter's modules (its class and base classes inside the project)."""
    todo = [METHODS[method].split(":")[0]]
    seen: dict[str, Path] = {}
    while todo:
        module = todo.pop()
        path = module_file(module, root)
        if module in seen or path is None:
            continue
        seen[module] = path
        todo.extend(imported_method_modules(path))
    adapters = {Path(inspect.getsourcefile(cls)).resolve() for cls in type(get_adapter(dataset)).__mro__
                if cls.__module__.startswith("orchestrator.")}
    adapter_files = {root / p.relative_to(PROJECT_ROOT) for p in adapters}
    return sorted(set(seen.values()) | {root / f for f in TRAINING_CODE} | adapter_files)


def code_version(method: str, dataset: str, root: Path = PROJECT_ROOT) -> str:
    """sha256 (first 12 hex) of :func:`code_files`."""
    digest = hashlib.sha256()
    for path in code_files(method, dataset, root):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class ModelKey:
    key: str
    inputs: dict[str, Any]  # what was hashed, kept in meta.json for humans

    @property
    def short(self) -> str:
        return self.key[:16]


def model_key(method: str, method_config: MethodConfig, data: DataSpec, categories: list[str]) -> ModelKey:
    inputs = {
        "method": method,
        "training_config": training_fields(method_config),
        "dataset": data.dataset,
        "root": str(Path(data.root).resolve()) if data.root else None,
        "categories": list(categories),
        "val_fraction": data.val_fraction,
        "seed": data.seed,
        "foreground": data.foreground,
        "textures": str(Path(data.textures).resolve()) if data.textures else None,
        "code_version": code_version(method, data.dataset),
    }
    return ModelKey(config_fingerprint(inputs), inputs)


class ModelStore:
    def __init__(self, storage_path: str | Path):
        self.root = Path(storage_path).resolve() / "models"

    def path(self, key: ModelKey) -> Path:
        return self.root / key.key

    def exists(self, key: ModelKey) -> bool:
        return (self.path(key) / "meta.json").exists()

    def save(self, key: ModelKey, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        def fill(folder: Path) -> None:
            torch.save(state_dict, folder / "model.pt")
            (folder / "meta.json").write_text(json.dumps({**meta, "key": key.key, "inputs": key.inputs}, indent=2, default=str))

        # A key published meanwhile by another trainer is kept (same training inputs).
        publish_folder(self.path(key), fill, is_complete=lambda f: (f / "meta.json").exists())
        return self.path(key)

    def load(self, key: ModelKey) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        path = self.path(key)
        meta = json.loads((path / "meta.json").read_text())
        return torch.load(path / "model.pt", map_location="cpu", weights_only=True), meta
