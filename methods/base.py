"""The one interface between the orchestrator and a method: everything the orchestrator
may use is declared here.

A method is an ``nn.Module`` subclass of :class:`AnomalyMethod` with

* ``Config``: a frozen dataclass deriving from :class:`MethodConfig` whose defaults are
  the paper's values. Every field is declared with :func:`train_field` or
  :func:`infer_field`, which says whether changing it requires training a new model (the
  orchestrator hashes only the training fields to find a stored model it can reuse).
  :class:`MethodConfig` holds the fields the orchestrator reads (image size, crop,
  epochs, batch size, learning rate); a multi-class method derives its config from
  :class:`MultiClassConfig` and the orchestrator fills ``num_categories`` through
  :meth:`AnomalyMethod.category_overrides`.
* ``PRESETS``: per-scale overrides of the config (``"paper"`` is the empty override).
* ``forward(batch) -> Losses``: one training step's losses (``forward`` so that DDP's
  gradient hooks fire when the orchestrator wraps the module).
* ``predict(images, category, generator) -> Prediction``: a template (eval mode, no
  grad, one generator rule) around the method's own :meth:`AnomalyMethod.infer`.
* ``calibrate(normal_images, category)`` (optional; default: nothing): statistics an
  inference setting needs from normal images (MDPS: η of Eq. 18, the min/max of Eq. 20).
  The orchestrator calls it at evaluation time, after training or loading, once per
  category with that category's held-out *validation* normal images (never test
  images), before any ``predict`` on that category. What it computes goes into buffers
  (``register_buffer``, non-persistent: evaluation state, not trained weights), so it
  follows the model across devices; a multi-category model indexes them by ``category``.
* ``configure_optimizers() -> Optimizers | None``: the paper's optimiser and LR
  schedule, or ``None`` for a method with nothing to train by gradient descent. Then the
  training loop runs ``forward`` without gradients over the training data (to fill a
  memory bank, say), builds no optimiser and wraps nothing in DDP.
* ``training_synthesis``: the names of the anomaly generators the method trains on
  (e.g. ``("perlin_texture", "perlin_shuffled_patches")`` for methods/anomaly_synthesis.py),
  ``()`` for a method that never sees a synthetic anomaly. The validation split's defects
  (orchestrator/data/validation_defects.py) must be none of these, or validation would
  only measure whether a model finds its own augmentation (tests/test_validation_defects.py).

Methods are pure PyTorch: no Ray, MLflow, orchestrator or file I/O. Things that need
files (pretrained backbone weights) are injected through ``backbone_factory``.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import torch
from torch import nn

TRAIN = "affects_training"


def train_field(default: Any, doc: str) -> Any:
    """A config field whose change needs a newly trained model (architecture, recipe)."""
    return field(default=default, metadata={TRAIN: True, "doc": doc})


def infer_field(default: Any, doc: str) -> Any:
    """A config field that only changes inference: a stored model can be reused."""
    return field(default=default, metadata={TRAIN: False, "doc": doc})


def check(ok: bool, message: str) -> None:
    """The one validation idiom of method configs: a ValueError with a one-line message
    naming the field, the valid range and the value (the orchestrator shows it as is)."""
    if not ok:
        raise ValueError(message)


def coerce_enum(kind: type[Enum], name: str, value: Any) -> Enum:
    """``value`` (an enum member or its string value) as a member of ``kind``."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {', '.join(str(k.value) for k in kind)}, got {value!r}") from None


