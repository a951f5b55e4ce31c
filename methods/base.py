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
* Facts the orchestrator, benches and reports read from the class, each optional with a
  default that says "nothing declared" (the class attributes below): the paper's
  ``paper_seconds_per_image``, ``paper_speed``, ``paper_parameters`` and
  ``paper_backbone``, bench.generality's ``selection_grid``, :meth:`AnomalyMethod.minimal_sampling`
  and ``renamed_fields``. They live here, on the method, so that a new method touches no
  bench (docs/architecture.md, "How to add a method").

Methods are pure PyTorch: no Ray, MLflow, orchestrator or file I/O. Things that need
files (pretrained backbone weights) are injected through ``backbone_factory``.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import torch
from torch import nn

# The config half of the contract lives in methods/fields.py (no torch: the command line
# reads it before torch loads); re-exported here, where a method author looks for it.
from methods.fields import (  # noqa: F401
    TRAIN, MethodConfig, MultiClassConfig, check, coerce_enum, config_fingerprint, field_docs, infer_field, train_field, training_fields,
)

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
    # Config fields renamed since runs were logged: old name -> today's. Reports read a run
    # of this method logged under an old name as if logged under the new one.
    renamed_fields: ClassVar[dict[str, str]] = {}
    # The paper's speed as the paper states it (its hardware and settings), shown beside bench.gpu's timings.
    paper_speed: ClassVar[str] = "not reported"
    # What the paper states about the model's size, shown beside bench.paper_scale's parameter counts.
    paper_parameters: ClassVar[str] = "not stated"
    # The paper's backbone, for a config with a ``backbone`` field (None: none named); a bench that cannot load it falls back.
    paper_backbone: ClassVar[str | None] = None
    # bench.generality's selection candidates (config overrides), the preset {} first; default: the preset alone.
    selection_grid: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    def __init__(self, config: MethodConfig, backbone_factory: BackboneFactory | None = None):
        super().__init__()
        self.config = config

    @classmethod
    def category_overrides(cls, categories: Sequence[str]) -> dict[str, Any]:
        """Config fields set from the categories one model is trained on."""
        return {"num_categories": len(categories)} if cls.multi_class else {}

    @classmethod
    def minimal_sampling(cls, config: MethodConfig) -> dict[str, Any]:
        """Config overrides (inference fields) with the fewest sampling steps/samples the
        method allows, derived from ``config``; ``{}`` when nothing can be reduced (the
        default). bench.paper_scale times inference with them, bench.gpu with ``--fast``."""
        return {}

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
