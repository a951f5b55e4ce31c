"""All of the orchestrator's Ray code: the local cluster, the Tuner, the trial, the
training worker, the evaluation task, the coordination of trainings, the Tune callback.

The pattern is Ray 2.60's Train V2 one: the Tune *function trainable* is the Train
driver; it builds a ``TorchTrainer`` whose run name is derived from the model key, so a
restarted trial (or a resumed sweep) continues that training run from its last
checkpoint instead of restarting.

Train once, evaluate many: a trial computes the model key of its training config
(orchestrator/store.py) and trains only if no stored model has that key — and only if
no other trial is already training it (:class:`TrainingClaims`). Evaluation runs where
the model already is: in the training worker right after its last epoch when the trial
trained it, else as a Ray task holding the trial's CPU/GPU resources, so inference-only
trials cost seconds, not a TorchTrainer start-up.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from methods.base import MethodConfig
from orchestrator import search_space as spaces
from orchestrator.errors import ConfigError
from orchestrator.files import write_text
from orchestrator.plan import SweepPlan
from orchestrator.results import ModelEvaluation, TrialResult, model_evaluation_from_json, model_evaluation_json, tune_report
from orchestrator.store import ModelKey, ModelStore
from orchestrator.tracking import TrialRecorder
from orchestrator.training import build_model, evaluate_model, fit, load_datas, training_data, validate

log = logging.getLogger(__name__)

# A trial's own process only drives Ray Train and waits; Train's workers and the
# evaluation task hold the CPUs/GPUs. It must claim *no* CPU: even 0.01 CPU per trial
# leaves 1.98 of 2 CPUs, and the second trial's 1-CPU worker never fits. A bundle cannot
# be empty, so it claims 1 MiB of Ray's logical memory instead.
TRIAL_DRIVER_MEMORY = 2**20


# --------------------------------------------------------------------------- the cluster


def connect() -> None:
    """The cluster named by RAY_ADDRESS (or the job's own under ``ray job submit``), else
    an embedded local Ray."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        start_local_ray()


def start_local_ray(num_cpus: int | None = None, **init_kwargs: Any) -> None:
    """An embedded single-machine Ray, with the Ray Train settings a laptop wants."""
    # A trial's Ray Train worker group waits for CPUs while other trials train or
    # evaluate; on a laptop that can take minutes, which is not an error (Ray Train's
    # default start-up timeout, 60 s, logs one and retries).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3600")
    # Every Ray Train run otherwise starts one more process (importing Ray Train) to
    # watch for spot-instance preemption, which a single machine never sees, and
    # notices a finished worker group only at its 2 s health-check poll. Both are
    # per-trial costs that dominate short trials on a laptop.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # address="local": never attach to a stale cluster named in /tmp/ray.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **{"log_to_driver": True, **init_kwargs})


# ---------------------------------------------------------------------- coordination


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


# ------------------------------------------------------------------------- the trial


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares: the plan and where things go."""

    plan: SweepPlan
    claims_actor: str  # name of the sweep's TrainingClaims actor
    storage_path: str  # absolute
    artifact_dir: str  # absolute; a trial's sample maps and hand-offs land in <artifact_dir>/<trial_id>/

    def trial_dir(self, trial_id: str) -> Path:
        return Path(self.artifact_dir) / trial_id

    def evaluation_path(self, trial_id: str, key: ModelKey) -> Path:
        """Where the training worker leaves its evaluation of the model it trained."""
        return self.trial_dir(trial_id) / f"evaluation-{key.short}.json"


def validation_period(eval_every: int, epochs: int, asha: bool) -> int:
    """Epochs between validation reports + checkpoints. ``eval_every=0`` (auto): four per
    training when ASHA needs intermediate results or the training is long enough
    (>= 100 epochs) for checkpoints to matter; otherwise only the last epoch, because at
    smoke scale each validation pass costs about as much as several epochs and the
    last epoch is always evaluated."""
    if eval_every:
        return eval_every
    return max(1, epochs // 4) if asha or epochs >= 100 else epochs


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train worker: train one model with :func:`orchestrator.training.fit`, validate
    and checkpoint every ``period`` epochs, evaluate after the last one and publish the
    weights to the model store (rank 0)."""
    context: TrialContext = cfg["context"]
    plan, config, key, categories = context.plan, cfg["method_config"], cfg["key"], cfg["categories"]
    rank, world_size = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    seed = plan.settings.seed

    torch.manual_seed(seed + rank)
    datas = load_datas(plan.data, categories, config)
    data = training_data(datas, plan.data.texture_bank(datas[0].train_images.shape[-1]))
    model = build_model(plan.method, config).to(device)
    optimizers = model.configure_optimizers()
    start_epoch, train_seconds = 0, 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        if optimizers is not None:
            optimizers.optimizer.load_state_dict(state["optimizer"])
            if optimizers.scheduler is not None:
                optimizers.scheduler.load_state_dict(state["scheduler"])
        start_epoch, train_seconds = state["epoch"], state["train_seconds"]
        log.info("resuming model %s after epoch %d", key.short, start_epoch)
    # A method with nothing to train by gradient descent is not wrapped in DDP.
    trained = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) if optimizers else model
    period = validation_period(plan.settings.eval_every, config.epochs, bool(plan.space.asha))

    def on_epoch_end(epochs_done: int, terms: dict[str, float], seconds: float) -> None:
        if epochs_done % period and epochs_done != config.epochs:
            return
        report = {"epoch": epochs_done, "train_seconds": seconds, **{f"train_{k}": v for k, v in terms.items()}}
        if rank != 0:
            ray.train.report(report)
            return
        if epochs_done == config.epochs:
            # The trained model is in memory: evaluate validation *and* test here, once,
            # instead of in a task that would reload model and data. Only the
            # validation metrics reach Tune; the whole evaluation is handed to the trial.
            evaluation = evaluate_model(model, datas, plan.evaluation, device, context.trial_dir(cfg["trial_id"]), seconds)
            write_text(context.evaluation_path(cfg["trial_id"], key), model_evaluation_json(evaluation))
            report.update(evaluation.validation())
        else:
            report.update(validate(model, datas, plan.evaluation, device))
        with tempfile.TemporaryDirectory() as folder:
            state = {"model": model.state_dict(), "epoch": epochs_done, "train_seconds": seconds,
                     "optimizer": optimizers.optimizer.state_dict() if optimizers else None,
                     "scheduler": optimizers.scheduler.state_dict() if optimizers and optimizers.scheduler else None}
            torch.save(state, Path(folder) / "state.pt")
            ray.train.report(report, checkpoint=Checkpoint.from_directory(folder))

    train_seconds = fit(trained, optimizers, data, config, seed, device, start_epoch=start_epoch, train_seconds=train_seconds,
                        rank=rank, world_size=world_size, on_epoch_end=on_epoch_end)
    if rank == 0:
        meta = {"method": plan.method, "categories": categories, "epochs": config.epochs, "train_seconds": train_seconds,
                "world_size": world_size, "device": str(device)}
        ModelStore(context.storage_path).save(key, {k: v.cpu() for k, v in model.state_dict().items()}, meta)


