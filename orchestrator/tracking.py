"""MLflow: the only module of the orchestrator that imports it.

Writing: one experiment per ablation (named after it), one parent run per sweep, one
child run per Tune trial, all written from the driver (the Tune callback in
orchestrator/ray_backend.py forwards trial events to :class:`TrialRecorder`), so a local
SQLite store never sees concurrent writers. The default store is
``sqlite:////<cwd>/mlflow.db`` (absolute: Tune and ``ray job submit`` change working
directories). Parent and child runs carry system tags (``system.*``: Python, torch,
CUDA, GPU, Ray and MLflow versions of the driver that recorded them); child runs log the
dataset they ran on as an MLflow dataset input (name, digest, categories, split sizes).

Reading: :func:`search_runs` and :func:`experiment_names` give the report its runs as
pandas frames, :func:`sweep_experiment` finds a sweep by name, :func:`artifact_paths` and
:func:`download_artifact` fetch a run's files. Links into the MLflow UI
(:func:`experiment_url`, :func:`run_url`) open its training-runs view: MLflow 3's UI
needs ``?workflowType=machine_learning`` for that, so every URL built here carries it.

Artifacts: an experiment's artifact location is fixed when it is created. Without one
(:func:`experiment_id`'s ``artifact_location=None``) MLflow picks it: ``./mlruns`` of the
process that created it for a local store (a path other nodes may not see), or
``mlflow-artifacts:/<id>`` behind ``mlflow server --serve-artifacts``, which proxies to the
server's ``--artifacts-destination`` (e.g. ``s3://bucket/path``). An explicit
``s3://...`` location makes clients write to the object store directly (they then need
``MLFLOW_S3_ENDPOINT_URL`` and AWS credentials themselves).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import mlflow
import pandas as pd
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from orchestrator.config import param_text, redact_uri
from orchestrator.results import TrialResult, is_metric
from orchestrator.storage import Storage, is_remote

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
# Where ``mlflow ui`` / ``mlflow server`` listen unless told otherwise.
DEFAULT_UI_URL = "http://127.0.0.1:5000"
# MLflow 3's UI opens an experiment on its GenAI view unless asked for the training runs.
UI_QUERY = "workflowType=machine_learning"


# ---------------------------------------------------------------------------- UI links


def experiment_url(ui_url: str | None, experiment: str) -> str:
    """The experiment's runs table in the MLflow UI at ``ui_url`` (default: ``mlflow ui``'s address)."""
    return f"{(ui_url or DEFAULT_UI_URL).rstrip('/')}/#/experiments/{experiment}?{UI_QUERY}"


def run_url(ui_url: str | None, experiment: str, run_id: str, artifact: str | None = None) -> str:
    """A run's page in the MLflow UI; ``artifact``: its artifacts tab opened on that path
    ("" for the tab itself)."""
    tab = "" if artifact is None else "/artifacts" + (f"/{artifact.strip('/')}" if artifact.strip("/") else "")
    return f"{(ui_url or DEFAULT_UI_URL).rstrip('/')}/#/experiments/{experiment}/runs/{run_id}{tab}?{UI_QUERY}"


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {redact_uri(uri)}"


def review_hint(uri: str, experiment: str, run_id: str, ui_url: str | None = None) -> str:
    """What a CLI prints at its end: how to start the UI (a local store) or where it is (a
    server), and the link to the sweep's run. Credentials in the URI are never printed."""
    if uri.startswith(("http://", "https://")):
        return f"review the runs: open {run_url(ui_url or redact_uri(uri), experiment, run_id)}"
    return f"review the runs: {ui_command(uri)}\n  then open {run_url(ui_url, experiment, run_id)}"


