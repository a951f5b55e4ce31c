"""Training and evaluation of one method on cached category data — no Ray, no MLflow.

The same functions run inside a Ray Train worker (orchestrator/trial.py adds DDP,
checkpoints and reporting around them) and in-process (:func:`run_local`, used by the
learning tests and for quick experiments).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from methods import get_method
from methods.base import AnomalyMethod, BackboneFactory, Optimizers, TrainBatch
from orchestrator import metrics as metric_fns
from orchestrator.config import resolve_method_config
from orchestrator.data import CategoryData, Preprocess, load_category, texture_bank, to_unit_range

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """The union of the training splits a model is trained on (one category, or several
    for multi-class methods), kept as uint8 to stay small in memory."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    foreground: torch.Tensor  # uint8 [N, 1, H, W]
    category: torch.Tensor  # long [N], index into the trial's category list
    textures: torch.Tensor  # float [K, 3, H, W] in [-1, 1], anomaly-appearance sources

    def __len__(self) -> int:
        return self.images.shape[0]


def preprocess_of(method_config: Any) -> Preprocess:
    return Preprocess(image_size=method_config.image_size, crop_size=method_config.crop_size)


def load_data(
    dataset: str,
    categories: Sequence[str],
    method_config: Any,
    *,
    root: str | Path | None,
    cache_dir: str | Path,
    val_fraction: float,
    seed: int,
    foreground: str = "auto",
    textures: str | Path | None = None,
) -> list[CategoryData]:
    preprocess = preprocess_of(method_config)
    return [
        load_category(dataset, c, preprocess, root=root, cache_dir=cache_dir, val_fraction=val_fraction, seed=seed,
                      foreground=foreground, textures=textures)
        for c in categories
    ]


def training_data(datas: Sequence[CategoryData], textures: torch.Tensor) -> TrainingData:
    return TrainingData(
        images=torch.cat([torch.from_numpy(np.array(d.train_images)) for d in datas]),
        foreground=torch.cat([torch.from_numpy(np.array(d.train_foreground)) for d in datas]),
        category=torch.cat([torch.full((len(d.train_images),), i, dtype=torch.long) for i, d in enumerate(datas)]),
        textures=textures,
    )


def default_backbone_factory(name: str) -> nn.Module:
    """Pretrained feature extractors from local weight files (imported lazily: only
    methods with a backbone pay for it)."""
    from orchestrator.pretrained import load_backbone

    return load_backbone(name)


def build_model(method: str, method_config: Any, backbone_factory: BackboneFactory | None) -> AnomalyMethod:
    return get_method(method)(method_config, backbone_factory)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    """Index batches for one epoch: one permutation shared by all ranks (seeded by
    epoch), each rank taking its strided share of every global batch. Incomplete final
    batches are dropped when at least one full batch exists (BatchNorm heads need >1)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    per_rank = max(1, batch_size // world_size)
    global_batch = per_rank * world_size
    stop = n - n % global_batch if n >= global_batch else n
    for start in range(0, stop, global_batch):
        chunk = order[start : start + global_batch]
        yield chunk[rank::world_size]


def make_batch(data: TrainingData, index: torch.Tensor, device: torch.device) -> TrainBatch:
    """A TrainBatch for the given sample indices; textures drawn from the bank at random."""
    texture_index = torch.randint(0, data.textures.shape[0], (len(index),))
    return TrainBatch(
        images=to_unit_range(data.images[index]),
        foreground=data.foreground[index].float(),
        textures=data.textures[texture_index],
        category=data.category[index],
    ).to(device)


def train_epoch(
    model: nn.Module,
    optimizers: Optimizers,
    data: TrainingData,
    batch_size: int,
    epoch: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """One pass over the training data; returns the mean of each loss term."""
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    for index in epoch_batches(len(data), batch_size, epoch, seed, rank, world_size):
        losses = model(make_batch(data, index, device))
        optimizers.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizers.optimizer.step()
        for name, value in {"loss": losses.total, **losses.terms}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        steps += 1
    if optimizers.scheduler is not None:
        optimizers.scheduler.step()
    return {k: v / max(steps, 1) for k, v in sums.items()}


def unwrap(model: nn.Module) -> AnomalyMethod:
    return model.module if hasattr(model, "module") else model  # DDP


@dataclass
class SplitPrediction:
    maps: np.ndarray  # float32 [N, H, W]
    scores: np.ndarray  # float32 [N]
    seconds: float  # wall time of the batched predict calls


def predict_split(
    model: AnomalyMethod,
    images: np.ndarray,
    category_index: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> SplitPrediction:
    """Run ``predict`` over uint8 images [N, 3, H, W] in batches with a seeded generator."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    maps, scores = [], []
    start = time.perf_counter()
    for lo in tqdm(range(0, len(images), batch_size), desc="predict", disable=not progress, leave=False):
        chunk = to_unit_range(np.ascontiguousarray(images[lo : lo + batch_size])).to(device)
        category = torch.full((len(chunk),), category_index, dtype=torch.long, device=device)
        out = model.predict(chunk, category=category, generator=generator)
        maps.append(out.anomaly_map.float().cpu().numpy())
        scores.append(out.image_score.float().cpu().numpy())
    seconds = time.perf_counter() - start
    return SplitPrediction(np.concatenate(maps), np.concatenate(scores), seconds)