def train_model(context: TrialContext, config: MethodConfig, categories: list[str], key: ModelKey, run_name: str, trial_id: str) -> None:
    """Run Ray Train for one model; its validation reports reach Tune (and ASHA), and its
    final evaluation lands at ``context.evaluation_path``. A ``run_name`` with
    checkpoints in storage resumes from the latest one."""
    s = context.plan.settings
    context.evaluation_path(trial_id, key).unlink(missing_ok=True)  # left by an earlier attempt of this trial
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"context": context, "method_config": config, "key": key, "categories": categories, "trial_id": trial_id},
        scaling_config=ScalingConfig(num_workers=s.trial.workers, use_gpu=s.trial.gpus > 0,
                                     resources_per_worker={"CPU": s.trial.cpus, **({"GPU": s.trial.gpus} if s.trial.gpus else {})}),
        run_config=RunConfig(name=run_name, storage_path=str(Path(context.storage_path) / "train"),
                             failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def ensure_model(context: TrialContext, config: MethodConfig, categories: list[str], owner: str) -> tuple[ModelKey, bool]:
    """Make sure the model for this training config exists; returns (key, trained_here)."""
    settings = context.plan.settings
    key = context.plan.model_key(config, categories)
    store = ModelStore(context.storage_path)
    if not settings.reuse_models:  # every trial trains its own copy (measures the train-once gain)
        train_model(context, config, categories, key, f"train-{key.short}-{owner}", owner)
        return key, True
    claims = ray.get_actor(context.claims_actor)
    # The run name is stable across resume=true (an interrupted training continues from its
    # last checkpoint) but fresh for retrain=true (a finished one would only be reloaded).
    run_name = f"train-{key.short}" + (f"-{owner}" if settings.retrain else "")
    waited = 0.0
    while True:
        if not settings.retrain and store.exists(key):
            return key, False
        status = ray.get(claims.claim.remote(key.key, owner))
        if status == "ready":
            return key, False
        if status == "train":
            ok = False
            try:
                train_model(context, config, categories, key, run_name, owner)
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


def evaluate_stored(context: TrialContext, config: MethodConfig, categories: list[str], key: ModelKey, trial_id: str) -> ModelEvaluation:
    """Load a stored model and evaluate it (a Ray task with the trial's resources, for
    trials that did not train their model themselves)."""
    plan = context.plan
    device = torch.device("cuda" if plan.settings.trial.gpus > 0 and torch.cuda.is_available() else "cpu")
    state, meta = ModelStore(context.storage_path).load(key)
    model = build_model(plan.method, config)
    model.load_state_dict(state)
    model.to(device)
    datas = load_datas(plan.data, categories, config)
    return evaluate_model(model, datas, plan.evaluation, device, context.trial_dir(trial_id), meta.get("train_seconds", 0.0))


def run_trial(trial_config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: train what is missing, evaluate, report a TrialResult."""
    trial_id = tune.get_context().get_trial_id()
    plan = context.plan
    config = plan.method_config(trial_config)
    s = plan.settings
    # Scheduled outside the trial's placement group (which holds only the trial's tiny
    # driver bundle), with the trial's own resources, like Ray Train's workers.
    evaluate = ray.remote(num_cpus=s.trial.cpus, num_gpus=s.trial.gpus)(evaluate_stored).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    models, keys, trained = [], [], 0
    for categories in plan.model_groups(trial_config):
        key, trained_here = ensure_model(context, config, categories, owner=trial_id)
        trained += int(trained_here)
        keys.append(key.short)
        handed_over = context.evaluation_path(trial_id, key)
        # A training interrupted after its last epoch (then resumed) may not have evaluated.
        models.append(model_evaluation_from_json(handed_over.read_text()) if trained_here and handed_over.exists()
                      else ray.get(evaluate.remote(context, config, categories, key, trial_id)))
    tune.report(tune_report(TrialResult(models=models, model_keys=keys, models_trained=trained)))


# ------------------------------------------------------------------------------ Tune


def trial_name(trial_config: dict[str, Any]) -> str:
    """A child run's name: the point (or sampled values) and the category, e.g. ``steps=5 · washer``."""
    parts = [str(trial_config["point"])] if "point" in trial_config else [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial_config.items() if k != "category"]
    return " · ".join(parts + ([trial_config["category"]] if "category" in trial_config else []))


class MLflowCallback(tune.Callback):
    """Forwards Tune's trial events (driver side) to the MLflow :class:`TrialRecorder`."""

    def __init__(self, recorder: TrialRecorder):
        self.recorder = recorder

    def _run(self, trial) -> str:
        return self.recorder.run_for(trial.trial_id, trial_name(trial.config), trial.config)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.recorder.log(self._run(trial), result, step=int(result.get("training_iteration", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.recorder.finish(self._run(trial), ok=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.recorder.finish(self._run(trial), ok=False, error=str(getattr(trial, "error_file", None) or ""))


def distribution(axis: spaces.Axis):
    """The Tune search domain of an Optuna axis."""
    if axis.kind == "uniform":
        return tune.uniform(*axis.values)
    if axis.kind == "loguniform":
        return tune.loguniform(*axis.values)
    if axis.kind == "int":
        return tune.randint(axis.values[0], axis.values[1] + 1)
    if axis.kind in ("choice", "grid"):
        return tune.choice(list(axis.values))
    raise ConfigError(f"unknown distribution {axis.kind!r}; valid: {', '.join(spaces.DISTRIBUTIONS)}")


def param_space(plan: SweepPlan) -> tuple[dict[str, Any], OptunaSearch | None]:
    """Grid: one trial per valid point (and per category for per-category methods).
    Optuna: one distribution per axis, searched by TPE."""
    space = plan.space
    if space.search == "grid":
        params: dict[str, Any] = {"point": tune.grid_search([p.label for p in plan.points])}
        if plan.per_category_trials:
            params["category"] = tune.grid_search(list(plan.categories))
        return params, None
    search = OptunaSearch(metric=space.metric, mode=space.mode, points_to_evaluate=list(space.points_to_evaluate) or None,
                          seed=plan.settings.seed)
    return {a.name: distribution(a) for a in space.axes}, search


@dataclass(frozen=True)
class TrialOutcome:
    path: str
    error: str | None  # first line of the error of a failed trial
    finished: bool  # reported its final result (False: interrupted before)


def latest_sweep(sweeps_root: Path, prefix: str) -> Path | None:
    """The most recent restorable sweep folder named ``<prefix>-*``."""
    candidates = sorted(sweeps_root.glob(f"{prefix}-*"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates and tune.Tuner.can_restore(str(candidates[-1])) else None


def run_sweep(context: TrialContext, sweep_name: str, sweeps_root: Path, recorder: TrialRecorder, resume: bool) -> list[TrialOutcome]:
    """Run (or, with ``resume``, restore and finish) the sweep's Tune experiment."""
    plan = context.plan
    space, s = plan.space, plan.settings
    connect()
    claims = claims_actor(context.claims_actor)  # held until the sweep ends
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    if resume:
        log.info("resuming sweep %s", sweeps_root / sweep_name)
        tuner = tune.Tuner.restore(str(sweeps_root / sweep_name), trainable, resume_errored=True)
    else:
        params, search_alg = param_space(plan)
        tuner = tune.Tuner(
            trainable,
            param_space=params,
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search_alg,
                                        scheduler=ASHAScheduler(time_attr="training_iteration", **space.asha) if space.asha else None,
                                        num_samples=s.num_samples or space.num_samples, max_concurrent_trials=s.max_concurrent,
                                        # one trial-driver process serves trial after trial instead of
                                        # each paying a fresh process's imports (torch, diffusers, Ray Train)
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=sweep_name, storage_path=str(sweeps_root),
                                      failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                      callbacks=[MLflowCallback(recorder)]),
        )
    results = tuner.fit()
    del claims
    return [TrialOutcome(path=str(r.path), error=(str(r.error).splitlines() or [type(r.error).__name__])[0] if r.error else None,
                         finished=r.error is None and "result" in (r.metrics or {})) for r in results]
