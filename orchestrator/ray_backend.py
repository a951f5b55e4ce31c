"""All of the orchestrator's Ray code: the cluster, the sweep's scheduler, the trainings,
the evaluations, the trial, the Tuner and the Tune callback.

How a sweep runs (docs/architecture.md, "How a sweep runs"):

* **One scheduler per sweep** (:class:`SweepScheduler`, an actor on the driver node) holds
  the policy of :mod:`orchestrator.schedule`: it hands Ray a job only when the cluster has
  room for it, evaluations of existing models first, trainings longest first.
* **The pipeline**: every model the plan knows before its trials (a grid's models, the
  default model of an inference-only Optuna space) is trained by the scheduler as soon as
  resources are free, each driven from a thread of the scheduler (Train V2's pattern:
  whoever calls ``TorchTrainer.fit`` drives it; its run name comes from the model key, so
  a restarted training continues from its last checkpoint). Such a training evaluates
  nothing: the trials do.
* **Trials** (Tune function trainables) start at once; each asks the scheduler for one
  evaluation per category and runs it (a Ray task with one worker's resources) as soon as
  it is granted, i.e. as soon as its model exists and a slot is free. A trial whose model
  is not in the pipeline (an Optuna axis that changes training, ``reuse_models=false``)
  trains it itself, inside the trial so that Tune and ASHA see its epochs, and evaluates
  it in the training workers, sharded over the DDP ranks.
* **Who trains a model** is decided by its lease on the storage (orchestrator/leases.py),
  across sweeps: the scheduler is an optimisation of *when*, never of *whether*. If the
  scheduler is gone, trials fall back to training what is missing under the lease and
  evaluating without a grant.
* **Drivers stay off the GPU nodes**: trial drivers and the scheduler (and so Train's
  controllers, which Train puts on the node of whoever calls ``fit``) claim a sliver of
  the ``drivers=`` resource: the head by default.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import os
import re
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

from orchestrator import schedule
from orchestrator import search_space as spaces
from orchestrator.errors import ConfigError
from orchestrator.leases import LEASE_SECONDS, Lease
from orchestrator.plan import Cluster, SweepPlan, TrainingSpec, TrialResources, TrialSpec
from orchestrator.results import CategoryEvaluation, ModelEvaluation, TrialResult, tune_report
from orchestrator.storage import Storage
from orchestrator.model_store import ModelKey, ModelStore, StaleLease
from orchestrator.training import Shard, build_model, evaluate_category, evaluate_model, fit, load_datas, training_data, validate

if TYPE_CHECKING:  # MLflow is imported by the driver only: every Ray worker that imports this module would pay for it
    from orchestrator.tracking import TrialRecorder

log = logging.getLogger(__name__)

HEAD = "head"
HEAD_RESOURCE = "node:__internal_head__"  # Ray gives the head node one unit of this resource
DRIVER_SHARE = 0.001  # what one driver claims of the drivers= resource: a placement rule, not a budget
NAMESPACE = "diffad"
POLL_S = 2.0  # how often the scheduler looks for models trained elsewhere and for a changed cluster


# --------------------------------------------------------------------------- the cluster


def connect() -> None:
    """The cluster named by RAY_ADDRESS (or the job's own under ``ray job submit``), else
    an embedded local Ray."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, namespace=NAMESPACE)
    else:
        start_local_ray()


def lease_for(storage: Storage, name: str, owner: str, seconds: float = LEASE_SECONDS) -> Lease:
    """A lease under ``<storage>/leases`` (orchestrator/leases.py: conditional writes on the storage itself)."""
    return Lease(storage, name, owner, seconds)


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
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), namespace=NAMESPACE, **{"log_to_driver": True, **init_kwargs})
    write_ray_address(ray.get_runtime_context().gcs_address, os.path.join(os.environ["RAY_TMPDIR"], "ray"))


def cluster(autoscaling: bool) -> Cluster:
    """The resources the sweep may use: the cluster's now, or with ``autoscaling=true`` what
    its autoscaler may grow it to (the maximum the autoscaler's config allows, as Ray
    Train reads it; none published: the cluster's now, and ``max_concurrent`` should be given)."""
    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    if autoscaling:
        # No public API: Ray Train's own worker-group sizing reads the same GCS record.
        from ray._private.state import state

        maximum = state.get_max_resources_from_cluster_config()
        if maximum:
            merged = {**now, **{k: float(v) for k, v in maximum.items() if v}}
            return Cluster(merged, "the autoscaler's maximum")
        return Cluster(now, "the nodes up now (the autoscaler publishes no maximum)", growing=True)
    return Cluster(now, "the embedded Ray on this machine" if not os.environ.get("RAY_ADDRESS") and len(ray.nodes()) == 1
                   else "the cluster")


def driver_resource(drivers: str) -> str:
    return HEAD_RESOURCE if drivers == HEAD else drivers


