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
import queue
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import mlflow
import pandas as pd
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
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


# ------------------------------------------------------------------------ the writer


class PermanentError(Exception):
    """MLflow refused a write for good (a 4xx answer): retrying cannot help."""


def is_permanent(exc: Exception) -> bool:
    """A write MLflow answered with a client error (4xx, not 408/429): retrying cannot help.
    Connection failures and server errors (5xx) are worth retrying."""
    if isinstance(exc, PermanentError):
        return True
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return False


CLIENT_KEY = "diffad.client_key"  # MLflow has no idempotency key for create_run: our own, as a tag


class Writer:
    """Every MLflow write of one driver, on one background thread: callers enqueue and
    return at once (Tune's callback never waits for MLflow), and runs are addressed by a
    *key* of ours, resolved to MLflow's run id when the run is created.

    Each write is tried with backoff (``BACKOFF_S``, on top of MLflow's own HTTP retries).
    One that still fails means MLflow is out: it and every later write go, in order, to
    the spool under ``storage_path`` (artifacts copied into the spool first), and the
    thread probes MLflow every ``probe_s`` seconds; once it answers, the spool is replayed
    and writing resumes. ``resume=true`` replays what an earlier driver left. A write
    MLflow refuses for good (a 4xx) is logged once and moved to a dead-letter file with
    its reason. Run creation is made safe for retries by a client key in a tag: before
    creating, the writer looks for a run with the key; after, it keeps the oldest of any
    duplicates (a retried POST whose first answer was lost creates two) and deletes the rest.
    """

    BACKOFF_S = (1.0, 2.0, 4.0)

    def __init__(self, uri: str, storage: Storage, sweep: str, experiment: str, probe_s: float = 10.0):
        self.uri, self.storage, self.sweep, self.experiment, self.probe_s = uri, storage, sweep, experiment, probe_s
        self.spool_rel, self.dead_rel = f"mlflow-spool/{sweep}.jsonl", f"mlflow-spool/{sweep}.dead.jsonl"
        self.files_rel = f"mlflow-spool/{sweep}-files"
        self.client = client(uri)
        self.run_ids: dict[str, str] = {}
        self.spooled = self.replayed = self.dead = 0
        self.down = False
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._busy = 0  # writes taken off the queue and not yet written, spooled or dead
        self._lock = threading.Condition()
        self._next_probe = 0.0
        self._thread = threading.Thread(target=self._run, name=f"mlflow-writer-{sweep}", daemon=True)
        self._thread.start()

    # ---- the callers' side
    def submit(self, op: str, key: str, **args: Any) -> None:
        with self._lock:
            self._busy += 1
        self._queue.put({"op": op, "key": key, "args": args})

    def run_id(self, key: str) -> str | None:
        return self.run_ids.get(key)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted write is written (or spooled, or dead); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining if remaining is not None else 1.0)
        return True

    def drain(self, timeout: float) -> bool:
        """Wait until every write has reached MLflow: queued ones written and the spool
        replayed (the thread probes an unreachable server every ``probe_s``); False when
        MLflow is still out after ``timeout`` seconds (the spool keeps what is left)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.flush(timeout=max(0.0, deadline - time.monotonic())) and not self.down:
                return True
            time.sleep(1.0)
        return self.flush(timeout=0) and not self.down

    def close(self, timeout: float | None = None) -> bool:
        done = self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout=5)
        return done

    # ---- the thread
    def _run(self) -> None:
        self._replay()  # what an earlier driver of this sweep left
        while True:
            try:
                entry = self._queue.get(timeout=self.probe_s if self.down else 1.0)
            except queue.Empty:
                entry = False
            if entry is None:
                return
            if self.down and time.monotonic() >= self._next_probe:
                self._replay()
            if entry is False:
                continue
            if self.down:
                self._spool([entry])
            else:
                self._write(entry)
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()

    def _write(self, entry: dict[str, Any]) -> None:
        for wait in (*self.BACKOFF_S, None):
            try:
                self._apply(entry)
                return
            except Exception as exc:  # noqa: BLE001 - any failure of the store: retry, then spool
                if is_permanent(exc):
                    self._dead_letter(entry, exc)
                    return
                if wait is None:
                    log.warning("MLflow is not answering (%s); writes go to %s until it is back",
                                str(exc).splitlines()[0][:200], self.storage.join(self.spool_rel))
                    self.down, self._next_probe = True, time.monotonic() + self.probe_s
                    self._spool([entry])
                    return
                time.sleep(wait)

    def _spool(self, entries: list[dict[str, Any]]) -> None:
        """Append to the spool, copying artifacts into it (a driver's temporary files do not
        outlive it; the spool is replayed by whichever driver resumes the sweep)."""
        for entry in entries:
            if entry["op"] == "artifact" and not entry["args"].get("spooled"):
                local = local_copy(entry["args"]["source"])
                if local is None:
                    continue
                folder = f"{self.files_rel}/{uuid.uuid4().hex[:12]}"  # a folder of its own: the artifact keeps its name
                self.storage.upload(local, f"{folder}/{local.name}")
                entry = {**entry, "args": {**entry["args"], "source": self.storage.join(folder, local.name), "spooled": folder}}
            self._append(self.spool_rel, entry)
            self.spooled += 1

    def _append(self, rel: str, entry: dict[str, Any]) -> None:
        existing = self.storage.read_text(rel) if self.storage.exists(rel) else ""
        self.storage.write_text(rel, existing + json.dumps(entry) + "\n")

    def _replay(self) -> None:
        """Write the spool's entries in order; stop at the first that still fails."""
        self._next_probe = time.monotonic() + self.probe_s
        if not self.storage.exists(self.spool_rel):
            self.down = False
            return
        entries = [json.loads(line) for line in self.storage.read_text(self.spool_rel).splitlines() if line.strip()]
        done = 0
        for entry in entries:
            try:
                self._apply(entry)
            except Exception as exc:  # noqa: BLE001
                if is_permanent(exc):
                    self._dead_letter(entry, exc)
                else:
                    self.down = True
                    break
            else:
                self.replayed += 1
                if entry["args"].get("spooled"):
                    self.storage.delete(entry["args"]["spooled"])
            done += 1
        rest = entries[done:]
        if rest:
            self.storage.write_text(self.spool_rel, "".join(json.dumps(e) + "\n" for e in rest))
        else:
            self.storage.delete(self.spool_rel)
            self.down = False
            if done:
                log.info("MLflow answers again: %d spooled writes replayed", done)

    def _dead_letter(self, entry: dict[str, Any], exc: Exception) -> None:
        reason = str(exc).splitlines()[0][:500]
        log.error("MLflow refused %s for %s (%s); kept in %s, not retried", entry["op"], entry["key"], reason,
                  self.storage.join(self.dead_rel))
        self._append(self.dead_rel, {**entry, "reason": reason})
        self.dead += 1

    # ---- one write
    def _apply(self, entry: dict[str, Any]) -> None:
        op, key, args = entry["op"], entry["key"], entry["args"]
        if op == "create":
            self.run_ids[key] = self._create(key, **args)
            return
        run_id = self._resolve(key)
        if op == "params":
            log_params(self.client, run_id, args["params"])
        elif op == "inputs":
            self.client.log_inputs(run_id, datasets=[dataset_input(args["description"], args["categories"])])
        elif op == "metrics":
            for start in range(0, len(args["metrics"]), 1000):
                self.client.log_batch(run_id, metrics=[Metric(*m) for m in args["metrics"][start : start + 1000]])
        elif op == "tag":
            self.client.set_tag(run_id, args["name"], args["value"])
        elif op == "artifact":
            local = local_copy(args["source"])
            if local is not None:  # a sample map whose trial folder is gone: nothing to upload
                self.client.log_artifact(run_id, str(local), artifact_path=args["folder"])
        elif op == "terminate":
            self.client.set_terminated(run_id, status=args["status"])
        else:
            raise PermanentError(f"unknown MLflow write {op!r}")

    def _find(self, key: str, experiment: str) -> list:
        quoted = key.replace("'", "\\'")
        return sorted(self.client.search_runs([experiment], filter_string=f"tags.`{CLIENT_KEY}` = '{quoted}'", max_results=100),
                      key=lambda r: (r.info.start_time, r.info.run_id))

    def _create(self, key: str, experiment: str, name: str, tags: dict[str, str], parent: str | None = None,
                legacy_filter: str | None = None, reopen: bool = False) -> str:
        found = self._find(key, experiment)
        if not found and legacy_filter:  # a run recorded before runs carried a client key
            found = self.client.search_runs([experiment], filter_string=legacy_filter, max_results=1)
        if found:
            if reopen:
                self.client.update_run(found[0].info.run_id, status="RUNNING")
        else:
            extra = {PARENT_TAG: self._resolve(parent)} if parent else {}
            self.client.create_run(experiment, run_name=name, tags={**tags, **extra, CLIENT_KEY: key})
            found = self._find(key, experiment)
        for duplicate in found[1:]:  # a retried POST whose first answer was lost made another
            self.client.delete_run(duplicate.info.run_id)
        return found[0].info.run_id

    def _resolve(self, key: str) -> str:
        """The run of ``key``: created by this writer, or found by its client key (a run an
        earlier driver of the sweep created, when this one replays or resumes)."""
        if key not in self.run_ids:
            found = self._find(key, self.experiment)
            if not found:
                raise PermanentError(f"no MLflow run for {key}: its creation was refused")
            self.run_ids[key] = found[0].info.run_id
        return self.run_ids[key]


