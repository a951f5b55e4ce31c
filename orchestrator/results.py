"""Typed results, and every metric name derived from one definition.

An evaluation travels as dataclasses: the training worker (or the evaluation task)
builds a :class:`ModelEvaluation` per trained model, the trial combines them into a
:class:`TrialResult`, and the MLflow recorder logs exactly what :meth:`TrialResult.metrics`
names. The one place a result is plain data is the Ray Tune boundary, where it is
reported as flat numbers (what Tune's search and schedulers read) plus the whole
result as JSON (:meth:`TrialResult.to_json`, read back with :meth:`TrialResult.from_json`).

Metric names: ``<split>_<metric>`` (``val_image_auroc``, ``test_aupro``), per category
``<split>_<metric>/<category>``; ``train_<loss term>`` during training.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.metrics import Metrics

METRICS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Metrics))  # image_auroc, pixel_auroc, aupro, pixel_ap
SPLITS = ("val", "test")
VALIDATION_METRICS: tuple[str, ...] = tuple(f"val_{m}" for m in METRICS)  # what a sweep may optimise
TRAIN_PREFIX = "train_"
# Numbers a trial reports besides the split metrics (MLflow metric names).
TIMING_METRICS = ("images_per_second", "latency_ms", "model_train_seconds", "models_trained", "trial_seconds")
PROGRESS_METRICS = ("epoch", "train_seconds")


def metric_name(split: str, metric: str, category: str | None = None) -> str:
    return f"{split}_{metric}" + (f"/{category}" if category else "")


def is_metric(key: str) -> bool:
    """Whether a reported key is one of ours (Tune adds bookkeeping keys of its own)."""
    base = key.split("/", 1)[0]
    return (base in TIMING_METRICS or base in PROGRESS_METRICS or base.startswith(TRAIN_PREFIX)
            or any(base == metric_name(s, m) for s in SPLITS for m in METRICS))


def mean_metrics(per_category: list[Metrics]) -> Metrics:
    return Metrics(**{m: float(np.mean([getattr(x, m) for x in per_category])) for m in METRICS})


@dataclass
class CategoryEvaluation:
    """One category's evaluation of one model."""

    category: str
    val: Metrics
    test: Metrics
    images_per_second: float  # batched inference on the test split
    latency_ms: float  # batch-1 inference
    sample_maps: list[str]  # PNG paths (input | map | ground truth)


@dataclass
class ModelEvaluation:
    """One trained model evaluated on each category it was trained on."""

    categories: list[CategoryEvaluation]
    train_seconds: float
    losses: list[dict[str, float]] = dataclasses.field(default_factory=list)  # the training's loss terms per epoch ({"epoch": 1, "loss": ...})

    def validation(self) -> dict[str, float]:
        """The Tune signal: validation metrics averaged over the model's categories."""
        mean = mean_metrics([c.val for c in self.categories])
        return {metric_name("val", m): getattr(mean, m) for m in METRICS}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelEvaluation":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelEvaluation":
        return cls(categories=[CategoryEvaluation(**{**c, "val": Metrics(**c["val"]), "test": Metrics(**c["test"])}) for c in raw["categories"]],
                   train_seconds=raw["train_seconds"], losses=raw.get("losses", []))


@dataclass
class TrialResult:
    """Everything one trial measured: one ModelEvaluation per model it needed."""

    models: list[ModelEvaluation]
    model_keys: list[str]
    models_trained: int

    @property
    def categories(self) -> list[CategoryEvaluation]:
        return [c for m in self.models for c in m.categories]

    @property
    def sample_maps(self) -> list[str]:
        return [p for c in self.categories for p in c.sample_maps]

    def metrics(self) -> dict[str, float]:
        """Means over categories, one entry per category when there are several, timings."""
        cats = self.categories
        out: dict[str, float] = {}
        for split in SPLITS:
            values = [getattr(c, split) for c in cats]
            mean = mean_metrics(values)
            for m in METRICS:
                out[metric_name(split, m)] = getattr(mean, m)
                if len(cats) > 1:
                    out.update({metric_name(split, m, c.category): float(getattr(v, m)) for c, v in zip(cats, values)})
        out["images_per_second"] = float(np.mean([c.images_per_second for c in cats]))
        out["latency_ms"] = float(np.mean([c.latency_ms for c in cats]))
        out["model_train_seconds"] = float(sum(m.train_seconds for m in self.models))
        out["models_trained"] = float(self.models_trained)
        return out

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrialResult":
        raw = json.loads(text)
        return cls(models=[ModelEvaluation.from_dict(m) for m in raw["models"]], model_keys=raw["model_keys"],
                   models_trained=raw["models_trained"])


def tune_report(result: TrialResult) -> dict[str, Any]:
    """What a finished trial reports to Tune: its numbers, plus the whole result as JSON."""
    return {**result.metrics(), "model_keys": ",".join(result.model_keys), "result": result.to_json(), "done": True}