def check_resources(resources: TrialResources, where: Cluster, drivers: str, autoscaling: bool) -> None:
    """Stop before any trial starts when no node can hold one Train worker, the cluster
    cannot hold a trial's workers, or no node takes drivers: on a fixed-size cluster it
    would wait forever. With an autoscaler the nodes may come: warn and wait."""
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = resources.per_worker
    fits_one = any(schedule.fits(need, node) for node in alive)
    fits_all = schedule.fits(resources.per_training, where.resources)
    problems = []
    if not (fits_one and fits_all):
        have = "; ".join(", ".join(f"{node.get(k, 0):g} {k}" for k in need) for node in alive) or "no nodes"
        problems.append(f"a trial needs {resources.workers} worker(s) of {', '.join(f'{v:g} {k}' for k, v in need.items())}, "
                        f"more than the cluster has (nodes: {have}); lower trial.cpus / trial.gpus / trial.workers or add nodes")
    if not any(node.get(driver_resource(drivers), 0.0) > 0 for node in alive):
        problems.append(f"drivers={drivers}: no node declares the Ray resource {driver_resource(drivers)!r}; start the nodes meant for "
                        f"drivers with `ray start --resources='{{\"{drivers}\": 1}}'` or use drivers=head")
    for message in problems:
        if not autoscaling:
            raise ConfigError(message)
        log.warning("%s; waiting for the autoscaler", message)


# ------------------------------------------------------------------------- the context


@dataclass(frozen=True)
class TrialContext:
    """What every trial and job of a sweep shares: the plan, the resolved resources and
    where things go."""

    plan: SweepPlan
    resources: TrialResources
    sweep_name: str
    storage_path: str  # an absolute folder or an object-store URI (orchestrator/storage.py)

    @property
    def storage(self) -> Storage:
        return Storage(self.storage_path)

    @property
    def driver_claim(self) -> dict[str, float]:
        """The resources a driver process (the scheduler, a trial) claims."""
        return {driver_resource(self.plan.settings.drivers): DRIVER_SHARE}

    def trial_folder(self, trial_id: str) -> str:
        """A trial's sample maps and evaluation hand-offs, relative to the storage."""
        return f"artifacts/{self.sweep_name}/{trial_id}"

    def trial_dir(self, trial_id: str) -> str:
        return self.storage.join(self.trial_folder(trial_id))

    def evaluation_path(self, trial_id: str, key: ModelKey) -> str:
        """Where a training in a trial leaves its evaluation of the model (relative to the storage)."""
        return f"{self.trial_folder(trial_id)}/evaluation-{key.short}.json"

    @property
    def scheduler_name(self) -> str:
        return f"diffad-scheduler-{self.sweep_name}"

    def scheduler(self):
        """The sweep's scheduler actor, or None when it is gone."""
        try:
            return ray.get_actor(self.scheduler_name, namespace=NAMESPACE)
        except ValueError:
            return None


# --------------------------------------------------------------------------- trainings


@dataclass(frozen=True)
class TrainingJob:
    """One Ray Train run: train ``training``'s model and publish it. ``in_trial``: it runs
    inside a Tune trial (its epochs reach Tune, it validates every few epochs and
    evaluates the model after the last, sharded over the ranks); otherwise it is a
    pipeline training, which only trains."""

    context: TrialContext
    training: TrainingSpec
    owner: str  # the trial id, or the pipeline's name for the model
    resume_from: str | None  # a checkpoint another attempt of this model left (relative to the storage)
    in_trial: bool
    token: int = 0  # the fencing token of the model's lease: the store refuses to publish under a stale one

    @property
    def run_name(self) -> str:
        return f"train-{self.training.key.short}-{self.owner}"


