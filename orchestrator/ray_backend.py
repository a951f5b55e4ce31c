"""All of the orchestrator's Ray code: the local cluster, the Tuner, the trial, the
training worker, the evaluation task, the coordination of trainings, the Tune callback.

The pattern is Ray 2.60's Train V2 one: the Tune *function trainable* is the Train
driver; it builds a ``TorchTrainer`` whose run name is derived from the model key, so a
restarted trial (or a resumed sweep) continues that training run from its last
checkpoint instead of restarting.

Train once, evaluate many: a trial computes the model key of its training config
(orchestrator/store.py) and trains only if no stored model has that key — and only if
no other trial, of this sweep or of another sharing the storage, holds the key's lease
(orchestrator/leases.py). A lease whose owner died expires; the next trial takes it over
and continues from the key's latest checkpoint. Evaluation runs where
the model already is: in the training worker right after its last epoch when the trial
trained it, else as a Ray task holding the trial's CPU/GPU resources, so inference-only
trials cost seconds, not a TorchTrainer start-up.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
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
from ray._private.utils import write_ray_address  # names the embedded cluster in its temp folder (see start_local_ray)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from methods.base import MethodConfig
from orchestrator import search_space as spaces
from orchestrator.errors import ConfigError
from orchestrator.leases import LEASE_SECONDS, Lease, LeaseBoard
from orchestrator.plan import SweepPlan
from orchestrator.results import ModelEvaluation, TrialResult, model_evaluation_from_json, model_evaluation_json, tune_report
from orchestrator.storage import Storage
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


class ClusterLeaseBoard:
    """The synchronous face of the cluster's lease-board actor (the leases of an
    object-store storage_path, see orchestrator/leases.py): one detached actor per
    cluster, created by whichever process needs it first."""

    def __init__(self):
        self.actor = ray.remote(num_cpus=0)(LeaseBoard).options(name="diffad-leases", namespace="diffad", lifetime="detached",
                                                              get_if_exists=True).remote()

    def __getattr__(self, op: str):
        method = getattr(self.actor, op)
        return lambda *args: ray.get(method.remote(*args))


def lease_for(storage: Storage, name: str, owner: str, seconds: float = LEASE_SECONDS) -> Lease:
    """A lease under ``<storage>/leases``: a file there, or a record on the cluster's board."""
    return Lease(storage.join("leases"), name, owner, seconds, board=ClusterLeaseBoard() if storage.remote else None)


def check_shared_storage(storage: Storage) -> None:
    """On a multi-node cluster a local ``storage_path`` must be one folder every node sees
    (NFS, a shared volume): the driver writes a token there and a task on each node reads
    it back. A node that cannot stops the sweep before anything is recorded."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if storage.remote or len(nodes) < 2:
        return
    token = f".shared-check-{uuid.uuid4().hex[:12]}"
    storage.write_text(token, token)
    try:
        def sees_token(path: str) -> bool:
            return Path(path).is_file()

        checks = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]:
                  ray.remote(num_cpus=0)(sees_token).options(
                      scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(storage.join(token))
                  for n in nodes}
        blind = [node for node, check in checks.items() if not ray.get(check, timeout=300)]
    finally:
        storage.delete(token)
    if blind:
        raise ConfigError(f"storage_path {storage.uri} is a local folder that node(s) {', '.join(blind)} do not see; "
                          "use a folder shared by every node (NFS) or an object store (storage_path=s3://bucket/prefix)")


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
    # Each embedded Ray gets its own temp folder, inherited by its raylet and workers
    # (RAY_TMPDIR), naming its own address: Ray processes that find the cluster by
    # themselves (Ray Train's placement-group cleaner, the State API) then pick this one
    # even when another sweep's embedded Ray runs on the machine, where they would
    # otherwise stop with "Found multiple active Ray instances".
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    # address="local": never attach to a stale cluster named in /tmp/ray.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **{"log_to_driver": True, **init_kwargs})
    write_ray_address(ray.get_runtime_context().gcs_address, os.path.join(os.environ["RAY_TMPDIR"], "ray"))


def check_resources(cpus: float, gpus: float, workers: int, autoscaling: bool) -> None:
    """Stop before any trial starts when no node can hold one Train worker (or the cluster
    cannot hold a trial's workers): on a fixed-size cluster it would wait forever. With an
    autoscaler the nodes may come: warn and wait."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": cpus, "GPU": gpus}
    fits_one = any(all(node.get(k, 0.0) >= v for k, v in need.items() if v) for node in nodes)
    fits_all = all(sum(node.get(k, 0.0) for node in nodes) >= v * workers for k, v in need.items() if v)
    if fits_one and fits_all:
        return
    have = "; ".join(f"{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU" for node in nodes) or "no nodes"
    message = (f"a trial needs {workers} worker(s) of {cpus:g} CPU and {gpus:g} GPU, more than the cluster has (nodes: {have}); "
               "lower trial.cpus / trial.gpus / trial.workers or add nodes")
    if not autoscaling:
        raise ConfigError(message)
    log.warning("%s; waiting for the autoscaler", message)


