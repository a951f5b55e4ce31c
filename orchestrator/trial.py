"""One Ray Tune trial: (train if needed, through Ray Train) -> evaluate -> report.

Ray is touched here and in orchestrator/sweep.py only. The pattern is Ray 2.60's
Train V2 one (FACTS.md): the Tune *function trainable* is the Train driver; it builds a
``TorchTrainer`` whose run name is the model key, so a restarted trial (or a resumed
sweep) continues that training run from its last checkpoint instead of restarting.

Train once, evaluate many: the trial resolves its method config, computes the model
key of its training fields (orchestrator/store.py) and trains only if no stored model
has that key — and only if no other trial is already training it. Evaluation
(validation + test split + timings + sample maps) runs where the model already is: in
the training worker right after its last epoch when the trial trained it, else as a Ray
task holding the trial's CPU/GPU resources, so inference-only trials cost seconds, not
a TorchTrainer start-up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from methods import get_method
from orchestrator import training
from orchestrator.config import Settings, resolve_method_config
from orchestrator.data import texture_bank
from orchestrator.search_space import SearchSpace
from orchestrator.store import ModelKey, ModelStore, model_key
from orchestrator.visualize import save_sample_maps

log = logging.getLogger(__name__)

METRIC_NAMES = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs besides its sampled axis values (shared by all trials)."""

    space: SearchSpace
    settings: Settings
    method_overrides: dict[str, Any]  # method.* from the command line
    categories: tuple[str, ...]
    scale: str
    claims_actor: str  # name of the sweep's TrainingClaims actor
    storage_path: str  # absolute
    artifact_dir: str  # absolute; sample maps land in <artifact_dir>/<trial_id>/


def axis_overrides(space: SearchSpace, config: dict[str, Any]) -> dict[str, Any]:
    """The method-field overrides a trial's Tune config stands for."""
    if space.conditions:
        return space.condition(config["condition"])
    if "point" in config:  # grid search: one valid grid point
        return dict(config["point"])
    return {a.name: config[a.name] for a in space.axes}  # Optuna: one sampled value per axis


def trial_method_config(spec: TrialSpec, config: dict[str, Any]) -> Any:
    cls = get_method(spec.space.method)
    extra = {"num_categories": len(spec.categories)} if cls.multi_class else {}
    return resolve_method_config(spec.space.method, spec.scale, spec.space.fixed, spec.method_overrides, extra, axis_overrides(spec.space, config))


def model_groups(spec: TrialSpec, config: dict[str, Any]) -> list[list[str]]:
    """The models this trial needs: one over all categories (multi-class), else one per
    category — the trial's own category in a per-category grid, or every category."""
    if get_method(spec.space.method).multi_class:
        return [list(spec.categories)]
    if "category" in config:
        return [[config["category"]]]
    return [[c] for c in spec.categories]


def key_for(spec: TrialSpec, method_config: Any, categories: list[str]) -> ModelKey:
    s = spec.settings
    return model_key(spec.space.method, method_config, dataset=s.dataset, root=s.data.root, categories=categories,
                     val_fraction=s.data.val_fraction, seed=s.seed, foreground=s.data.foreground, textures=s.data.textures)


