"""Train and evaluate a method in this process (no Ray, no MLflow): learning tests, quick
experiments and benchmarks. It sits above config and training (it resolves a preset, then
runs training's loop), so neither of those imports it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from methods import get_method
from methods.base import AnomalyMethod, BackboneFactory
from orchestrator import metrics as metric_fns
from orchestrator.config import resolve_method_config
from orchestrator.data import DataSpec
from orchestrator.training import calibrate_on_validation_normals, evaluate_split, model_groups, train_local


@dataclass
class LocalResult:
    val: dict[str, metric_fns.Metrics]
    test: dict[str, metric_fns.Metrics]
    train_seconds: float
    predict_seconds: float
    models: dict[str, AnomalyMethod]  # category (or "+"-joined categories) -> trained model


def run_local(
    method: str,
    categories: Sequence[str],
    *,
    scale: str = "smoke",
    overrides: dict[str, Any] | None = None,
    dataset: str = "synthetic",
    cache_dir: str | Path,
    data_root: str | Path | None = None,
    seed: int = 0,
    train_seed: int | None = None,
    val_fraction: float = 0.2,
    eval_batch_size: int = 16,
    backbone_factory: BackboneFactory | None = None,
    progress: bool = False,
) -> LocalResult:
    """Train and evaluate in this process (no Ray, no MLflow): one model per category,
    or one over all categories for multi-class methods. Seeded end to end: ``seed`` draws the
    validation split, ``train_seed`` (default ``seed``) the initialisation, batches and noise,
    as a sweep's ``seeds=N`` repeats do."""
    cls = get_method(method)
    data = DataSpec(dataset, str(data_root) if data_root else None, str(cache_dir), val_fraction, seed)
    device = torch.device("cpu")
    val: dict[str, metric_fns.Metrics] = {}
    test: dict[str, metric_fns.Metrics] = {}
    models: dict[str, AnomalyMethod] = {}
    train_seconds = predict_seconds = 0.0
    train_seed = seed if train_seed is None else train_seed
    for group in model_groups(cls, categories):
        config = resolve_method_config(method, scale, cls.category_overrides(group), overrides or {})
        model, datas, seconds = train_local(method, config, data, group, train_seed, device, backbone_factory, progress)
        train_seconds += seconds
        for position, d in enumerate(datas):
            calibrate_on_validation_normals(model, d, position, device)
            val[d.category] = evaluate_split(model, d.val_images, d.val_masks, d.val_labels, position, eval_batch_size, train_seed, device).metrics
            result = evaluate_split(model, d.test_images, d.test_masks, d.test_labels, position, eval_batch_size, train_seed, device)
            test[d.category] = result.metrics
            predict_seconds += result.prediction.seconds
        models["+".join(group)] = model
    return LocalResult(val, test, train_seconds, predict_seconds, models)