# ------------------------------------------------------------------------- the trial


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares: the plan and where things go."""

    plan: SweepPlan
    sweep_name: str
    storage_path: str  # an absolute folder or an object-store URI (orchestrator/storage.py)

    @property
    def storage(self) -> Storage:
        return Storage(self.storage_path)

    def trial_folder(self, trial_id: str) -> str:
        """A trial's sample maps and evaluation hand-offs, relative to the storage."""
        return f"artifacts/{self.sweep_name}/{trial_id}"

    def trial_dir(self, trial_id: str) -> str:
        return self.storage.join(self.trial_folder(trial_id))

    def evaluation_path(self, trial_id: str, key: ModelKey) -> str:
        """Where the training worker leaves its evaluation of the model it trained (relative to the storage)."""
        return f"{self.trial_folder(trial_id)}/evaluation-{key.short}.json"


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
    plan, method, config, key, categories = context.plan, cfg["method"], cfg["method_config"], cfg["key"], cfg["categories"]
    rank, world_size = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    seed = cfg["train_seed"]

    torch.manual_seed(seed + rank)
    datas = load_datas(plan.data, categories, config)
    data = training_data(datas, plan.data.texture_bank(datas[0].train_images.shape[-1]))
    model = build_model(method, config).to(device)
    optimizers = model.configure_optimizers()
    start_epoch, train_seconds, resumed_after = 0, 0.0, 0
    checkpoint = ray.train.get_checkpoint()
    folder = None
    if checkpoint is not None:
        with checkpoint.as_directory() as restored:
            state = torch.load(Path(restored) / "state.pt", map_location=device, weights_only=False)
        folder = "this run's checkpoint"
    elif cfg["resume_from"]:  # a takeover: the latest checkpoint another attempt left
        state = torch.load(io.BytesIO(context.storage.read_bytes(f"{cfg['resume_from']}/state.pt")), map_location=device,
                           weights_only=False)
        folder = cfg["resume_from"]
    if folder is not None:
        model.load_state_dict(state["model"])
        if optimizers is not None:
            optimizers.optimizer.load_state_dict(state["optimizer"])
            if optimizers.scheduler is not None:
                optimizers.scheduler.load_state_dict(state["scheduler"])
        start_epoch, train_seconds = state["epoch"], state["train_seconds"]
        resumed_after = start_epoch
        log.info("model %s resumes after epoch %d from %s", key.short, start_epoch, folder)
    # A method with nothing to train by gradient descent is not wrapped in DDP.
    trained = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) if optimizers else model
    period = validation_period(plan.settings.eval_every, config.epochs, bool(plan.space.asha))
    last_checkpoint = time.monotonic()

    def on_epoch_end(epochs_done: int, terms: dict[str, float], seconds: float) -> None:
        """Every epoch reports its losses; validation every ``period`` epochs; a checkpoint
        with each validation and at least every ``checkpoint_every_s`` seconds."""
        nonlocal last_checkpoint
        report = {"epoch": epochs_done, "train_seconds": seconds, **{f"train_{k}": v for k, v in terms.items()}}
        validating = epochs_done % period == 0 or epochs_done == config.epochs
        due = validating or time.monotonic() - last_checkpoint >= plan.settings.checkpoint_every_s
        if rank != 0 or not due:
            ray.train.report(report)
            return
        if epochs_done == config.epochs:
            # The trained model is in memory: evaluate validation *and* test here, once,
            # instead of in a task that would reload model and data. Only the
            # validation metrics reach Tune; the whole evaluation is handed to the trial.
            evaluation = evaluate_model(model, datas, replace(plan.evaluation, seed=seed), device, context.trial_dir(cfg["trial_id"]), seconds)
            context.storage.write_text(context.evaluation_path(cfg["trial_id"], key), model_evaluation_json(evaluation))
            report.update(evaluation.validation())
        elif validating:
            report.update(validate(model, datas, replace(plan.evaluation, seed=seed), device))
        with tempfile.TemporaryDirectory() as folder:
            state = {"model": model.state_dict(), "epoch": epochs_done, "train_seconds": seconds,
                     "optimizer": optimizers.optimizer.state_dict() if optimizers else None,
                     "scheduler": optimizers.scheduler.state_dict() if optimizers and optimizers.scheduler else None}
            torch.save(state, Path(folder) / "state.pt")
            ray.train.report(report, checkpoint=Checkpoint.from_directory(folder))
        last_checkpoint = time.monotonic()

    train_seconds = fit(trained, optimizers, data, config, seed, device, start_epoch=start_epoch, train_seconds=train_seconds,
                        rank=rank, world_size=world_size, on_epoch_end=on_epoch_end)
    # The Ray nodes the workers ran on (provenance; Train's own local rank goes by node IP,
    # which two nodes on one machine share).
    nodes = [ray.get_runtime_context().get_node_id()] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(nodes, nodes[0])
    if rank == 0:
        meta = {"method": method, "categories": categories, "epochs": config.epochs, "train_seconds": train_seconds,
                "world_size": world_size, "nodes": sorted(set(nodes)), "device": str(device), "sweep": context.sweep_name,
                "trial_id": cfg["trial_id"], "resumed_after_epoch": resumed_after}
        ModelStore(context.storage_path).save(key, {k: v.cpu() for k, v in model.state_dict().items()}, meta)