# --------------------------------------------------------------------------- system tags


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def system_tags() -> dict[str, str]:
    """Versions and accelerator of this process's machine (the driver, which writes every
    run). Versions come from package metadata: importing Ray here is not allowed."""
    tags = {"system.python": platform.python_version(), "system.platform": platform.platform(),
            "system.host": platform.node(), "system.recorded_by": "sweep driver"}
    for package in ("torch", "ray", "mlflow"):
        tags[f"system.{package}"] = _version(package)
    try:
        import torch

        available = torch.cuda.is_available()
        tags["system.cuda_available"] = str(available)
        tags["system.cuda_version"] = str(torch.version.cuda or "none")
        tags["system.gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if available else "none"
    except Exception as exc:  # a broken CUDA install must not stop the sweep from recording
        tags["system.cuda_available"] = f"unknown ({type(exc).__name__})"
    return tags


# ------------------------------------------------------------------------ dataset inputs


def dataset_description(name: str, root: str | None, split_sizes: dict[str, dict[str, int]], **details: Any) -> dict[str, Any]:
    """What :class:`TrialRecorder` logs as each child run's dataset input: the dataset's
    registry name, its root (None = the embedded data), per category the number of images
    per split (e.g. ``{"washer": {"train": 80, "val": 40, "test": 60}}``) and any further
    details that identify the data (seed, val_fraction, foreground)."""
    return {"name": name, "root": root, "splits": split_sizes, **details}


def dataset_input(description: dict[str, Any], categories: list[str]) -> DatasetInput:
    """An MLflow dataset input for the categories one run evaluated: name, a digest of
    everything that identifies the data, the root as its source, categories and split
    sizes as its profile."""
    splits = description.get("splits") or {}
    details = {k: v for k, v in description.items() if k not in ("name", "root", "splits")}
    profile = {"categories": categories,
               "splits": {c: splits[c] for c in categories if c in splits} or "not recorded",
               **details}
    identity = json.dumps({"name": description["name"], "root": description.get("root"), **profile}, sort_keys=True, default=str)
    name = description["name"] + (f"/{categories[0]}" if len(categories) == 1 else "")
    root = description.get("root")
    source = {"uri": str(root) if root else f"embedded {description['name']} dataset"}
    dataset = Dataset(name=name, digest=hashlib.sha256(identity.encode()).hexdigest()[:16], source_type="local",
                      source=json.dumps(source), profile=json.dumps(profile, default=str))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "train/val/test")])


def resolve_uri(setting: str | None) -> str:
    uri = setting or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + str(Path.cwd().resolve() / "mlflow.db")


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


# ------------------------------------------------------------------------ resilient writes


class Spool:
    """MLflow writes that still fail after retries, kept as JSON lines in ``rel`` under the
    sweep's storage (a folder or an object store) and replayed later — at the end of the
    sweep and when ``resume=true`` restarts it — so an MLflow outage neither fails a sweep
    nor loses a metric. Only the driver writes it. Retries with backoff come on top of
    MLflow's own HTTP retries."""

    BACKOFF_S = (1.0, 2.0, 4.0)

    def __init__(self, storage: Storage, rel: str):
        self.storage, self.rel = storage, rel

    @property
    def path(self) -> str:
        return self.storage.join(self.rel)

    def entries(self) -> list[dict[str, Any]]:
        if not self.storage.exists(self.rel):
            return []
        return [json.loads(line) for line in self.storage.read_text(self.rel).splitlines() if line.strip()]

    def _keep(self, entries: list[dict[str, Any]]) -> None:
        if entries:
            self.storage.write_text(self.rel, "".join(json.dumps(e) + "\n" for e in entries))
        else:
            self.storage.delete(self.rel)

    def write(self, mlflow_client: MlflowClient, op: str, **args: Any) -> bool:
        """Apply one write (``op`` names a client method); True when it reached MLflow."""
        for wait in (*self.BACKOFF_S, None):
            try:
                _apply(mlflow_client, op, args)
                return True
            except Exception as exc:  # noqa: BLE001 - any failure of the store: retry, then spool
                if wait is None:
                    log.warning("MLflow write %s failed (%s); kept in %s for replay", op, str(exc).splitlines()[0][:200], self.path)
                    self._keep([*self.entries(), {"op": op, "args": args}])
                    return False
                time.sleep(wait)
        return False

    def replay(self, mlflow_client: MlflowClient) -> tuple[int, int]:
        """Apply the kept writes in order; returns (replayed, still kept)."""
        entries = self.entries()
        if not entries:
            return 0, 0
        kept = []
        for entry in entries:
            try:
                _apply(mlflow_client, entry["op"], entry["args"])
            except Exception:  # noqa: BLE001 - still unreachable: keep it for the next replay
                kept.append(entry)
        self._keep(kept)
        return len(entries) - len(kept), len(kept)