def validation_period(eval_every: int, epochs: int, asha: bool) -> int:
    """Epochs between validation reports + checkpoints. ``eval_every=0`` (auto): four per
    training when ASHA needs intermediate results or the training is long enough
    (>= 100 epochs) for checkpoints to matter; otherwise only the last epoch, because at
    smoke scale each validation pass costs about as much as several epochs and the
    last epoch is always evaluated."""
    if eval_every:
        return eval_every
    return max(1, epochs // 4) if asha or epochs >= 100 else epochs


def train_loop_per_worker(cfg: dict[str, TrainingJob]) -> None:
    """Ray Train worker: train one model with :func:`orchestrator.training.fit`,
    checkpoint every ``period`` epochs (and every ``checkpoint_every_s``), publish the
    weights (rank 0). In a trial it also validates at each checkpoint and evaluates after
    the last epoch, every rank predicting its share (no rank waits at Train's report
    barrier while another evaluates)."""
    job = cfg["job"]
    context, spec = job.context, job.training
    plan, config, key = context.plan, spec.config, spec.key
    started = time.time()
    rank, world_size = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    shard = Shard(rank, world_size)
    device = ray.train.torch.get_device()
    seed = spec.train_seed
    evaluation_settings = replace(plan.evaluation, seed=seed)

    torch.manual_seed(seed + rank)
    datas = load_datas(plan.data, spec.categories, config)
    data = training_data(datas, plan.data.texture_bank(datas[0].train_images.shape[-1]))
    model = build_model(spec.method, config).to(device)
    optimizers = model.configure_optimizers()
    start_epoch, train_seconds, resumed_after, losses = 0, 0.0, 0, []
    checkpoint = ray.train.get_checkpoint()
    folder = None
    if checkpoint is not None:
        with checkpoint.as_directory() as restored:
            state = torch.load(Path(restored) / "state.pt", map_location=device, weights_only=False)
        folder = "this run's checkpoint"
    elif job.resume_from:  # a takeover: the latest checkpoint another attempt left
        state = torch.load(io.BytesIO(context.storage.read_bytes(f"{job.resume_from}/state.pt")), map_location=device, weights_only=False)
        folder = job.resume_from
    if folder is not None:
        model.load_state_dict(state["model"])
        if optimizers is not None:
            optimizers.optimizer.load_state_dict(state["optimizer"])
            if optimizers.scheduler is not None:
                optimizers.scheduler.load_state_dict(state["scheduler"])
        start_epoch, train_seconds = state["epoch"], state["train_seconds"]
        losses = list(state.get("losses", []))
        resumed_after = start_epoch
        log.info("model %s resumes after epoch %d from %s", key.short, start_epoch, folder)
    # A method with nothing to train by gradient descent is not wrapped in DDP.
    trained = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) if optimizers else model
    period = validation_period(plan.settings.eval_every, config.epochs, bool(plan.space.asha))
    last_checkpoint = time.monotonic()

    def on_epoch_end(epochs_done: int, terms: dict[str, float], seconds: float) -> None:
        """Every epoch reports its losses; a checkpoint every ``period`` epochs and at least
        every ``checkpoint_every_s`` seconds; in a trial, validation with each periodic
        checkpoint and the whole evaluation after the last epoch."""
        nonlocal last_checkpoint
        losses.append({"epoch": epochs_done, **terms})
        report = {"epoch": epochs_done, "train_seconds": seconds, **{f"train_{k}": v for k, v in terms.items()}}
        periodic = epochs_done % period == 0 or epochs_done == config.epochs
        due = periodic or time.monotonic() - last_checkpoint >= plan.settings.checkpoint_every_s
        if job.in_trial and epochs_done == config.epochs:
            # The trained model is in memory: evaluate validation *and* test here, once,
            # instead of in a task that would reload model and data. Only the validation
            # metrics reach Tune; the whole evaluation is handed to the trial.
            evaluation = evaluate_model(model, datas, evaluation_settings, device, context.trial_dir(job.owner), seconds, shard)
            if rank == 0:
                context.storage.write_text(context.evaluation_path(job.owner, key), evaluation.to_json())
            report.update(evaluation.validation())
        elif job.in_trial and periodic:
            report.update(validate(model, datas, evaluation_settings, device, shard))
        if rank != 0 or not due:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory() as folder:
            state = {"model": model.state_dict(), "epoch": epochs_done, "train_seconds": seconds, "losses": losses,
                     "optimizer": optimizers.optimizer.state_dict() if optimizers else None,
                     "scheduler": optimizers.scheduler.state_dict() if optimizers and optimizers.scheduler else None}
            torch.save(state, Path(folder) / "state.pt")
            ray.train.report(report, checkpoint=Checkpoint.from_directory(folder))
        last_checkpoint = time.monotonic()

    train_seconds = fit(trained, optimizers, data, config, seed, device, start_epoch=start_epoch, train_seconds=train_seconds,
                        rank=rank, world_size=world_size, on_epoch_end=on_epoch_end)
    # The Ray nodes the workers ran on (provenance; Train's own local rank goes by node IP,
    # which two nodes on one machine share).
    nodes = shard.gather(ray.get_runtime_context().get_node_id())
    if rank == 0:
        meta = {"method": spec.method, "categories": list(spec.categories), "epochs": config.epochs, "train_seconds": train_seconds,
                "world_size": world_size, "nodes": sorted(set(nodes)), "device": str(device), "sweep": context.sweep_name,
                "trained_by": job.owner, "resumed_after_epoch": resumed_after, "started_at": started, "losses": losses}
        try:
            ModelStore(context.storage_path).save(key, {k: v.cpu() for k, v in model.state_dict().items()}, meta, token=job.token)
        except StaleLease as exc:  # a successor took the lease over and published: its model stands
            log.error("%s", exc)


def train_model(job: TrainingJob) -> None:
    """Run Ray Train for one model. In a trial its reports reach Tune (and ASHA) and its
    evaluation lands at ``context.evaluation_path``. A run name with checkpoints in the
    storage resumes from its latest one, else from ``job.resume_from``."""
    context = job.context
    s, r = context.plan.settings, context.resources
    if job.in_trial:
        context.storage.delete(context.evaluation_path(job.owner, job.training.key))  # left by an earlier attempt of this trial
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus > 0,
                                     resources_per_worker={k: v for k, v in r.per_worker.items()}),
        run_config=RunConfig(name=job.run_name, storage_path=context.storage.join("train"),
                             failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                             callbacks=[TuneReportCallback()] if job.in_trial else []),  # a pipeline training reports to nobody
    )
    trainer.fit()