def train_model(context: TrialContext, method: str, config: MethodConfig, categories: list[str], train_seed: int, key: ModelKey,
                run_name: str, trial_id: str, resume_from: str | None, in_trial: bool = True) -> None:
    """Run Ray Train for one model; its reports reach Tune (and ASHA), and its final
    evaluation lands at ``context.evaluation_path``. A ``run_name`` with checkpoints in
    storage resumes from its latest one, else from ``resume_from``."""
    s = context.plan.settings
    context.storage.delete(context.evaluation_path(trial_id, key))  # left by an earlier attempt of this trial
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"context": context, "method": method, "method_config": config, "key": key, "categories": categories, "train_seed": train_seed, "trial_id": trial_id,
                           "resume_from": str(resume_from) if resume_from else None},
        scaling_config=ScalingConfig(num_workers=s.trial.workers, use_gpu=s.trial.gpus > 0,
                                     resources_per_worker={"CPU": s.trial.cpus, **({"GPU": s.trial.gpus} if s.trial.gpus else {})}),
        run_config=RunConfig(name=run_name, storage_path=context.storage.join("train"),
                             failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                             callbacks=[TuneReportCallback()] if in_trial else []),  # outside a trial: nobody to report to
    )
    trainer.fit()


def latest_checkpoint(storage: Storage, key: ModelKey) -> str | None:
    """The newest checkpoint any training of ``key`` left (every attempt's Train run is
    named ``train-<key>-...``), so a takeover continues where a dead owner stopped;
    relative to the storage."""
    found = [e for run in storage.list("train") if run.path.startswith(f"train/train-{key.short}")
             for e in storage.list(run.path, recursive=True) if re.search(r"/checkpoint_[^/]+/state\.pt$", e.path)]
    return max(found, key=lambda e: e.mtime).path.rsplit("/", 1)[0] if found else None


def ensure_model(context: TrialContext, method: str, config: MethodConfig, categories: list[str], train_seed: int,
                 owner: str, in_trial: bool = True) -> tuple[ModelKey, bool]:
    """Make sure the model for this training config exists; returns (key, trained_here).
    Coordinated through the key's lease on the shared storage, across sweeps."""
    settings = context.plan.settings
    key = context.plan.model_key(method, config, categories, train_seed)
    store = ModelStore(context.storage_path)
    if not settings.reuse_models:  # every trial trains its own copy (measures the train-once gain)
        train_model(context, method, config, categories, train_seed, key, f"train-{key.short}-{owner}", owner, resume_from=None,
                    in_trial=in_trial)
        return key, True

    def ready() -> bool:
        # retrain=true: only a version published by this sweep counts
        return store.exists(key) and (not settings.retrain or store.meta(key).get("sweep") == context.sweep_name)

    lease = lease_for(context.storage, f"model-{key.key}", owner=f"{context.sweep_name}/{owner}")
    waited = 0.0
    while not ready():
        if lease.acquire():
            lease.hold()
            try:
                if ready():  # published between our check and the lease
                    break
                # A new Train run per attempt, started from the key's latest checkpoint
                # (a resumed trial finds its own run's checkpoint there too).
                train_model(context, method, config, categories, train_seed, key, f"train-{key.short}-{owner}", owner,
                            resume_from=None if settings.retrain else latest_checkpoint(context.storage, key), in_trial=in_trial)
                if not store.exists(key):
                    raise RuntimeError(f"training of model {key.short} finished without publishing weights")
                return key, True
            finally:
                lease.release()
        time.sleep(2.0)
        waited += 2.0
        if waited % 60 < 2.0:
            holder = lease.read()
            log.info("trial %s: waiting %.0fs for model %s trained by %s", owner, waited, key.short, holder.owner if holder else "?")
    return key, False


