"""Content-addressed store of trained models: train once, evaluate many.

A model's key is the sha256 of everything that determines its weights: the method
name, the method config's *training* fields (``train_field``), the dataset, its root,
the categories it was trained on, the data split (val_fraction, seed, foreground,
texture source) and the code version (a hash of the sources that shape training). A
trial whose key already exists loads the weights and only evaluates.

Layout: ``<storage_path>/models/<key>/{model.pt, meta.json}``, written to a temporary
folder and renamed, so a reader never sees half a model.

Concurrency: trials ask the :class:`TrainingClaims` actor (one per sweep, named, so
every trial on the cluster reaches the same one) before training; exactly one trial
trains a key, the others wait for it to appear in the store. If the trainer fails the
claim is released and a waiter takes it over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from methods.base import config_fingerprint, training_fields

log = logging.getLogger(__name__)

_CODE_DIRS = ("methods", "orchestrator/data")
_CODE_FILES = ("orchestrator/training.py",)


def code_version() -> str:
    """sha256 (first 12 hex) of the sources that shape a trained model."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    paths = [p for d in _CODE_DIRS for p in sorted((root / d).rglob("*.py"))] + [root / f for f in _CODE_FILES]
    for path in paths:
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


def model_key(method: str, method_config: Any, *, dataset: str, root: str | None, categories: list[str],
              val_fraction: float, seed: int, foreground: str, textures: str | None) -> ModelKey:
    inputs = {
        "method": method,
        "training_config": training_fields(method_config),
        "dataset": dataset,
        "root": str(Path(root).resolve()) if root else None,
        "categories": list(categories),
        "val_fraction": val_fraction,
        "seed": seed,
        "foreground": foreground,
        "textures": str(Path(textures).resolve()) if textures else None,
        "code_version": code_version(),
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
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key.short}-", dir=self.root))
        torch.save(state_dict, tmp / "model.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "key": key.key, "inputs": key.inputs}, indent=2, default=str))
        target = self.path(key)
        try:
            os.replace(tmp, target)
        except OSError:  # another process published the same key first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def load(self, key: ModelKey) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        path = self.path(key)
        meta = json.loads((path / "meta.json").read_text())
        return torch.load(path / "model.pt", map_location="cpu", weights_only=True), meta


@ray.remote(num_cpus=0)
class TrainingClaims:
    """Which trial is training which model key in this sweep (one actor per sweep)."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}
        self.done: set[str] = set()  # keys trained in this sweep (what retrain=true waits for)

    def claim(self, key: str, owner: str) -> str:
        """"train" if ``owner`` should train ``key``, "wait" if another trial is training
        it, "ready" if it was already trained in this sweep."""
        if key in self.done:
            return "ready"
        return "train" if self.owners.setdefault(key, owner) == owner else "wait"

    def finish(self, key: str, owner: str, ok: bool) -> None:
        """The owner stopped training ``key``: published (ok) or failed (a waiter takes over)."""
        if self.owners.get(key) == owner:
            del self.owners[key]
        if ok:
            self.done.add(key)


def claims_actor(name: str):
    """The sweep's :class:`TrainingClaims` actor, created by the driver (or, after a
    restart, found again by name). It lives as long as the driver holds the handle."""
    return TrainingClaims.options(name=name, get_if_exists=True, lifetime=None).remote()