_WRITERS: dict[tuple[str, str, str], Writer] = {}


def writer_for(uri: str, storage: Storage, sweep: str, experiment: str) -> Writer:
    """This driver's writer for a sweep (one thread; a recorder Tune restores from its
    saved state finds the same one)."""
    ident = (uri, storage.uri, sweep)
    if ident not in _WRITERS:
        _WRITERS[ident] = Writer(uri, storage, sweep, experiment)
    return _WRITERS[ident]


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
    """The sweep's parent run, written through the sweep's :class:`Writer` (its key is the
    sweep's name). The experiment is created or found at once: the tracking target was
    checked before the sweep started."""

    def __init__(self, uri: str, experiment_name: str, storage: Storage, sweep_name: str):
        self.uri, self.key = uri, sweep_name
        self.client = client(uri)
        self.experiment = experiment_id(self.client, experiment_name, artifact_root(uri))
        self.writer = writer_for(uri, storage, sweep_name, self.experiment)

    @property
    def run_id(self) -> str:
        """MLflow's id of the run (once written: after :meth:`Writer.flush`)."""
        return self.writer.run_id(self.key) or ""

    def open(self, tags: dict[str, str], params: dict[str, Any], resume: bool) -> None:
        """Create the parent run; ``resume`` reopens the run of the same sweep."""
        self.writer.submit("create", self.key, experiment=self.experiment, name=self.key, reopen=resume,
                           tags={"sweep": self.key, "kind": "sweep", **system_tags(), **tags},
                           legacy_filter=f"tags.sweep = '{self.key}' and tags.kind = 'sweep'")
        self.writer.submit("params", self.key, params=params)

    def log_artifact(self, path: str | Path, folder: str) -> None:
        self.writer.submit("artifact", self.key, source=str(path), folder=folder)

    def log_numbers(self, numbers: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        self.writer.submit("metrics", self.key, metrics=[[k, float(v), stamp, 0] for k, v in numbers.items()])

    def finish(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self.writer.submit("terminate", self.key, status=status)

    def _children(self) -> list:
        return self.client.search_runs([self.experiment], filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'", max_results=50000)

    def child_runs(self) -> dict[str, str]:
        """trial_id -> run_id of every child run of this sweep (read from MLflow)."""
        return {run.data.tags.get("trial_id", run.info.run_id): run.info.run_id for run in self._children()}

    def trial_states(self) -> dict[str, str]:
        """trial_id -> finished | stopped (early, by the scheduler) | failed | unfinished,
        for every child run of this sweep (read from MLflow)."""
        states = {}
        for run in self._children():
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
    """One child run per trial under the sweep's run, written through the sweep's
    :class:`Writer` (driver side; picklable, because Tune saves its callbacks with the
    experiment state for ``resume=true``: a restored recorder finds this driver's writer).

    A trial reports its params first (its config as the trial resolved it, flattened):
    they are logged then, with the run's dataset input (``dataset``, see
    :func:`dataset_description`). Progress (validation and losses during a training in the
    trial) is logged with its epoch as the step; the final :class:`TrialResult` adds test
    metrics, timings, the sample-map PNGs and the loss curve of each model the pipeline
    trained for it. A run's key is ``<sweep>/<trial id>``.
    """

    def __init__(self, parent: SweepRun, tags: dict[str, str], dataset: dict[str, Any]):
        self.uri, self.storage, self.sweep, self.experiment = parent.uri, parent.writer.storage, parent.key, parent.experiment
        self.tags, self.dataset = tags, dataset
        self.states: dict[str, str] = {}  # trial id -> finished | stopped | failed, as Tune reported them in this driver
        self._opened: set[str] = set()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_opened"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._opened = set()  # a restored recorder reopens its trials' runs (found by their keys)

    @property
    def writer(self) -> Writer:
        return writer_for(self.uri, self.storage, self.sweep, self.experiment)

    def run_for(self, trial_id: str, name: str) -> str:
        """The key of the trial's run; the run is created (or, resumed, reopened) once."""
        key = f"{self.sweep}/{trial_id}"
        if key not in self._opened:
            self._opened.add(key)
            self.writer.submit("create", key, experiment=self.experiment, name=name, parent=self.sweep, reopen=True,
                               tags={"trial_id": trial_id, "kind": "trial", **system_tags(), **self.tags})
        return key

    def log(self, key: str, reported: dict[str, Any], step: int) -> None:
        """A Tune result: the trial's params, progress numbers, or a finished trial's whole :class:`TrialResult`."""
        if "params" in reported:
            params = json.loads(reported["params"])
            self.writer.submit("params", key, params=params)
            self.writer.submit("inputs", key, description=self.dataset, categories=[c for c in str(params.get("categories", "")).split(",") if c])
        stamp = int(time.time() * 1000)
        step = int(reported.get("epoch", step))
        numbers = {k: float(v) for k, v in reported.items()
                   if is_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            self.writer.submit("metrics", key, metrics=[[k, v, stamp, step] for k, v in numbers.items()])
        if "result" in reported:
            result = TrialResult.from_json(reported["result"])
            self.writer.submit("tag", key, name="model_keys", value=",".join(result.model_keys))
            curves = [(m, "/" + "+".join(c.category for c in m.categories) if len(result.models) > 1 else "") for m in result.models]
            points = [[f"train_{name}{suffix}", float(value), stamp, int(epoch["epoch"])]
                      for model, suffix in curves for epoch in model.losses for name, value in epoch.items() if name != "epoch"]
            if points:
                self.writer.submit("metrics", key, metrics=points)
            for path in result.sample_maps:
                self.writer.submit("artifact", key, source=path, folder="anomaly_maps")

    def log_numbers(self, key: str, numbers: dict[str, float]) -> None:
        """Numbers known only at the sweep's end (costs and shares)."""
        stamp = int(time.time() * 1000)
        self.writer.submit("metrics", key, metrics=[[k, float(v), stamp, 0] for k, v in numbers.items()])

    def finish(self, key: str, ok: bool, error: str = "", stopped_early: bool = False) -> None:
        trial_id = key.rsplit("/", 1)[-1]
        self.states[trial_id] = "failed" if not ok else "stopped" if stopped_early else "finished"
        if error:
            self.writer.submit("tag", key, name="error", value=error[:4000])
        if stopped_early:
            self.writer.submit("tag", key, name="stopped_early", value="true")
        self.writer.submit("terminate", key, status=RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


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