def pretrain(context: TrialContext, models: list[tuple[str, MethodConfig, list[str], int]]) -> None:
    """Train ``models`` (see :meth:`SweepPlan.pretrain_models`) before the trials, at most
    ``max_concurrent`` at once, each coordinated through its key's lease like a trial's
    training (another sweep may be training it). Each runs as a tiny driver task whose
    Ray Train workers take the trial resources, as a trial's would."""
    task = ray.remote(num_cpus=0, memory=TRIAL_DRIVER_MEMORY, max_retries=0)(_pretrain_one)
    waiting, running, limit = list(models), [], max(1, context.plan.settings.max_concurrent)
    log.info("training %d models in parallel (at most %d at once) before the trials", len(models), limit)
    while waiting or running:
        while waiting and len(running) < limit:
            running.append(task.remote(context, *waiting.pop(0)))
        done, running = ray.wait(running, num_returns=1)
        ray.get(done)


def _pretrain_one(context: TrialContext, method: str, config: MethodConfig, categories: list[str], train_seed: int) -> None:
    ensure_model(context, method, config, categories, train_seed, owner=f"pretrain-{'+'.join(categories)}-{train_seed}", in_trial=False)


def evaluate_stored(context: TrialContext, method: str, config: MethodConfig, categories: list[str], train_seed: int, key: ModelKey,
                    trial_id: str) -> ModelEvaluation:
    """Load a stored model and evaluate it (a Ray task with the trial's resources, for
    trials that did not train their model themselves)."""
    plan = context.plan
    device = torch.device("cuda" if plan.settings.trial.gpus > 0 and torch.cuda.is_available() else "cpu")
    state, meta = ModelStore(context.storage_path).load(key)
    model = build_model(method, config)
    model.load_state_dict(state)
    model.to(device)
    datas = load_datas(plan.data, categories, config)
    return evaluate_model(model, datas, replace(plan.evaluation, seed=train_seed), device, context.trial_dir(trial_id),
                          meta.get("train_seconds", 0.0))


