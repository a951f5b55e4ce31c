"""The one interface between the orchestrator and a method.

A method is an ``nn.Module`` subclass of :class:`AnomalyMethod` with

* ``Config``: a frozen dataclass whose defaults are the paper's values. Every field is
  declared with :func:`train_field` or :func:`infer_field`, which says whether changing
  it requires training a new model (the orchestrator hashes only the training fields to
  find a stored model it can reuse).
* ``PRESETS``: per-scale overrides of the config (``"paper"`` is the empty override).
* ``forward(batch) -> Losses``: one training step's losses (``forward`` so that DDP's
  gradient hooks fire when the orchestrator wraps the module).
* ``predict(images, category) -> Prediction``: anomaly map and image score.
* ``configure_optimizers() -> Optimizers``: the paper's optimiser and LR schedule.

Methods are pure PyTorch: no Ray, MLflow, orchestrator or file I/O. Things that need
files (pretrained backbone weights) are injected through ``backbone_factory``.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from torch import nn

TRAIN = "affects_training"


def train_field(default: Any, doc: str) -> Any:
    """A config field whose change needs a newly trained model (architecture, recipe)."""
    return field(default=default, metadata={TRAIN: True, "doc": doc})


def infer_field(default: Any, doc: str) -> Any:
    """A config field that only changes inference: a stored model can be reused."""
    return field(default=default, metadata={TRAIN: False, "doc": doc})


def field_docs(config_class: type) -> dict[str, tuple[bool, str]]:
    """name -> (affects_training, doc) for every field of a method config."""
    return {f.name: (bool(f.metadata.get(TRAIN, True)), f.metadata.get("doc", "")) for f in dataclasses.fields(config_class)}


def training_fields(config: Any) -> dict[str, Any]:
    """The sub-config that determines the trained weights (JSON-able values)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.metadata.get(TRAIN, True):
            out[f.name] = _plain(getattr(config, f.name))
    return out


def config_fingerprint(values: dict[str, Any]) -> str:
    """Stable sha256 of a JSON-able mapping (sorted keys)."""
    text = json.dumps({k: _plain(v) for k, v in values.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class TrainBatch:
    """What the orchestrator feeds a method's training step.

    images:     [B, 3, H, W] normal training images in [-1, 1]
    foreground: [B, 1, H, W] {0, 1}; where synthetic anomalies may be placed (all ones
                for textures)
    textures:   [B, 3, H, W] in [-1, 1]; an anomaly-appearance source image per sample
                (DTD when configured, otherwise offline texture photos)
    category:   [B] long; index of the image's category (multi-class methods)
    """

    images: torch.Tensor
    foreground: torch.Tensor
    textures: torch.Tensor
    category: torch.Tensor

    def to(self, device: torch.device | str) -> "TrainBatch":
        return TrainBatch(*(t.to(device, non_blocking=True) for t in dataclasses.astuple(self)))


class Losses(NamedTuple):
    """total: the scalar that is back-propagated; terms: its named parts (detached for logging)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class Prediction(NamedTuple):
    anomaly_map: torch.Tensor  # [B, H, W], same H, W as the input images
    image_score: torch.Tensor  # [B]


class Optimizers(NamedTuple):
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # stepped once per epoch


BackboneFactory = Callable[[str], nn.Module]


class AnomalyMethod(nn.Module, abc.ABC):
    """Base class of the four methods; see the module docstring for the contract."""

    Config: ClassVar[type]
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}}
    # True for methods that train one model over the union of a dataset's categories
    # (the unified / multi-class setting), e.g. DRDC.
    multi_class: ClassVar[bool] = False

    def __init__(self, config: Any, backbone_factory: BackboneFactory | None = None):
        super().__init__()
        self.config = config

    @abc.abstractmethod
    def forward(self, batch: TrainBatch) -> Losses:
        """One training step: the paper's losses on a batch of normal images."""

    @abc.abstractmethod
    def predict(
        self,
        images: torch.Tensor,
        category: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Anomaly maps and image scores for images [B, 3, H, W] in [-1, 1] (no grad;
        deterministic for a given generator state)."""

    @abc.abstractmethod
    def configure_optimizers(self) -> Optimizers:
        """The paper's optimiser and LR schedule for this model's parameters."""