def measure_latency(model: AnomalyMethod, images: np.ndarray, category_index: int, count: int, seed: int, device: torch.device) -> float:
    """Mean seconds per image at batch size 1 over ``count`` images, after one warm-up call."""
    count = max(1, min(count, len(images)))
    predict_split(model, images[:1], category_index, 1, seed, device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = predict_split(model, images[:count], category_index, 1, seed, device)
    return result.seconds / count


@dataclass
class SplitResult:
    metrics: metric_fns.Metrics
    prediction: SplitPrediction


def evaluate_split(
    model: AnomalyMethod,
    images: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    category_index: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> SplitResult:
    prediction = predict_split(model, images, category_index, batch_size, seed, device, progress)
    metrics = metric_fns.evaluate(labels, prediction.scores, masks, prediction.maps)
    return SplitResult(metrics, prediction)


def fit(
    model: nn.Module,
    data: TrainingData,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    *,
    optimizers: Optimizers | None = None,
    start_epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> None:
    """Train ``epochs`` epochs from ``start_epoch`` (a resumed run passes its restored
    optimiser and the next epoch)."""
    optimizers = optimizers or unwrap(model).configure_optimizers()
    bar = tqdm(range(start_epoch, epochs), desc="train", disable=not progress or rank != 0, initial=start_epoch, total=epochs)
    for epoch in bar:
        terms = train_epoch(model, optimizers, data, batch_size, epoch, seed, device, rank, world_size)
        bar.set_postfix(loss=f"{terms.get('loss', float('nan')):.4f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, terms)


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
    val_fraction: float = 0.2,
    eval_batch_size: int = 16,
    backbone_factory: BackboneFactory | None = None,
    progress: bool = False,
) -> LocalResult:
    """Train and evaluate in this process (no Ray, no MLflow): one model per category,
    or one over all categories for multi-class methods. Seeded end to end."""
    cls = get_method(method)
    overrides = dict(overrides or {})
    if cls.multi_class:
        overrides.setdefault("num_categories", len(categories))
    config = resolve_method_config(method, scale, overrides)
    datas = load_data(dataset, categories, config, root=data_root, cache_dir=cache_dir, val_fraction=val_fraction, seed=seed)
    textures = texture_bank(datas[0].train_images.shape[-1], cache_dir=cache_dir)
    device = torch.device("cpu")
    groups = [list(range(len(datas)))] if cls.multi_class else [[i] for i in range(len(datas))]

    val: dict[str, metric_fns.Metrics] = {}
    test: dict[str, metric_fns.Metrics] = {}
    models: dict[str, AnomalyMethod] = {}
    train_seconds = predict_seconds = 0.0
    for group in groups:
        torch.manual_seed(seed)
        model = build_model(method, config, backbone_factory or default_backbone_factory).to(device)
        start = time.perf_counter()
        fit(model, training_data([datas[i] for i in group], textures), config.epochs, config.batch_size, seed, device, progress=progress)
        train_seconds += time.perf_counter() - start
        for position, i in enumerate(group):
            d = datas[i]
            val[d.category] = evaluate_split(model, d.val_images, d.val_masks, d.val_labels, position, eval_batch_size, seed, device).metrics
            result = evaluate_split(model, d.test_images, d.test_masks, d.test_labels, position, eval_batch_size, seed, device)
            test[d.category] = result.metrics
            predict_seconds += result.prediction.seconds
        models["+".join(datas[i].category for i in group)] = model
    return LocalResult(val, test, train_seconds, predict_seconds, models)