def run_trial(trial_config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: train what is missing, evaluate, report a TrialResult."""
    trial_id = tune.get_context().get_trial_id()
    plan = context.plan
    method, config, train_seed = plan.method_of(trial_config), plan.method_config(trial_config), plan.train_seed(trial_config)
    s = plan.settings
    # Scheduled outside the trial's placement group (which holds only the trial's tiny
    # driver bundle), with the trial's own resources, like Ray Train's workers.
    evaluate = ray.remote(num_cpus=s.trial.cpus, num_gpus=s.trial.gpus)(evaluate_stored).options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    models, keys, trained = [], [], 0
    for categories in plan.model_groups(trial_config):
        key, trained_here = ensure_model(context, method, config, categories, train_seed, owner=trial_id)
        trained += int(trained_here)
        keys.append(key.short)
        handed_over = context.evaluation_path(trial_id, key)
        # A training interrupted after its last epoch (then resumed) may not have evaluated.
        models.append(model_evaluation_from_json(context.storage.read_text(handed_over)) if trained_here and context.storage.exists(handed_over)
                      else ray.get(evaluate.remote(context, method, config, categories, train_seed, key, trial_id)))
    tune.report(tune_report(TrialResult(models=models, model_keys=keys, models_trained=trained)))


# ------------------------------------------------------------------------------ Tune


def trial_name(trial_config: dict[str, Any]) -> str:
    """A child run's name: the point (or sampled values), the category and the training
    seed of a ``seeds=N`` sweep, e.g. ``steps=5 · washer · seed 1``."""
    parts = [str(trial_config["point"])] if "point" in trial_config else [
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial_config.items() if k not in ("category", "train_seed")]
    parts += [trial_config["category"]] if "category" in trial_config else []
    return " · ".join(parts + ([f"seed {trial_config['train_seed']}"] if "train_seed" in trial_config else []))


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
        # Completed without its final result: a scheduler (ASHA) stopped it early.
        self.recorder.finish(self._run(trial), ok=True, stopped_early="result" not in (trial.last_result or {}))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.recorder.finish(self._run(trial), ok=False, error=str(getattr(trial, "error_file", None) or ""))


class ValidatedOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch reads ``result[metric]`` from every result, but a trial that
    trains reports each epoch's losses and validates only every few epochs: the first
    report without the metric failed the trial (a KeyError inside Tune). Such results
    carry nothing for Optuna, so they are skipped; the final result always has it."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if isinstance(self.metric, list) or self.metric in result:
            super().on_trial_result(trial_id, result)


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


def param_space(plan: SweepPlan) -> tuple[dict[str, Any], ValidatedOptunaSearch | None]:
    """Grid: one trial per valid point (and per category for per-category methods).
    Optuna: one distribution per axis, searched by TPE."""
    space = plan.space
    if space.search == "grid":
        params: dict[str, Any] = {"point": tune.grid_search([p.label for p in plan.points])}
        if plan.per_category_trials:
            params["category"] = tune.grid_search(list(plan.categories))
        if len(plan.training_seeds) > 1:
            params["train_seed"] = tune.grid_search(list(plan.training_seeds))
        return params, None
    sampler = spaces.tpe_sampler(plan.settings.num_samples or space.num_samples, plan.settings.seed)
    metrics, modes = zip(*plan.objectives)
    # Several objectives: Optuna's TPE ranks trials by Pareto dominance (its multi-objective mode).
    metric, mode = (list(metrics), list(modes)) if len(metrics) > 1 else (metrics[0], modes[0])
    search = ValidatedOptunaSearch(metric=metric, mode=mode, points_to_evaluate=list(space.points_to_evaluate) or None, sampler=sampler)
    return {a.name: distribution(a) for a in space.axes}, search


@dataclass(frozen=True)
class TrialOutcome:
    """What Tune says of a trial; whether it finished, stopped early or was interrupted is
    what its MLflow run says (the recorder closes a run only when Tune completes the trial)."""

    trial_id: str
    path: str
    error: str | None  # first line of the error of a failed trial


def latest_sweep(storage: Storage, prefix: str) -> str | None:
    """The name of the most recent restorable sweep ``<prefix>-<YYYYmmdd-HHMMSS>`` under
    ``<storage>/sweeps`` (names sort by time; object stores have no folder times)."""
    names = sorted(e.path.rsplit("/", 1)[-1] for e in storage.list("sweeps"))
    candidates = [n for n in names if n.startswith(f"{prefix}-")]
    return candidates[-1] if candidates and tune.Tuner.can_restore(storage.join("sweeps", candidates[-1])) else None


def run_sweep(context: TrialContext, sweep_name: str, recorder: TrialRecorder, resume: bool) -> list[TrialOutcome]:
    """Run (or, with ``resume``, restore and finish) the sweep's Tune experiment."""
    plan = context.plan
    space, s = plan.space, plan.settings
    # Every epoch reports its losses, but validation (the metric Tune, Optuna and ASHA
    # read) comes only every few epochs; ASHA and the searchers skip results without it.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    connect()
    # SIGTERM (a scheduler, `ray job stop`) ends the sweep as Ctrl-C does: Tune saves its
    # state, the parent run is marked KILLED, the resume command is printed. Installed
    # after ray.init, whose own SIGTERM handler exits the driver at once.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    if resume:
        log.info("resuming sweep %s", context.storage.join("sweeps", sweep_name))
        tuner = tune.Tuner.restore(context.storage.join("sweeps", sweep_name), trainable, resume_errored=True)
    else:
        params, search_alg = param_space(plan)
        # ASHA's rungs count epochs; a trial that reaches max_t finishes by itself (its
        # evaluation comes after its last epoch's report, which ASHA must not stop).
        tuner = tune.Tuner(
            trainable,
            param_space=params,
            # A multi-objective searcher keeps its own metric list: Tune would overwrite it with one.
            tune_config=tune.TuneConfig(metric=None if len(plan.objectives) > 1 else space.metric,
                                        mode=None if len(plan.objectives) > 1 else space.mode, search_alg=search_alg,
                                        scheduler=ASHAScheduler(time_attr="epoch", stop_last_trials=False, **space.asha) if space.asha else None,
                                        num_samples=s.num_samples or space.num_samples, max_concurrent_trials=s.max_concurrent,
                                        # one trial-driver process serves trial after trial instead of
                                        # each paying a fresh process's imports (torch, diffusers, Ray Train);
                                        # not with ASHA: the trial after an early-stopped one never started
                                        reuse_actors=not space.asha),
            run_config=tune.RunConfig(name=sweep_name, storage_path=context.storage.join("sweeps"),
                                      failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                      callbacks=[MLflowCallback(recorder)]),
        )
    results = tuner.fit()
    return [TrialOutcome(trial_id=str((r.metrics or {}).get("trial_id", Path(r.path).name)), path=str(r.path),
                         error=(str(r.error).splitlines() or [type(r.error).__name__])[0] if r.error else None) for r in results]
