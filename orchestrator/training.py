"""Training and evaluation of one method on cached category data — no Ray, no MLflow.

:func:`fit` is the one training loop: the Ray Train worker (orchestrator/ray_backend.py,
which adds DDP, checkpoints and reporting through ``on_epoch_end``), the in-process
:func:`train_local` (orchestrator/local.py's run_local, learning tests, benchmarks) all run it.
:func:`evaluate_model` is the one evaluation: validation and test metrics, batched
throughput, batch-1 latency and sample maps, as a typed :class:`ModelEvaluation`.
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
from methods.base import AnomalyMethod, BackboneFactory, MethodConfig, Optimizers, TrainBatch
from orchestrator import metrics as metric_fns
from orchestrator.data import CategoryData, DataSpec, Preprocess, to_unit_range
from orchestrator.results import METRICS, CategoryEvaluation, ModelEvaluation, mean_metrics, metric_name
from orchestrator.visualize import save_sample_maps

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """The union of the training splits a model is trained on (one category, or several
    for multi-class methods), kept as uint8 to stay small in memory."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    foreground: torch.Tensor  # uint8 [N, 1, H, W]
    category: torch.Tensor  # long [N], index into the model's category list
    textures: torch.Tensor  # float [K, 3, H, W] in [-1, 1], anomaly-appearance sources

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class EvaluationSettings:
    batch_size: int = 16  # images per predict() call
    seed: int = 0  # seeds the predict() generator
    latency_images: int = 4  # images timed one at a time for batch-1 latency
    sample_maps: int = 4  # anomaly-map PNGs saved per category


def preprocess_of(method_config: MethodConfig) -> Preprocess:
    return Preprocess(image_size=method_config.image_size, crop_size=method_config.crop_size)


def load_datas(data: DataSpec, categories: Sequence[str], method_config: MethodConfig) -> list[CategoryData]:
    """Each category preprocessed as the method config asks (decoded once, then cached)."""
    preprocess = preprocess_of(method_config)
    return [data.load(c, preprocess) for c in categories]


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


def build_model(method: str, method_config: MethodConfig, backbone_factory: BackboneFactory | None = default_backbone_factory) -> AnomalyMethod:
    return get_method(method)(method_config, backbone_factory)


# ------------------------------------------------------------------------------ training


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