def latest_checkpoint(storage: Storage, key: ModelKey) -> str | None:
    """The newest checkpoint any training of ``key`` left (every attempt's Train run is
    named ``train-<key>-...``), so a takeover continues where a dead owner stopped;
    relative to the storage."""
    found = [e for run in storage.list("train") if run.path.startswith(f"train/train-{key.short}")
             for e in storage.list(run.path, recursive=True) if re.search(r"/checkpoint_[^/]+/state\.pt$", e.path)]
    return max(found, key=lambda e: e.mtime).path.rsplit("/", 1)[0] if found else None


def model_ready(context: TrialContext, key: ModelKey) -> bool:
    """The key is published (with ``retrain=true``: published by this sweep)."""
    store = ModelStore(context.storage_path)
    return store.exists(key) and (not context.plan.settings.retrain or store.meta(key).get("sweep") == context.sweep_name)


def ensure_model(context: TrialContext, training: TrainingSpec, owner: str, in_trial: bool) -> bool:
    """Make sure the model exists: train it under its lease, or wait while another holder
    (any sweep sharing the storage) trains it. Returns whether it was trained here."""
    settings = context.plan.settings
    key = training.key
    if not settings.reuse_models:  # every trial trains its own copy (measures the train-once gain)
        train_model(TrainingJob(context, training, owner, None, in_trial))
        return True
    lease = lease_for(context.storage, f"model-{key.key}", owner=f"{context.sweep_name}/{owner}")
    waited = 0.0
    while not model_ready(context, key):
        if lease.acquire():
            lease.hold()
            try:
                if model_ready(context, key):  # published between our check and the lease
                    break
                # A new Train run per attempt, started from the key's latest checkpoint
                # (a resumed trial finds its own run's checkpoint there too).
                resume = None if settings.retrain else latest_checkpoint(context.storage, key)
                train_model(TrainingJob(context, training, owner, resume, in_trial, lease.token))
                if not ModelStore(context.storage_path).exists(key):
                    raise RuntimeError(f"training of model {key.short} finished without publishing weights")
                return True
            finally:
                lease.release()
        time.sleep(2.0)
        waited += 2.0
        if waited % 60 < 2.0:
            holder = lease.read()
            log.info("%s: waiting %.0fs for model %s trained by %s", owner, waited, key.short, holder.owner if holder else "?")
    return False


@dataclass(frozen=True)
class PipelineOutcome:
    """What a pipeline training tells the scheduler."""

    status: str  # trained | exists | elsewhere (another holder has the lease: wait for the store)
    start: float = 0.0  # when the training code began (rank 0)
    end: float = 0.0
    node: str = ""


PIPELINE_LEASES: set[Lease] = set()  # the leases this process's pipeline trainings hold (the scheduler releases them at its end)


def run_pipeline_training(context: TrialContext, training: TrainingSpec) -> PipelineOutcome:
    """Train one pipeline model under its lease, unless it exists or someone else (another
    sweep) holds the lease; then the scheduler waits for the store instead of holding a slot."""
    if model_ready(context, training.key):
        return PipelineOutcome("exists")
    owner = f"pipeline-{training.key.short}"
    lease = lease_for(context.storage, f"model-{training.key.key}", owner=f"{context.sweep_name}/{owner}")
    if not lease.acquire():
        return PipelineOutcome("elsewhere")
    lease.hold()
    PIPELINE_LEASES.add(lease)
    try:
        if model_ready(context, training.key):
            return PipelineOutcome("exists")
        resume = None if context.plan.settings.retrain else latest_checkpoint(context.storage, training.key)
        train_model(TrainingJob(context, training, owner, resume, in_trial=False, token=lease.token))
        store = ModelStore(context.storage_path)
        if not store.exists(training.key):
            raise RuntimeError(f"training of model {training.key.short} finished without publishing weights")
        meta = store.meta(training.key)
        return PipelineOutcome("trained", float(meta.get("started_at", 0.0)), time.time(), ",".join(meta.get("nodes", [])))
    finally:
        PIPELINE_LEASES.discard(lease)
        lease.release()


# ------------------------------------------------------------------------- evaluations


@dataclass(frozen=True)
class CategoryOutcome:
    """One category's evaluation, with what the model's training left (for the trial's
    run) and when and where it ran (for the schedule's records)."""

    evaluation: CategoryEvaluation
    train_seconds: float
    losses: list[dict[str, float]]
    start: float
    end: float
    node: str


_WEIGHTS: dict[tuple[str, str, str], tuple[dict, dict]] = {}  # (storage, key, version) -> (state dict, meta), the last two


def stored_weights(storage_path: str, key: ModelKey, version: str) -> tuple[dict, dict]:
    """A task process keeps the last weights it read: a multi-class model's categories, or
    the next trial's evaluation of the same model, do not read them again. (The model is
    built anew each time: its inference fields differ from trial to trial.)"""
    ident = (storage_path, key.key, version)
    if ident not in _WEIGHTS:
        while len(_WEIGHTS) >= 2:
            _WEIGHTS.pop(next(iter(_WEIGHTS)))
        _WEIGHTS[ident] = ModelStore(storage_path).load(key)
    return _WEIGHTS[ident]