# ----------------------------------------------------------------------------- training


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train worker: train one model, validate and checkpoint every ``eval_every``
    epochs, publish the final weights to the model store (rank 0)."""
    # --- Ray: who am I, where do I run, where do I resume from ---------------------
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    # ------------------------------------------------------------------------------
    settings: Settings = cfg["settings"]
    method_config = cfg["method_config"]
    key: ModelKey = cfg["key"]
    categories: list[str] = cfg["categories"]
    seed = settings.seed

    torch.manual_seed(seed + rank)
    datas = training.load_data(settings.dataset, categories, method_config, root=settings.data.root, cache_dir=settings.data.cache_dir,
                               val_fraction=settings.data.val_fraction, seed=seed, foreground=settings.data.foreground,
                               textures=settings.data.textures)
    textures = texture_bank(datas[0].train_images.shape[-1], cache_dir=settings.data.cache_dir, source=settings.data.textures)
    data = training.training_data(datas, textures)

    model = training.build_model(cfg["method"], method_config, training.default_backbone_factory).to(device)
    optimizers = model.configure_optimizers()
    start_epoch, train_seconds = 0, 0.0
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizers.optimizer.load_state_dict(state["optimizer"])
        if optimizers.scheduler is not None:
            optimizers.scheduler.load_state_dict(state["scheduler"])
        start_epoch, train_seconds = state["epoch"] + 1, state["train_seconds"]
        log.info("resuming model %s at epoch %d", key.short, start_epoch)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    epochs = method_config.epochs
    eval_every = cfg["eval_every"]
    for epoch in range(start_epoch, epochs):
        start = time.perf_counter()
        terms = training.train_epoch(ddp_model, optimizers, data, method_config.batch_size, epoch, seed, device, rank, world_size)
        train_seconds += time.perf_counter() - start
        if (epoch + 1) % eval_every and epoch + 1 != epochs:
            continue
        report = {"epoch": epoch + 1, "train_seconds": train_seconds, **{f"train_{k}": v for k, v in terms.items()}}
        if rank == 0:
            if epoch + 1 == epochs:
                # The trained model is in memory: evaluate validation *and* test here, once,
                # instead of in a task that would reload model and data and repeat the
                # validation pass. Only the validation metrics reach Tune.
                evaluation = evaluate_datas(model, datas, settings, device, Path(cfg["artifact_dir"]), train_seconds)
                write_json(Path(cfg["evaluation_path"]), evaluation)
                report.update(mean_validation(evaluation))
            else:
                report.update(validation_metrics(model, datas, settings, device))
            with tempfile.TemporaryDirectory() as folder:
                state = {"model": model.state_dict(), "optimizer": optimizers.optimizer.state_dict(), "epoch": epoch,
                         "scheduler": optimizers.scheduler.state_dict() if optimizers.scheduler else None, "train_seconds": train_seconds}
                torch.save(state, Path(folder) / "state.pt")
                ray.train.report(report, checkpoint=Checkpoint.from_directory(folder))
        else:
            ray.train.report(report)
    if rank == 0:
        meta = {"method": cfg["method"], "categories": categories, "epochs": epochs, "train_seconds": train_seconds,
                "world_size": world_size, "device": str(device)}
        ModelStore(cfg["storage_path"]).save(key, {k: v.cpu() for k, v in model.state_dict().items()}, meta)


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value))
    partial.replace(path)  # atomic: a reader sees all of it or nothing


def validation_metrics(model, datas, settings: Settings, device: torch.device) -> dict[str, float]:
    """Mean validation metrics over the model's categories (the tuning signal)."""
    per_category = {
        d.category: {"val": dataclasses.asdict(training.evaluate_split(model, d.val_images, d.val_masks, d.val_labels, i,
                                                                       settings.eval_batch_size, settings.seed, device).metrics)}
        for i, d in enumerate(datas)
    }
    return mean_validation({"categories": per_category})


def validation_period(eval_every: int, epochs: int, asha: bool) -> int:
    """Epochs between validation reports + checkpoints. ``eval_every=0`` (auto): four per
    training when ASHA needs intermediate results or the training is long enough
    (>= 100 epochs) for checkpoints to matter; otherwise only the last epoch, because at
    smoke scale each validation pass costs about as much as several epochs and the
    last epoch is always evaluated."""
    if eval_every:
        return eval_every
    return max(1, epochs // 4) if asha or epochs >= 100 else epochs


def trial_dir(spec: TrialSpec, trial_id: str) -> Path:
    """The trial's sample maps and the evaluation its training worker hands over."""
    return Path(spec.artifact_dir) / trial_id


def evaluation_path(spec: TrialSpec, trial_id: str, key: ModelKey) -> Path:
    """Where the training worker leaves the trial's evaluation of the model it trained."""
    return trial_dir(spec, trial_id) / f"evaluation-{key.short}.json"


def train_model(spec: TrialSpec, method_config: Any, categories: list[str], key: ModelKey, run_name: str, trial_id: str) -> None:
    """Run Ray Train for one model; its validation reports reach Tune (and ASHA), and
    its final evaluation lands at :func:`evaluation_path`. A ``run_name`` with
    checkpoints in storage resumes from the latest one."""
    s = spec.settings
    evaluation_path(spec, trial_id, key).unlink(missing_ok=True)  # left by an earlier attempt of this trial
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": s, "method": spec.space.method, "method_config": method_config, "key": key,
                           "categories": categories, "storage_path": spec.storage_path,
                           "artifact_dir": str(trial_dir(spec, trial_id)),
                           "evaluation_path": str(evaluation_path(spec, trial_id, key)),
                           "eval_every": validation_period(s.eval_every, method_config.epochs, bool(spec.space.asha))},
        scaling_config=ScalingConfig(num_workers=s.trial.workers, use_gpu=s.trial.gpus > 0,
                                     resources_per_worker={"CPU": s.trial.cpus, **({"GPU": s.trial.gpus} if s.trial.gpus else {})}),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(spec.storage_path) / "train"),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def ensure_model(spec: TrialSpec, method_config: Any, categories: list[str], owner: str) -> tuple[ModelKey, bool]:
    """Make sure the model for this training config exists; returns (key, trained_here)."""
    key = key_for(spec, method_config, categories)
    store = ModelStore(spec.storage_path)
    claims = ray.get_actor(spec.claims_actor)
    retrain = spec.settings.retrain
    if not spec.settings.reuse_models:  # every trial trains its own copy (measures the train-once gain)
        train_model(spec, method_config, categories, key, f"train-{key.short}-{owner}", owner)
        return key, True
    # The run name is stable across resume=true (an interrupted training continues from its
    # last checkpoint) but fresh for retrain=true (a finished one would only be reloaded).
    run_name = f"train-{key.short}" + (f"-{owner}" if retrain else "")
    waited = 0.0
    while True:
        if not retrain and store.exists(key):
            return key, False
        status = ray.get(claims.claim.remote(key.key, owner))
        if status == "ready":
            return key, False
        if status == "train":
            ok = False
            try:
                train_model(spec, method_config, categories, key, run_name, owner)
                ok = store.exists(key)
            finally:
                ray.get(claims.finish.remote(key.key, owner, ok))
            if not ok:
                raise RuntimeError(f"training of model {key.short} finished without publishing weights")
            return key, True
        time.sleep(2.0)
        waited += 2.0
        if waited % 60 < 2.0:
            log.info("trial %s: waiting %.0fs for model %s trained by another trial", owner, waited, key.short)