def train_epoch(model: nn.Module, optimizers: Optimizers | None, data: TrainingData, batch_size: int, epoch: int, seed: int,
                device: torch.device, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """One pass over the training data; returns the mean of each loss term. Without
    optimisers (a method with nothing to train by gradient descent) ``forward`` runs
    without gradients, e.g. to fill a memory bank."""
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    for index in epoch_batches(len(data), batch_size, epoch, seed, rank, world_size):
        with torch.set_grad_enabled(optimizers is not None):
            losses = model(make_batch(data, index, device))
        if optimizers is not None:
            optimizers.optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizers.optimizer.step()
            if optimizers.scheduler is not None and optimizers.scheduler_per_batch:
                optimizers.scheduler.step()
        for name, value in {"loss": losses.total, **losses.terms}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        steps += 1
    if optimizers is not None and optimizers.scheduler is not None and not optimizers.scheduler_per_batch:
        optimizers.scheduler.step()
    return {k: v / max(steps, 1) for k, v in sums.items()}


EpochHook = Callable[[int, dict[str, float], float], None]  # (epochs done, mean loss terms, train seconds so far)


def fit(model: nn.Module, optimizers: Optimizers | None, data: TrainingData, config: MethodConfig, seed: int, device: torch.device, *,
        start_epoch: int = 0, train_seconds: float = 0.0, rank: int = 0, world_size: int = 1,
        on_epoch_end: EpochHook | None = None, progress: bool = False) -> float:
    """The training loop: ``config.epochs`` epochs from ``start_epoch`` (a resumed run
    passes its restored optimiser state and the next epoch). Returns the seconds spent in
    training epochs, ``train_seconds`` included."""
    bar = tqdm(range(start_epoch, config.epochs), desc="train", disable=not progress or rank != 0,
               initial=start_epoch, total=config.epochs)
    for epoch in bar:
        start = time.perf_counter()
        terms = train_epoch(model, optimizers, data, config.batch_size, epoch, seed, device, rank, world_size)
        train_seconds += time.perf_counter() - start
        bar.set_postfix(loss=f"{terms.get('loss', float('nan')):.4f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, terms, train_seconds)
    return train_seconds


# ---------------------------------------------------------------------------- evaluation


@dataclass
class SplitPrediction:
    maps: np.ndarray  # float32 [N, H, W]
    scores: np.ndarray  # float32 [N]
    seconds: float  # wall time of the batched predict calls (the slowest rank's, when sharded)


@dataclass(frozen=True)
class Shard:
    """This process's part of an evaluation: DDP rank ``rank`` of ``world_size`` predicts
    every ``world_size``-th batch, and :meth:`gather` collects every rank's part (through
    ``torch.distributed``, which Ray Train sets up), so no rank idles while one evaluates."""

    rank: int = 0
    world_size: int = 1

    def batches(self, count: int) -> range:
        return range(self.rank, count, self.world_size)

    def gather(self, part: Any) -> list[Any]:
        """Every rank's ``part``, in rank order (just ``[part]`` without DDP)."""
        if self.world_size == 1:
            return [part]
        parts: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(parts, part)
        return parts


def batch_seed(seed: int, index: int) -> int:
    """The generator seed of batch ``index``: one per batch, so a prediction does not
    depend on which rank (or how many) computed the other batches; batch 0 keeps ``seed``."""
    return seed + 1_000_003 * index


def predict_split(model: AnomalyMethod, images: np.ndarray, category_index: int, batch_size: int, seed: int,
                  device: torch.device, progress: bool = False, shard: Shard = Shard()) -> SplitPrediction:
    """Run ``predict`` over uint8 images [N, 3, H, W] in batches, each with its own seeded
    generator (:func:`batch_seed`); with a DDP ``shard`` each rank predicts its batches and
    every rank returns the whole split."""
    count = (len(images) + batch_size - 1) // batch_size
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    start = time.perf_counter()
    for index in tqdm(shard.batches(count), desc="predict", disable=not progress, leave=False):
        lo = index * batch_size
        chunk = to_unit_range(np.ascontiguousarray(images[lo : lo + batch_size])).to(device)
        category = torch.full((len(chunk),), category_index, dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(batch_seed(seed, index))
        out = model.predict(chunk, category=category, generator=generator)
        parts[index] = (out.anomaly_map.float().cpu().numpy(), out.image_score.float().cpu().numpy())
    seconds = time.perf_counter() - start
    gathered = shard.gather((parts, seconds))
    merged = {i: p for rank_parts, _ in gathered for i, p in rank_parts.items()}
    ordered = [merged[i] for i in range(count)]
    return SplitPrediction(np.concatenate([m for m, _ in ordered]), np.concatenate([s for _, s in ordered]),
                           max(sec for _, sec in gathered))


def measure_latency(model: AnomalyMethod, images: np.ndarray, category_index: int, count: int, seed: int, device: torch.device,
                    shard: Shard = Shard()) -> float:
    """Mean seconds per image at batch size 1 over ``count`` images, each rank timing its
    share after one warm-up call."""
    count = max(1, min(count, len(images)))
    mine = [i for i in range(count) if i % shard.world_size == shard.rank]
    total = 0.0
    if mine:
        predict_split(model, images[mine[0] : mine[0] + 1], category_index, 1, seed, device)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = predict_split(model, images[mine], category_index, 1, seed, device).seconds
    return sum(shard.gather(total)) / count


@dataclass
class SplitResult:
    metrics: metric_fns.Metrics
    prediction: SplitPrediction


def calibrate_on_validation_normals(model: AnomalyMethod, data: CategoryData, category_index: int, device: torch.device) -> None:
    """``model.calibrate`` with the category's held-out validation normals (label 0),
    converted as :func:`predict_split` converts images. Test images are never used. Under
    DDP every rank calibrates on all of them (the same statistics on every rank)."""
    normals = data.val_images[data.val_labels == 0]
    images = to_unit_range(np.ascontiguousarray(normals)).to(device)
    model.calibrate(images, torch.full((len(images),), category_index, dtype=torch.long, device=device))


def evaluate_split(model: AnomalyMethod, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, category_index: int,
                   batch_size: int, seed: int, device: torch.device, progress: bool = False, shard: Shard = Shard()) -> SplitResult:
    prediction = predict_split(model, images, category_index, batch_size, seed, device, progress, shard)
    return SplitResult(metric_fns.evaluate(labels, prediction.scores, masks, prediction.maps), prediction)


def validate(model: AnomalyMethod, datas: Sequence[CategoryData], settings: EvaluationSettings, device: torch.device,
             shard: Shard = Shard()) -> dict[str, float]:
    """Validation metrics averaged over the model's categories (the tuning signal during training)."""
    per_category = []
    for i, d in enumerate(datas):
        calibrate_on_validation_normals(model, d, i, device)
        per_category.append(evaluate_split(model, d.val_images, d.val_masks, d.val_labels, i, settings.batch_size, settings.seed, device,
                                           shard=shard).metrics)
    mean = mean_metrics(per_category)
    return {metric_name("val", m): getattr(mean, m) for m in METRICS}


def evaluate_category(model: AnomalyMethod, data: CategoryData, index: int, settings: EvaluationSettings, device: torch.device,
                      sample_dir: Path | None, shard: Shard = Shard()) -> CategoryEvaluation:
    """Validation and test metrics, throughput, batch-1 latency and sample maps (saved
    under ``sample_dir`` by rank 0) of a model on one of its categories (``index`` in the
    model's category list)."""
    s = settings
    calibrate_on_validation_normals(model, data, index, device)  # before any predict on this category
    val = evaluate_split(model, data.val_images, data.val_masks, data.val_labels, index, s.batch_size, s.seed, device, shard=shard)
    test = evaluate_split(model, data.test_images, data.test_masks, data.test_labels, index, s.batch_size, s.seed, device, shard=shard)
    latency = measure_latency(model, data.test_images, index, s.latency_images, s.seed, device, shard)
    maps = save_sample_maps(sample_dir, data.category, data.test_images, test.prediction.maps, data.test_masks, data.test_labels,
                            s.sample_maps) if sample_dir is not None and shard.rank == 0 else []
    return CategoryEvaluation(category=data.category, val=val.metrics, test=test.metrics,
                              images_per_second=len(data.test_images) / test.prediction.seconds,
                              latency_ms=1000 * latency, sample_maps=maps)


def evaluate_model(model: AnomalyMethod, datas: Sequence[CategoryData], settings: EvaluationSettings, device: torch.device,
                   sample_dir: Path | None, train_seconds: float, shard: Shard = Shard()) -> ModelEvaluation:
    """:func:`evaluate_category` for each of the model's categories."""
    return ModelEvaluation(categories=[evaluate_category(model, d, i, settings, device, sample_dir, shard) for i, d in enumerate(datas)],
                           train_seconds=train_seconds)


# ------------------------------------------------------------------------- in-process training


def model_groups(method_cls: type[AnomalyMethod], categories: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """The category groups that get one model each: all together for a multi-class
    method, else one per category."""
    return (tuple(categories),) if method_cls.multi_class else tuple((c,) for c in categories)


def train_local(method: str, config: MethodConfig, data: DataSpec, categories: Sequence[str], train_seed: int, device: torch.device,
                backbone_factory: BackboneFactory | None = None, progress: bool = False) -> tuple[AnomalyMethod, list[CategoryData], float]:
    """Train one model on ``categories``' training images in this process (no Ray, no
    MLflow), seeded by ``train_seed``; returns it, the categories' data and the seconds."""
    datas = load_datas(data, categories, config)
    textures = data.texture_bank(datas[0].train_images.shape[-1])
    torch.manual_seed(train_seed)
    model = build_model(method, config, backbone_factory or default_backbone_factory).to(device)
    seconds = fit(model, model.configure_optimizers(), training_data(datas, textures), config, train_seed, device, progress=progress)
    return model, datas, seconds