def evaluate_stored_category(context: TrialContext, spec: TrialSpec, group: tuple[str, ...], category: str, key: ModelKey,
                             trial_id: str) -> CategoryOutcome:
    """Load a stored model and evaluate one of its categories (a Ray task holding one
    worker's resources)."""
    start = time.time()
    plan = context.plan
    device = "cuda" if context.resources.gpus > 0 and torch.cuda.is_available() else "cpu"
    state, meta = stored_weights(context.storage_path, key, ModelStore(context.storage_path).current(key) or "")
    model = build_model(spec.method, spec.config)
    model.load_state_dict(state)
    model.to(device)
    (data,) = load_datas(plan.data, [category], spec.config)
    evaluation = evaluate_category(model, data, group.index(category), replace(plan.evaluation, seed=spec.train_seed), torch.device(device),
                                   context.trial_dir(trial_id))
    return CategoryOutcome(evaluation, float(meta.get("train_seconds", 0.0)), list(meta.get("losses", [])), start, time.time(),
                           ray.get_runtime_context().get_node_id())


# ---------------------------------------------------------------------------- scheduler


class SweepScheduler:
    """The sweep's scheduler (an async actor on a driver node): the policy of
    :mod:`orchestrator.schedule` over the cluster's resources. It runs the pipeline's
    trainings itself and grants trials their evaluations (and in-trial trainings); it
    keeps a :class:`~orchestrator.schedule.TaskRecord` of every job."""

    def __init__(self, context: TrialContext, capacity: dict[str, float], trainings: list[TrainingSpec], autoscaling: bool):
        self.context, self.autoscaling = context, autoscaling
        self.policy = schedule.Scheduler(capacity)
        self.pipeline = {f"train {t.key.short}": t for t in trainings}
        self.waiters: dict[str, asyncio.Future] = {}
        self.added: dict[str, float] = {}
        self.granted: dict[str, float] = {}
        self.model_at: dict[str, float] = {}
        self.failed: dict[str, str] = {}  # model key -> why its training failed
        self.elsewhere: set[str] = set()  # pipeline models another holder is training
        self.records: list[schedule.TaskRecord] = []
        self.wake: asyncio.Event | None = None
        self.last_capacity = 0.0
        self.threads = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(trainings)), thread_name_prefix="pipeline")

    async def start(self) -> int:
        """Queue the pipeline (models already in the store are ready at once) and start
        deciding; returns how many trainings were queued."""
        self.wake = asyncio.Event()
        queued = 0
        for job_id, training in self.pipeline.items():
            if model_ready(self.context, training.key):
                self._model_ready(training.key.key)
                continue
            self._add(schedule.Job.make(job_id, schedule.TRAIN, training.key.key, self.context.resources.per_training,
                                        training.expected.seconds))
            queued += 1
        self.loop = asyncio.get_running_loop().create_task(self._loop())
        return queued

    async def stop(self) -> list[schedule.TaskRecord]:
        """End the decisions (the sweep is over, or interrupted); returns every job's record.
        Trainings still running die with this actor when the driver exits: their leases are
        released now, so that a resumed sweep (or another) continues them from their
        checkpoints at once instead of after the leases' expiry."""
        self.loop.cancel()
        for lease in list(PIPELINE_LEASES):
            lease.release()
        return list(self.records)

    def _add(self, job: schedule.Job) -> None:
        self.policy.add(job)
        self.added.setdefault(job.id, time.time())

    def _model_ready(self, key: str) -> None:
        self.policy.model_ready(key)
        self.model_at.setdefault(key, time.time())

    async def acquire(self, job: schedule.Job) -> tuple[str, Any]:
        """Wait until ``job`` may start: ("granted", time), or ("failed", why) when the
        model an evaluation needs could not be trained."""
        if job.model in self.failed:
            return "failed", self.failed[job.model]
        future = asyncio.get_running_loop().create_future()
        self.waiters[job.id] = future
        self._add(job)
        self.wake.set()
        return await future

    def release(self, job_id: str, start: float, end: float, node: str) -> None:
        """A granted job ended (either way)."""
        job = self.policy.finish(job_id)
        if job is not None:
            self._record(job, start, end, node)
        self.wake.set()

    def release_trial(self, trial_id: str) -> None:
        """A trial ended (Tune says so, even when its process died): whatever it held or
        waited for is released."""
        for job in [j for j in self.policy.running.values() if j.trial == trial_id]:
            self.policy.finish(job.id)
        for job_id in [i for i, (_, j) in self.policy.waiting.items() if j.trial == trial_id]:
            self.policy.cancel(job_id)
            future = self.waiters.pop(job_id, None)
            if future is not None and not future.done():
                future.set_result(("failed", f"trial {trial_id} ended"))
        self.wake.set()

    def _record(self, job: schedule.Job, start: float, end: float, node: str) -> None:
        added = self.added.get(job.id, self.granted.get(job.id, start))
        ready = max(added, self.model_at.get(job.model, added)) if job.kind == schedule.EVALUATE else added
        self.records.append(schedule.TaskRecord(job.id, job.kind, job.model, job.trial, job.needs, ready,
                                                self.granted.get(job.id, start), start or self.granted.get(job.id, end), end, node))

    async def _loop(self) -> None:
        while True:
            self._dispatch()
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=POLL_S)
            except asyncio.TimeoutError:
                pass
            try:
                self._poll()
            except Exception as exc:  # noqa: BLE001 - a storage or GCS hiccup: look again next time
                log.warning("scheduler poll failed: %s", str(exc).splitlines()[0])

    def _dispatch(self) -> None:
        for job in self.policy.start():
            self.granted[job.id] = time.time()
            if job.id in self.pipeline:
                asyncio.get_running_loop().create_task(self._train(job))
            else:
                future = self.waiters.pop(job.id, None)
                if future is not None and not future.done():
                    future.set_result(("granted", self.granted[job.id]))
                else:  # its trial is gone
                    self.policy.finish(job.id)

    async def _train(self, job: schedule.Job) -> None:
        training = self.pipeline[job.id]
        try:
            # In a thread of this actor: each training adds Train's own processes (controller,
            # synchronisation actor, placement-group cleaner) to the driver node, not one more.
            outcome = await asyncio.get_running_loop().run_in_executor(self.threads, run_pipeline_training, self.context, training)
        except Exception as exc:  # noqa: BLE001 - the training failed: trials needing it fail with this reason
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            log.error("training of model %s failed: %s", training.key.short, why)
            self.failed[training.key.key] = why
            self.policy.finish(job.id)
            for job_id, (_, waiting) in list(self.policy.waiting.items()):
                if waiting.model == training.key.key and waiting.kind == schedule.EVALUATE:
                    self.policy.cancel(job_id)
                    future = self.waiters.pop(job_id, None)
                    if future is not None and not future.done():
                        future.set_result(("failed", why))
        else:
            self.policy.finish(job.id)
            if outcome.status == "elsewhere":
                self.elsewhere.add(training.key.key)
            else:
                if outcome.status == "trained":
                    self._record(job, outcome.start, outcome.end, outcome.node)
                self._model_ready(training.key.key)
        self.wake.set()

    def _poll(self) -> None:
        """Models trained elsewhere that evaluations wait for; a pipeline model whose other
        holder died (its lease expired) is queued again; the cluster's size."""
        ours = {t.key.key for t in self.pipeline.values()} - self.elsewhere  # models this scheduler is training or will train
        for key in self.policy.waiting_for_models() - ours:
            if key in self.model_at or key in self.failed:
                continue
            if model_ready(self.context, ModelKey(key, {})):
                self._model_ready(key)
                self.elsewhere.discard(key)
            elif key in self.elsewhere and not lease_for(self.context.storage, f"model-{key}", "").alive():
                self.elsewhere.discard(key)
                training = next(t for t in self.pipeline.values() if t.key.key == key)
                self._add(schedule.Job.make(f"train {training.key.short}", schedule.TRAIN, key, self.context.resources.per_training,
                                            training.expected.seconds))
        if time.monotonic() - self.last_capacity > 10 * POLL_S:
            self.last_capacity = time.monotonic()
            self.policy.set_capacity(cluster(self.autoscaling).capacity(self.context.resources))