# --------------------------------------------------------------------------- evaluation


def evaluate_model(spec: TrialSpec, method_config: Any, categories: list[str], key: ModelKey, trial_id: str) -> dict[str, Any]:
    """Load a stored model and evaluate it (runs as a Ray task with the trial's resources,
    for trials that did not train their model themselves)."""
    s = spec.settings
    device = torch.device("cuda" if s.trial.gpus > 0 and torch.cuda.is_available() else "cpu")
    state, meta = ModelStore(spec.storage_path).load(key)
    model = training.build_model(spec.space.method, method_config, training.default_backbone_factory)
    model.load_state_dict(state)
    model.to(device)
    datas = training.load_data(s.dataset, categories, method_config, root=s.data.root, cache_dir=s.data.cache_dir,
                               val_fraction=s.data.val_fraction, seed=s.seed, foreground=s.data.foreground,
                               textures=s.data.textures)
    return evaluate_datas(model, datas, s, device, trial_dir(spec, trial_id), meta.get("train_seconds", 0.0))


def evaluate_datas(model, datas, settings: Settings, device: torch.device, artifact_dir: Path, train_seconds: float) -> dict[str, Any]:
    """Validation and test metrics, throughput, batch-1 latency and sample maps of a
    model on each of its categories."""
    s = settings
    out: dict[str, Any] = {"categories": {}, "artifacts": [], "train_seconds": train_seconds}
    for index, d in enumerate(datas):
        val = training.evaluate_split(model, d.val_images, d.val_masks, d.val_labels, index, s.eval_batch_size, s.seed, device)
        test = training.evaluate_split(model, d.test_images, d.test_masks, d.test_labels, index, s.eval_batch_size, s.seed, device)
        latency = training.measure_latency(model, d.test_images, index, s.latency_images, s.seed, device)
        out["categories"][d.category] = {
            "val": dataclasses.asdict(val.metrics),
            "test": dataclasses.asdict(test.metrics),
            "images_per_second": len(d.test_images) / test.prediction.seconds,
            "latency_ms": 1000 * latency,
        }
        out["artifacts"] += save_sample_maps(artifact_dir, d.category, d.test_images, test.prediction.maps, d.test_masks,
                                             d.test_labels, s.sample_maps)
    return out


def mean_validation(evaluation: dict[str, Any]) -> dict[str, float]:
    """The Tune signal of an evaluation: validation metrics averaged over its categories."""
    per_category = [r["val"] for r in evaluation["categories"].values()]
    return {f"val_{name}": float(np.mean([m[name] for m in per_category])) for name in METRIC_NAMES}


def flat_result(per_model: list[dict[str, Any]]) -> dict[str, Any]:
    """Tune/MLflow metrics: means over categories plus one entry per category."""
    categories = {c: r for result in per_model for c, r in result["categories"].items()}
    metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        for name in METRIC_NAMES:
            values = {c: r[split][name] for c, r in categories.items()}
            metrics[f"{split}_{name}"] = float(np.mean(list(values.values())))
            if len(values) > 1:
                metrics.update({f"{split}_{name}/{c}": v for c, v in values.items()})
    metrics["images_per_second"] = float(np.mean([r["images_per_second"] for r in categories.values()]))
    metrics["latency_ms"] = float(np.mean([r["latency_ms"] for r in categories.values()]))
    metrics["model_train_seconds"] = float(sum(r["train_seconds"] for r in per_model))
    metrics["artifacts"] = json.dumps([a for r in per_model for a in r["artifacts"]])
    return metrics


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """The Tune function trainable."""
    trial_id = ray.tune.get_context().get_trial_id()
    method_config = trial_method_config(spec, config)
    s = spec.settings
    # Scheduled outside the trial's placement group (which holds only the trial's tiny
    # driver bundle), with the trial's own resources, like Ray Train's workers.
    evaluate = ray.remote(num_cpus=s.trial.cpus, num_gpus=s.trial.gpus)(evaluate_model).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    per_model, keys, trained = [], [], 0
    for categories in model_groups(spec, config):
        key, trained_here = ensure_model(spec, method_config, categories, owner=trial_id)
        trained += int(trained_here)
        keys.append(key.short)
        done = evaluation_path(spec, trial_id, key)
        # A training interrupted after its last epoch (then resumed) may not have evaluated.
        per_model.append(json.loads(done.read_text()) if trained_here and done.exists()
                         else ray.get(evaluate.remote(spec, method_config, categories, key, trial_id)))
    result = flat_result(per_model)
    result.update({"models_trained": trained, "model_keys": ",".join(keys), "done": True})
    ray.tune.report(result)
