"""Content-addressed store of trained models: train once, evaluate many. Plain storage,
no Ray: the coordination of concurrent trainings lives in orchestrator/ray_backend.py.

A model's key is the sha256 of everything that determines its weights: the method name,
the method config's *training* fields (``train_field``), the data it is trained on (the
dataset's files by content, and the categories) and the version of the code
that trains it — the method's module with what it imports from ``methods/``, the
training loop, the preprocessing and the dataset's adapter (:func:`code_files`), so a new
method or a new dataset adapter leaves every other model's key alone. A trial whose key
already exists loads the weights and only evaluates.

Layout: ``<storage_path>/models/<key>/versions/<version>/{model.pt, meta.json}`` and
``<key>/current`` naming the version to load (:class:`ModelStore`), on a local folder or
an object store (orchestrator/storage.py); every write is atomic, so a reader never sees
half a model.

    python -m orchestrator.model_store prune storage_path=ray_results   # drop unreferenced versions, finished Train folders
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import inspect
import io
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from methods import METHODS
from methods.fields import MethodConfig, config_fingerprint, training_fields
from orchestrator.paths import default_cache_dir
from orchestrator.data import DataSpec
from orchestrator.data.registry import get_adapter
from orchestrator.errors import ConfigError
from orchestrator.files import write_file
from orchestrator.storage import Storage

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Orchestrator code every trained model depends on: the training loop and the preprocessing.
TRAINING_CODE = ("orchestrator/training.py", "orchestrator/data/images.py", "orchestrator/data/cache.py",
                 "orchestrator/data/foreground.py", "orchestrator/data/textures.py")


def imported_method_modules(path: Path) -> set[str]:
    """``methods.*`` modules a source file imports (absolute imports, as the project writes them)."""
    stat = path.stat()
    return set(_imported_method_modules(path, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=512)
def _imported_method_modules(path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    """Parsed once per version of the file (a sweep plans hundreds of model keys)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "methods":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from methods import unet` names a module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "methods")
    return frozenset(found)


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


@functools.lru_cache(maxsize=64)
def dataset_manifest(root: str) -> str:
    """sha256 of (relative path, size, content digest) of every file under ``root``: the
    data by content, not by where it is mounted, so clusters that mount one dataset at
    different paths share its models, and a dataset whose files change gets new keys.
    Each file is read once per (path, size, modification time): the digests are kept in
    ``<DIFFAD_CACHE>/file-digests/``."""
    cache_file = Path(default_cache_dir()) / "file-digests" / f"{hashlib.sha256(root.encode()).hexdigest()[:24]}.json"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    fresh: dict[str, list] = {}
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        stat, rel = path.stat(), str(path.relative_to(root))
        entry = known.get(rel)
        if not entry or entry[0] != stat.st_size or entry[1] != stat.st_mtime_ns:
            entry = [stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()]
        fresh[rel] = entry
        digest.update(f"{rel}\0{entry[0]}\0{entry[2]}\n".encode())
    if fresh != known:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_file(cache_file, lambda handle: handle.write(json.dumps(fresh).encode()))
        except OSError:
            pass  # a read-only cache: the digests are computed again next time
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics shape a trained model."""
    return {name: importlib.metadata.version(name) for name in ("torch", "diffusers")}


def model_key(method: str, method_config: MethodConfig, data: DataSpec, categories: list[str], workers: int = 1,
              train_seed: int | None = None) -> ModelKey:
    """The key of the model trained from these inputs. ``workers`` (DDP ranks) is part of
    it: each rank draws its own synthetic anomalies and augmentations. ``train_seed``
    (default: the data seed) seeds the training; ``seeds=N`` sweeps train one model each."""
    training = training_fields(method_config)
    root = data.resolved_root()
    inputs = {
        "method": method,
        "training_config": training,
        "dataset": data.dataset,
        "dataset_manifest": dataset_manifest(str(root)),  # the files by content, not the path they are mounted at
        "categories": list(categories),
        "val_fraction": data.val_fraction,
        "seed": data.seed,
        "train_seed": data.seed if train_seed is None else train_seed,
        "foreground": data.foreground,
        "textures_manifest": dataset_manifest(str(Path(data.textures).resolve())) if data.textures else None,
        "workers": workers,
        "code_version": code_version(method, data.dataset),
        "packages": package_versions(),
        # A backbone the training uses: which weight file (name, size) it was read from.
        "backbone_file": backbone_file_identity(training["backbone"]) if "backbone" in training else None,
    }
    return ModelKey(config_fingerprint(inputs), inputs)


def backbone_file_identity(name: str) -> str:
    from orchestrator.pretrained import backbone_file

    try:
        path = backbone_file(name)
    except Exception as exc:  # noqa: BLE001 - a missing file fails the training later, with its own message
        return f"{name}: unavailable ({type(exc).__name__})"
    return f"{name}: {path.name} {path.stat().st_size}"


SCHEMA = 2  # the store's layout; a store written by another schema is refused with a clear error


class StaleLease(RuntimeError):
    """A training whose lease was taken over tried to publish over its successor."""


class ModelStore:
    """``<storage_path>/models/<key>/versions/<version>/{model.pt, meta.json}`` and a
    ``<key>/current`` file naming the version readers load, on a local folder or an
    object store (:class:`Storage`). A training writes its version's weights, then its
    meta.json (a version without one is incomplete and never loaded), then moves
    ``current`` (one atomic write), so a reader always loads a complete model and
    ``retrain=true`` replaces what later trials load. Versions no pointer names are
    removed by ``python -m orchestrator.model_store prune``."""

    def __init__(self, storage: str | Path | Storage):
        self.storage = storage if isinstance(storage, Storage) else Storage(storage)

    def check_schema(self) -> None:
        marker = "models/SCHEMA"
        if self.storage.is_file(marker):
            found = self.storage.read_text(marker).strip()
            if found != str(SCHEMA):
                raise ConfigError(f"model store {self.storage.join('models')} has schema {found}, this code reads {SCHEMA}; "
                                  "use another storage_path or run `python -m orchestrator.model_store prune` from the matching version")
        else:
            self.storage.write_text(marker, f"{SCHEMA}\n")

    def folder(self, key: ModelKey) -> str:
        return f"models/{key.key}"

    def _pointer(self, key: ModelKey) -> tuple[str, int, str] | None:
        """(version, fencing token, tag) of the ``current`` pointer, or None when unpublished."""
        found = self.storage.read_tagged(f"{self.folder(key)}/current")
        if found is None:
            return None
        text, tag = found[0].decode().strip(), found[1]
        if text.startswith("{"):
            raw = json.loads(text)
            return raw["version"], int(raw.get("token", 0)), tag
        return text, 0, tag  # written before pointers carried a token

    def _current_version(self, key: ModelKey) -> str | None:
        pointer = self._pointer(key)
        if pointer is None:
            return None
        version = pointer[0]
        return version if self.storage.is_file(f"{self.folder(key)}/versions/{version}/meta.json") else None

    def current(self, key: ModelKey) -> str | None:
        """The version folder readers load (a path or URI), or None when the key was never published."""
        version = self._current_version(key)
        return self.storage.join(self.folder(key), "versions", version) if version else None

    def exists(self, key: ModelKey) -> bool:
        return self._current_version(key) is not None

    def save(self, key: ModelKey, state_dict: dict[str, torch.Tensor], meta: dict[str, Any], token: int = 0) -> str:
        """Publish a new version of ``key`` and make it current; returns its folder.

        ``token``: the fencing token of the model's lease under which it was trained. The
        pointer moves only if it names no version of a higher token (compare-and-swap), so a
        holder that lost its lease (paused past its expiry, say) cannot replace what its
        successor published: :class:`StaleLease` then, and the new version stays unnamed
        (``prune`` removes it)."""
        self.check_schema()
        version = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        folder = f"{self.folder(key)}/versions/{version}"
        weights = io.BytesIO()
        torch.save(state_dict, weights)
        self.storage.write_bytes(f"{folder}/model.pt", weights.getvalue())
        self.storage.write_text(f"{folder}/meta.json", json.dumps({**meta, "key": key.key, "version": version, "inputs": key.inputs,
                                                                   "token": token}, indent=2, default=str))
        pointer = json.dumps({"version": version, "token": token}).encode()
        rel = f"{self.folder(key)}/current"
        while True:
            current = self._pointer(key)
            if current is not None and current[1] > token:
                raise StaleLease(f"model {key.short}: version {current[0]} of lease token {current[1]} is current; "
                                 f"this training's token {token} is older (its lease was taken over), so {version} is not published")
            if (self.storage.create(rel, pointer) if current is None else self.storage.swap(rel, pointer, current[2])) is not None:
                return self.storage.join(folder)

    def meta(self, key: ModelKey) -> dict[str, Any]:
        """meta.json of the current version ({} when none)."""
        version = self._current_version(key)
        return json.loads(self.storage.read_text(f"{self.folder(key)}/versions/{version}/meta.json")) if version else {}

    def load(self, key: ModelKey) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        version = self._current_version(key)
        if version is None:
            raise FileNotFoundError(f"no model {key.short} in {self.storage.join('models')}")
        folder = f"{self.folder(key)}/versions/{version}"
        meta = json.loads(self.storage.read_text(f"{folder}/meta.json"))
        return torch.load(io.BytesIO(self.storage.read_bytes(f"{folder}/model.pt")), map_location="cpu", weights_only=True), meta

    def published(self) -> list[str]:
        """Keys with a current version."""
        return [e.path.split("/")[1] for e in self.storage.list("models") if self.storage.is_file(f"{e.path}/current")]

    def prune(self, min_age_s: float = 3600.0) -> list[str]:
        """Remove every version no ``current`` pointer names and that is older than
        ``min_age_s`` (a reader that read the pointer just before a retraining moved it
        still finds its version); returns what was removed."""
        removed = []
        now = time.time()
        for key_folder in self.storage.list("models"):
            pointer = self._pointer(ModelKey(key_folder.path.rsplit("/", 1)[-1], {}))
            current = pointer[0] if pointer else None
            for version in self.storage.list(f"{key_folder.path}/versions"):
                files = self.storage.list(version.path, recursive=True)
                if version.path.rsplit("/", 1)[-1] != current and now - max([f.mtime for f in files] + [0.0]) > min_age_s:
                    self.storage.delete(version.path)
                    if files:  # an object store may still list a folder whose objects are gone
                        removed.append(self.storage.join(version.path))
        return removed


def newest_mtime(storage: Storage, rel: str) -> float:
    """A folder's age is its newest file's (object stores have no folder times)."""
    return max([e.mtime for e in storage.list(rel, recursive=True)] + [0.0])


def prune(storage_path: str | Path, min_age_s: float = 3600.0) -> list[str]:
    """Unreferenced model versions, and the Ray Train folders (checkpoints) of every model
    that is published: what ``python -m orchestrator.model_store prune`` removes."""
    store = ModelStore(storage_path)
    removed = store.prune(min_age_s)
    published = {key[:16] for key in store.published()}
    for run in store.storage.list("train"):
        name = run.path.rsplit("/", 1)[-1]
        if name.startswith("train-") and name.split("-")[1] in published and time.time() - newest_mtime(store.storage, run.path) > min_age_s:
            store.storage.delete(run.path)
            removed.append(store.storage.join(run.path))
    return removed


def main(argv: list[str] | None = None) -> int:
    """python -m orchestrator.model_store prune storage_path=<folder> [min_age_s=3600]"""
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv)[1:] if "=" in a)
    command = (sys.argv[1:] if argv is None else argv)[:1]
    if command != ["prune"] or set(args) - {"storage_path", "min_age_s"}:
        print("usage: python -m orchestrator.model_store prune storage_path=<folder> [min_age_s=3600]", file=sys.stderr)
        return 2
    removed = prune(args.get("storage_path", "ray_results"), float(args.get("min_age_s", 3600)))
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} folder(s) removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