def start_scheduler(context: TrialContext, where: Cluster):
    """The sweep's scheduler actor (its lifetime is the driver's), started with the pipeline."""
    actor = ray.remote(SweepScheduler).options(name=context.scheduler_name, namespace=NAMESPACE, num_cpus=0,
                                               resources=context.driver_claim, max_concurrency=10_000,
                                               # its training threads wait on Train's controllers with ray.get, off the event loop
                                               runtime_env={"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}})
    handle = actor.remote(context, where.capacity(context.resources), list(context.plan.trainings), context.plan.settings.autoscaling)
    queued = ray.get(handle.start.remote())
    log.info("pipeline: %d of %d models to train (longest first), %d trial(s) at once",
             queued, len(context.plan.trainings), context.resources.max_concurrent)
    return handle


# ------------------------------------------------------------------------------ the trial


def evaluation_jobs(context: TrialContext, spec: TrialSpec, trial_id: str) -> list[tuple[schedule.Job, tuple[str, ...], str, ModelKey]]:
    """One evaluation job per category of each model the trial needs from the pipeline."""
    plan = context.plan
    jobs = []
    for group in spec.model_groups:
        key = plan.model_key(spec.method, spec.config, group, spec.train_seed)
        for category in group:
            job = schedule.Job.make(f"evaluate {trial_id} {category}", schedule.EVALUATE, key.key, context.resources.per_worker,
                                    plan.evaluation_estimate(spec.method, spec.config, category).seconds, trial=trial_id)
            jobs.append((job, group, category, key))
    return jobs


def evaluate_in_trial(context: TrialContext, spec: TrialSpec, trial_id: str) -> list[ModelEvaluation]:
    """Evaluate every category of the trial's pipeline models, concurrently: each as soon
    as the scheduler grants it (its model exists and a slot is free). Without a scheduler
    (it died), each model is made sure of under its lease and evaluated ungranted."""
    jobs = evaluation_jobs(context, spec, trial_id)
    task = ray.remote(evaluate_stored_category).options(
        num_cpus=context.resources.cpus, num_gpus=context.resources.gpus, resources=dict(context.resources.custom),
        # outside the trial's placement group, which holds only the trial's driver bundle
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    scheduler = context.scheduler()
    outcomes: dict[str, CategoryOutcome] = {}
    grants = {scheduler.acquire.remote(item[0]): item for item in jobs} if scheduler else {}
    running: dict[Any, tuple] = {}
    ungranted = [] if scheduler else list(jobs)
    while grants or running or ungranted:
        for item in ungranted:  # no scheduler: make sure of the model, then evaluate
            job, group, category, key = item
            training = context.plan.training(spec.method, spec.config, group, spec.train_seed)
            ensure_model(context, training, owner=trial_id, in_trial=False)
            running[task.remote(context, spec, group, category, key, trial_id)] = item
        ungranted = []
        done, _ = ray.wait(list(grants) + list(running), num_returns=1)
        ref = done[0]
        if ref in grants:
            item = grants.pop(ref)
            try:
                status, value = ray.get(ref)
            except ray.exceptions.RayActorError:
                log.warning("trial %s: the sweep's scheduler is gone; evaluating without it", trial_id)
                scheduler, ungranted = None, [item, *grants.values()]
                grants = {}
                continue
            if status != "granted":
                raise RuntimeError(f"{item[0].id}: {value}")
            running[task.remote(context, spec, item[1], item[2], item[3], trial_id)] = item
        else:
            item = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception:
                if scheduler is not None:
                    scheduler.release.remote(item[0].id, 0.0, time.time(), "")
                raise
            if scheduler is not None:
                scheduler.release.remote(item[0].id, outcome.start, outcome.end, outcome.node)
            outcomes[item[0].id] = outcome
    models = []
    for group in spec.model_groups:
        parts = [outcomes[job.id] for job, g, _, _ in jobs if g == group]
        models.append(ModelEvaluation([p.evaluation for p in parts], parts[0].train_seconds, parts[0].losses))
    return models


def train_in_trial(context: TrialContext, spec: TrialSpec, trial_id: str) -> tuple[list[ModelEvaluation], int]:
    """Train (or wait for) each model the trial needs that is not in the pipeline, inside
    the trial, holding a grant of the scheduler while it trains; evaluate it in the
    training workers (or, when it was trained elsewhere, in an evaluation task)."""
    models, trained = [], 0
    scheduler = context.scheduler()
    for group in spec.model_groups:
        training = context.plan.training(spec.method, spec.config, group, spec.train_seed)
        job = schedule.Job.make(f"train {trial_id} {training.key.short}", schedule.TRAIN, training.key.key,
                                context.resources.per_training, training.expected.seconds, trial=trial_id)
        granted = _grant(scheduler, job)
        start = time.time()
        try:
            trained_here = ensure_model(context, training, owner=trial_id, in_trial=True)
        finally:
            if granted:
                scheduler.release.remote(job.id, start, time.time(), ray.get_runtime_context().get_node_id())
        trained += int(trained_here)
        handed_over = context.evaluation_path(trial_id, training.key)
        if trained_here and context.storage.exists(handed_over):
            models.append(ModelEvaluation.from_json(context.storage.read_text(handed_over)))
        else:  # trained by someone else, or interrupted after its last epoch and resumed: evaluate from the store
            models += evaluate_in_trial(context, replace(spec, categories=group, model_groups=(group,)), trial_id)
    return models, trained


def _grant(scheduler, job: schedule.Job) -> bool:
    """Wait for the scheduler's grant; False (go ahead ungranted) when there is none."""
    if scheduler is None:
        return False
    try:
        status, value = ray.get(scheduler.acquire.remote(job))
    except ray.exceptions.RayActorError:
        return False
    if status != "granted":
        raise RuntimeError(f"{job.id}: {value}")
    return True


def run_trial(trial_config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: resolve the trial once, report its params, evaluate
    what the pipeline trains and train what it does not, report a TrialResult."""
    started = time.time()
    trial_id = tune.get_context().get_trial_id()
    plan = context.plan
    spec = plan.spec(trial_config)
    tune.report({"params": json_params(plan.trial_params(spec, context.resources))})
    pipeline = plan.pipeline_keys
    in_pipeline = all(plan.model_key(spec.method, spec.config, g, spec.train_seed).key in pipeline for g in spec.model_groups)
    if in_pipeline:
        models, trained = evaluate_in_trial(context, spec, trial_id), 0
    else:
        models, trained = train_in_trial(context, spec, trial_id)
    keys = [plan.model_key(spec.method, spec.config, g, spec.train_seed).short for g in spec.model_groups]
    result = TrialResult(models=models, model_keys=keys, models_trained=trained)
    tune.report({**tune_report(result), "trial_seconds": time.time() - started})


def json_params(params: dict[str, Any]) -> str:
    import json

    return json.dumps(params, default=str)


# ------------------------------------------------------------------------------ Tune


class MLflowCallback(tune.Callback):
    """Forwards Tune's trial events (driver side) to the MLflow :class:`TrialRecorder`,
    and tells the scheduler when a trial has ended (a stopped or dead trial's grants
    are released)."""

    def __init__(self, recorder: TrialRecorder, scheduler_name: str):
        self.recorder, self.scheduler_name = recorder, scheduler_name

    def _run(self, trial) -> str:
        config = trial.config
        name = config["spec"] if "spec" in config else spaces_label(config)
        return self.recorder.run_for(trial.trial_id, name)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.recorder.log(self._run(trial), result, step=int(result.get("training_iteration", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Completed without its final result: a scheduler (ASHA) stopped it early.
        self.recorder.finish(self._run(trial), ok=True, stopped_early="result" not in (trial.last_result or {}))
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.recorder.finish(self._run(trial), ok=False, error=str(getattr(trial, "error_file", None) or ""))
        self._release(trial)

    def _release(self, trial) -> None:
        try:
            ray.get_actor(self.scheduler_name, namespace=NAMESPACE).release_trial.remote(trial.trial_id)
        except (ValueError, ray.exceptions.RayActorError):
            pass  # no scheduler (it is gone): nothing to release


def spaces_label(values: dict[str, Any]) -> str:
    """An Optuna trial's label from its sampled values (what :meth:`SweepPlan.spec` names it)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


class ValidatedOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch reads ``result[metric]`` from every result, but a trial reports
    its params first and, when it trains, each epoch's losses, validating only every few
    epochs: the first report without the metric failed the trial (a KeyError inside Tune).
    Such results carry nothing for Optuna, so they are skipped; the final result always has it."""

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
    """Grid: one trial per spec, in the plan's order (the order its models are trained).
    Optuna: one distribution per axis, searched by TPE."""
    space = plan.space
    if space.search == "grid":
        return {"spec": tune.grid_search([s.id for s in plan.specs])}, None
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
    models_trained: int = 0  # models the trial trained itself (not the pipeline's)


def latest_sweep(storage: Storage, prefix: str) -> str | None:
    """The name of the most recent restorable sweep ``<prefix>-<YYYYmmdd-HHMMSS>`` under
    ``<storage>/sweeps`` (names sort by time; object stores have no folder times)."""
    names = sorted(e.path.rsplit("/", 1)[-1] for e in storage.list("sweeps"))
    candidates = [n for n in names if n.startswith(f"{prefix}-")]
    return candidates[-1] if candidates and tune.Tuner.can_restore(storage.join("sweeps", candidates[-1])) else None


@dataclass
class SweepOutcome:
    trials: list[TrialOutcome]
    records: list[schedule.TaskRecord] = field(default_factory=list)


def run_sweep(context: TrialContext, recorder: TrialRecorder, where: Cluster, resume: bool) -> SweepOutcome:
    """Start the sweep's scheduler (and with it the pipeline), then run (or, with
    ``resume``, restore and finish) the sweep's Tune experiment."""
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
    scheduler = start_scheduler(context, where)
    # A trial's own process only drives (Ray Train, or its evaluation tasks) and waits: it
    # claims no CPU (even 0.01 per trial would leave 1.98 of 2 CPUs, and the second trial's
    # 1-CPU worker would never fit), only its share of the drivers' resource.
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    tune.PlacementGroupFactory([{"CPU": 0, **context.driver_claim}]))
    if resume:
        log.info("resuming sweep %s", context.storage.join("sweeps", context.sweep_name))
        tuner = tune.Tuner.restore(context.storage.join("sweeps", context.sweep_name), trainable, resume_errored=True)
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
                                        num_samples=s.num_samples or space.num_samples,
                                        max_concurrent_trials=context.resources.max_concurrent,
                                        # one trial-driver process serves trial after trial instead of
                                        # each paying a fresh process's imports (torch, diffusers, Ray Train);
                                        # not with ASHA: the trial after an early-stopped one never started
                                        reuse_actors=not space.asha),
            run_config=tune.RunConfig(name=context.sweep_name, storage_path=context.storage.join("sweeps"),
                                      failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                      callbacks=[MLflowCallback(recorder, context.scheduler_name)]),
        )
    results = tuner.fit()
    trials = [TrialOutcome(trial_id=str((r.metrics or {}).get("trial_id", Path(r.path).name)), path=str(r.path),
                           error=(str(r.error).splitlines() or [type(r.error).__name__])[0] if r.error else None,
                           models_trained=int((r.metrics or {}).get("models_trained", 0))) for r in results]
    try:
        records = ray.get(scheduler.stop.remote(), timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        records = []
    return SweepOutcome(trials, records)