@dataclass(frozen=True)
class MethodConfig:
    """The fields every method has, and the only ones the orchestrator reads.

    ``__post_init__`` coerces enum fields from their string values and lists to tuples
    (OmegaConf hands both over in their plain form), then calls :meth:`validate`, which
    subclasses extend (calling ``super().validate()`` first).
    """

    image_size: int = train_field(256, "resize side in pixels")
    crop_size: int | None = train_field(None, "centre-crop side after resizing; None = no crop")
    epochs: int = train_field(1, "training epochs (0 = nothing to train)")
    batch_size: int = train_field(8, "global batch size (over all DDP workers)")
    learning_rate: float = train_field(1e-4, "learning rate of the main optimiser")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            if isinstance(kind, type) and issubclass(kind, Enum):
                object.__setattr__(self, f.name, coerce_enum(kind, f.name, value))
            elif isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        check(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        check(self.crop_size is None or 1 <= self.crop_size <= self.image_size,
              f"crop_size must be None or in [1, image_size={self.image_size}], got {self.crop_size}")
        check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")

    @property
    def input_size(self) -> int:
        """Side of the images the network sees (after the optional centre crop)."""
        return self.crop_size if self.crop_size is not None else self.image_size


@dataclass(frozen=True)
class MultiClassConfig(MethodConfig):
    """Config of a method that trains one model over several categories at once."""

    num_categories: int = train_field(1, "categories trained together (set by the orchestrator from the category list)")

    def validate(self) -> None:
        super().validate()
        check(self.num_categories >= 1, f"num_categories must be >= 1, got {self.num_categories}")


def field_docs(config_class: type) -> dict[str, tuple[bool, str]]:
    """name -> (affects_training, doc) for every field of a method config."""
    return {f.name: (bool(f.metadata.get(TRAIN, True)), f.metadata.get("doc", "")) for f in dataclasses.fields(config_class)}


def training_fields(config: MethodConfig) -> dict[str, Any]:
    """The sub-config that determines the trained weights (JSON-able values)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.metadata.get(TRAIN, True)}


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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # stepped once per epoch, or per batch:
    scheduler_per_batch: bool = False  # True: step after every optimizer step (e.g. DiffusionAD's official cosine)


BackboneFactory = Callable[[str], nn.Module]


class AnomalyMethod(nn.Module, abc.ABC):
    """Base class of every method; see the module docstring for the contract."""

    Config: ClassVar[type[MethodConfig]]
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}}
    # True for methods that train one model over the union of a dataset's categories
    # (the unified / multi-class setting), e.g. DRDC. Their Config is a MultiClassConfig.
    multi_class: ClassVar[bool] = False
    # Names of the anomaly generators the method trains on (see the module docstring).
    training_synthesis: ClassVar[tuple[str, ...]] = ()
    # Seconds per image of inference that the paper reports for its own setting (None: not
    # reported); the orchestrator's timing model uses it where nothing was measured.
    paper_seconds_per_image: ClassVar[float | None] = None

    def __init__(self, config: MethodConfig, backbone_factory: BackboneFactory | None = None):
        super().__init__()
        self.config = config

    @classmethod
    def category_overrides(cls, categories: Sequence[str]) -> dict[str, Any]:
        """Config fields set from the categories one model is trained on."""
        return {"num_categories": len(categories)} if cls.multi_class else {}

    @abc.abstractmethod
    def forward(self, batch: TrainBatch) -> Losses:
        """One training step: the paper's losses on a batch of normal images."""

    @abc.abstractmethod
    def configure_optimizers(self) -> Optimizers | None:
        """The paper's optimiser and LR schedule, or None when nothing is trained by
        gradient descent."""

    @abc.abstractmethod
    def infer(self, images: torch.Tensor, category: torch.Tensor | None, generator: torch.Generator) -> Prediction:
        """The method's inference on images [B, 3, H, W] in [-1, 1]; called by
        :meth:`predict` in eval mode, without gradients, with a generator on the images'
        device that every random draw must use."""

    def calibrate(self, normal_images: torch.Tensor, category: torch.Tensor | None) -> None:
        """Inference statistics from held-out normal images [N, 3, H, W] in [-1, 1] of one
        category (``category`` [N] long, or None); see the module docstring. Default:
        nothing to calibrate."""

    def predict(
        self,
        images: torch.Tensor,
        category: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Anomaly maps and image scores. Deterministic: without a generator one seeded
        with 0 is used, so two calls on the same images agree."""
        if generator is None:
            generator = torch.Generator(device=images.device).manual_seed(0)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.infer(images, category, generator)
        finally:
            self.train(was_training)