def _apply(mlflow_client: MlflowClient, op: str, args: dict[str, Any]) -> None:
    if op == "log_batch":  # metrics travel as [key, value, timestamp, step]
        mlflow_client.log_batch(args["run_id"], metrics=[Metric(*m) for m in args["metrics"]])
    elif op in ("set_tag", "log_artifact", "set_terminated"):
        getattr(mlflow_client, op)(**args)
    else:
        raise ValueError(f"unknown MLflow write {op!r}")


def experiment_id(mlflow_client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """Create (once, in the driver, before any trial starts) or fetch the experiment.
    ``artifact_location`` (e.g. ``s3://bucket/mlflow/<name>``) applies only when the
    experiment is created: an existing experiment keeps its own; None = the store's default
    (``./mlruns`` beside a local store, the server's ``--artifacts-destination`` behind
    ``mlflow server --serve-artifacts``)."""
    found = mlflow_client.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow_client.create_experiment(name, artifact_location=artifact_location)


def log_params(mlflow_client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    existing = mlflow_client.get_run(run_id).data.params
    fresh = [Param(k, param_text(v)) for k, v in params.items() if k not in existing]
    for start in range(0, len(fresh), 100):
        mlflow_client.log_batch(run_id, params=fresh[start : start + 100])


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (``mlruns/`` in
    the database's folder; MLflow's own default, ``./mlruns`` of the driver's working
    folder, is the job's temporary copy under ``ray job submit``); None for a server,
    which decides (``--artifacts-destination``)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return None


class SweepRun:
    """The sweep's parent run."""

    def __init__(self, uri: str, experiment_name: str):
        self.uri = uri
        self.client = client(uri)
        self.experiment = experiment_id(self.client, experiment_name, artifact_root(uri))
        self.run_id = ""

    def open(self, sweep_name: str, tags: dict[str, str], params: dict[str, Any], resume: bool) -> str:
        """Create the parent run; ``resume`` reopens the run of the same sweep."""
        if resume:
            runs = self.client.search_runs([self.experiment], filter_string=f"tags.sweep = '{sweep_name}'", max_results=1)
            if runs:
                self.run_id = runs[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                return self.run_id
        run = self.client.create_run(self.experiment, run_name=sweep_name,
                                     tags={"sweep": sweep_name, "kind": "sweep", **system_tags(), **tags})
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, params)
        return self.run_id

    def log_artifact(self, path: str | Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def finish(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)

    def child_runs(self) -> dict[str, str]:
        """trial_id -> run_id of every child run of this sweep."""
        runs = self.client.search_runs([self.experiment], filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'", max_results=50000)
        return {run.data.tags.get("trial_id", run.info.run_id): run.info.run_id for run in runs}

    def trial_states(self) -> dict[str, str]:
        """trial_id -> finished | stopped (early, by the scheduler) | failed | unfinished,
        for every child run of this sweep."""
        runs = self.client.search_runs([self.experiment], filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'", max_results=50000)
        states = {}
        for run in runs:
            status, tags = run.info.status, run.data.tags
            states[tags.get("trial_id", run.info.run_id)] = (
                "failed" if status == "FAILED" else "unfinished" if status != "FINISHED"
                else "stopped" if tags.get("stopped_early") == "true" else "finished")
        return states


def close_dead_sweeps(uri: str, experiment_name: str, storage: str, alive: Callable[[str], bool]) -> list[str]:
    """Mark KILLED the RUNNING parent runs (and their RUNNING children) of sweeps on this
    storage whose driver is gone (``alive(sweep_name)`` is False: its lease expired), so a
    SIGKILLed sweep does not stay RUNNING forever; a live sweep's runs are never touched."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment_name)
    if found is None:
        return []
    closed = []
    parents = mlflow_client.search_runs([found.experiment_id], filter_string="tags.kind = 'sweep' and attributes.status = 'RUNNING'")
    for parent in parents:
        name = parent.data.tags.get("sweep", "")
        if parent.data.tags.get("storage") != storage or alive(name):
            continue
        children = mlflow_client.search_runs([found.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and attributes.status = 'RUNNING'")
        for run in [*children, parent]:
            mlflow_client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(name)
    return closed


class TrialRecorder:
    """One child run per trial under the sweep's run (driver side; picklable, because
    Tune saves its callbacks with the experiment state for ``resume=true``).

    A trial reports its params first (its config as the trial resolved it, flattened):
    they are logged then, with the run's dataset input (``dataset``, see
    :func:`dataset_description`; without it, built from the params and the parent's
    settings). Progress (validation and losses during a training in the trial) is logged
    with its epoch as the step; the final :class:`TrialResult` adds test metrics, timings,
    the sample-map PNGs and the loss curve of each model the pipeline trained for it.
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str, tags: dict[str, str], dataset: dict[str, Any] | None = None,
                 spool: Spool | None = None):
        self.uri, self.experiment, self.parent = uri, experiment, parent_run_id
        self.tags = tags
        self.dataset = dataset
        self.spool = spool
        self.runs: dict[str, str] = {}  # trial_id -> run_id
        self.client = client(uri)

    # The client holds a database connection: rebuilt from the URI instead of pickled.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.client = client(self.uri)

    def run_for(self, trial_id: str, name: str) -> str:
        if trial_id in self.runs:
            return self.runs[trial_id]
        existing = self.client.search_runs(
            [self.experiment], filter_string=f"tags.trial_id = '{trial_id}' and tags.`{PARENT_TAG}` = '{self.parent}'", max_results=1)
        if existing:  # a resumed sweep: keep writing into the trial's run
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment, run_name=name,
                                         tags={PARENT_TAG: self.parent, "trial_id": trial_id, "kind": "trial", **system_tags(), **self.tags})
            run_id = run.info.run_id
        self.runs[trial_id] = run_id
        return run_id

    def _log_dataset(self, run_id: str, params: dict[str, Any]) -> None:
        """The run's dataset as an MLflow input (best effort: never fails a trial)."""
        try:
            description = getattr(self, "dataset", None) or self._dataset_from_parent(params)
            categories = [c for c in str(params.get("categories", "")).split(",") if c]
            self.client.log_inputs(run_id, datasets=[dataset_input(description, categories)])
        except Exception as exc:
            log.warning("could not log the dataset input of run %s: %s", run_id, exc)

    def _dataset_from_parent(self, params: dict[str, Any]) -> dict[str, Any]:
        settings = self.client.get_run(self.parent).data.params
        root = settings.get("settings.data.root")
        return dataset_description(str(params.get("dataset", settings.get("settings.dataset", "unknown"))),
                                   None if root in (None, "None") else root, {},
                                   seed=settings.get("settings.seed"), val_fraction=settings.get("settings.data.val_fraction"),
                                   foreground=settings.get("settings.data.foreground"))

    def log(self, run_id: str, reported: dict[str, Any], step: int) -> None:
        """A Tune result: the trial's params, progress numbers, or a finished trial's whole :class:`TrialResult`."""
        if "params" in reported:
            params = json.loads(reported["params"])
            log_params(self.client, run_id, params)
            self._log_dataset(run_id, params)
        stamp = int(time.time() * 1000)
        step = int(reported.get("epoch", step))
        numbers = {k: float(v) for k, v in reported.items()
                   if is_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            self._write("log_batch", run_id=run_id, metrics=[[k, v, stamp, step] for k, v in numbers.items()])
        if "result" in reported:
            result = TrialResult.from_json(reported["result"])
            self._write("set_tag", run_id=run_id, key="model_keys", value=",".join(result.model_keys))
            curves = [(m, "/" + "+".join(c.category for c in m.categories) if len(result.models) > 1 else "") for m in result.models]
            points = [[f"train_{name}{suffix}", float(value), stamp, int(epoch["epoch"])]
                      for model, suffix in curves for epoch in model.losses for name, value in epoch.items() if name != "epoch"]
            for start in range(0, len(points), 1000):
                self._write("log_batch", run_id=run_id, metrics=points[start : start + 1000])
            for path in result.sample_maps:
                local = local_copy(path)
                if local is not None:
                    self._write("log_artifact", run_id=run_id, local_path=str(local), artifact_path="anomaly_maps")

    def log_numbers(self, run_id: str, numbers: dict[str, float]) -> None:
        """Numbers known only at the sweep's end (costs and shares)."""
        stamp = int(time.time() * 1000)
        self._write("log_batch", run_id=run_id, metrics=[[k, float(v), stamp, 0] for k, v in numbers.items()])

    def finish(self, run_id: str, ok: bool, error: str = "", stopped_early: bool = False) -> None:
        if error:
            self._write("set_tag", run_id=run_id, key="error", value=error[:4000])
        if stopped_early:
            self._write("set_tag", run_id=run_id, key="stopped_early", value="true")
        self._write("set_terminated", run_id=run_id, status=RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))

    def _write(self, op: str, **args: Any) -> None:
        """Through the spool when there is one (retried, kept on failure), else directly."""
        if self.spool is not None:
            self.spool.write(self.client, op, **args)
        else:
            _apply(self.client, op, args)


def local_copy(path: str) -> Path | None:
    """A sample map a worker left in the storage, as a local file MLflow can upload: the
    file itself on a shared folder, a download (kept until the driver exits, for the
    spool's replay) from an object store; None when it is missing."""
    if not is_remote(path):
        return Path(path) if Path(path).exists() else None
    folder, name = path.rsplit("/", 1)
    try:
        data = Storage(folder).read_bytes(name)
    except FileNotFoundError:
        return None
    target = Path(tempfile.gettempdir()) / f"diffad-maps-{os.getpid()}" / hashlib.sha256(folder.encode()).hexdigest()[:12] / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


# ------------------------------------------------------------------------------ reading


def experiment_names(uri: str) -> set[str]:
    return {e.name for e in client(uri).search_experiments()}


def experiment_ids(uri: str) -> dict[str, str]:
    """Experiment name -> id (for links into the UI)."""
    return {e.name: e.experiment_id for e in client(uri).search_experiments()}


def search_runs(uri: str, experiment_name: str) -> pd.DataFrame:
    """Every run of an experiment (columns ``metrics.*``, ``params.*``, ``tags.*``), empty if none."""
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment_name) is None:
        return pd.DataFrame()
    return mlflow.search_runs(experiment_names=[experiment_name], max_results=50000)


def sweep_experiment(uri: str, sweep_name: str) -> str | None:
    """The experiment (= ablation) name holding the parent run of sweep ``sweep_name``."""
    mlflow_client = client(uri)
    experiments = {e.experiment_id: e.name for e in mlflow_client.search_experiments()}
    if not experiments:
        return None
    quoted = sweep_name.replace("'", "\\'")
    runs = mlflow_client.search_runs(list(experiments), filter_string=f"tags.sweep = '{quoted}' and tags.kind = 'sweep'", max_results=1)
    return experiments[runs[0].info.experiment_id] if runs else None


def sweep_names(uri: str) -> list[str]:
    """Every sweep (parent run) name in the store, newest first."""
    mlflow_client = client(uri)
    ids = [e.experiment_id for e in mlflow_client.search_experiments()]
    if not ids:
        return []
    runs = mlflow_client.search_runs(ids, filter_string="tags.kind = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1000)
    return [r.data.tags.get("sweep", r.info.run_name) for r in runs]


def artifact_paths(uri: str, run_id: str, folder: str) -> list[str]:
    """The files directly under ``folder`` among a run's artifacts (sorted)."""
    return sorted(a.path for a in client(uri).list_artifacts(run_id, folder) if not a.is_dir)


def download_artifact(uri: str, run_id: str, path: str, destination: Path) -> Path:
    """Copy one artifact file of a run to ``destination`` (a file path); returns it."""
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bar per image
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
        local = client(uri).download_artifacts(run_id, path, tmp)
        os.replace(local, destination)
    return destination
