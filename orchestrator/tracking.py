"""MLflow: the only module of the orchestrator that imports it.

Writing: one experiment per ablation (named after it), one parent run per sweep, one
child run per Tune trial, all written from the driver (the Tune callback in
orchestrator/ray_backend.py forwards trial events to :class:`TrialRecorder`), so a local
SQLite store never sees concurrent writers. The default store is
``sqlite:////<cwd>/mlflow.db`` (absolute: Tune and ``ray job submit`` change working
directories). Reading: :func:`search_runs` and :func:`experiment_names` give the report
its runs as pandas frames.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from orchestrator.results import TrialResult, is_metric

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"


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


def experiment_id(mlflow_client: MlflowClient, name: str) -> str:
    """Create (once, in the driver, before any trial starts) or fetch the experiment."""
    found = mlflow_client.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow_client.create_experiment(name)


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)


def log_params(mlflow_client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    existing = mlflow_client.get_run(run_id).data.params
    fresh = [Param(k, _param(v)) for k, v in params.items() if k not in existing]
    for start in range(0, len(fresh), 100):
        mlflow_client.log_batch(run_id, params=fresh[start : start + 100])


class SweepRun:
    """The sweep's parent run."""

    def __init__(self, uri: str, experiment_name: str):
        self.uri = uri
        self.client = client(uri)
        self.experiment = experiment_id(self.client, experiment_name)
        self.run_id = ""

    def open(self, sweep_name: str, tags: dict[str, str], params: dict[str, Any], resume: bool) -> str:
        """Create the parent run; ``resume`` reopens the run of the same sweep."""
        if resume:
            runs = self.client.search_runs([self.experiment], filter_string=f"tags.sweep = '{sweep_name}'", max_results=1)
            if runs:
                self.run_id = runs[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                return self.run_id
        run = self.client.create_run(self.experiment, run_name=sweep_name, tags={"sweep": sweep_name, "kind": "sweep", **tags})
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, params)
        return self.run_id

    def log_artifact(self, path: str | Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def finish(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)


class TrialRecorder:
    """One child run per trial under the sweep's run (driver side; picklable, because
    Tune saves its callbacks with the experiment state for ``resume=true``).

    ``trial_params(trial_config)`` gives a trial's params (its resolved config, flattened).
    Progress (validation and losses during training) is logged with its step; the final
    :class:`TrialResult` adds test metrics, timings and the sample-map PNGs.
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str, trial_params: Callable[[dict[str, Any]], dict[str, Any]],
                 tags: dict[str, str]):
        self.uri, self.experiment, self.parent = uri, experiment, parent_run_id
        self.trial_params = trial_params
        self.tags = tags
        self.runs: dict[str, str] = {}  # trial_id -> run_id
        self.client = client(uri)

    # The client holds a database connection: rebuilt from the URI instead of pickled.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.client = client(self.uri)

    def run_for(self, trial_id: str, name: str, trial_config: dict[str, Any]) -> str:
        if trial_id in self.runs:
            return self.runs[trial_id]
        existing = self.client.search_runs(
            [self.experiment], filter_string=f"tags.trial_id = '{trial_id}' and tags.`{PARENT_TAG}` = '{self.parent}'", max_results=1)
        if existing:  # a resumed sweep: keep writing into the trial's run
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment, run_name=name, tags={PARENT_TAG: self.parent, "trial_id": trial_id, "kind": "trial", **self.tags})
            run_id = run.info.run_id
            log_params(self.client, run_id, self.trial_params(trial_config))
        self.runs[trial_id] = run_id
        return run_id

    def log(self, run_id: str, reported: dict[str, Any], step: int) -> None:
        """A Tune result: the progress numbers, or a finished trial's whole :class:`TrialResult`."""
        stamp = int(time.time() * 1000)
        numbers = {k: float(v) for k, v in reported.items()
                   if is_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self.client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in numbers.items()])
        if "result" in reported:
            result = TrialResult.from_json(reported["result"])
            self.client.set_tag(run_id, "model_keys", ",".join(result.model_keys))
            for path in result.sample_maps:
                if Path(path).exists():
                    self.client.log_artifact(run_id, path, artifact_path="anomaly_maps")

    def finish(self, run_id: str, ok: bool, error: str = "") -> None:
        if error:
            self.client.set_tag(run_id, "error", error[:4000])
        self.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


# ------------------------------------------------------------------------------ reading


def experiment_names(uri: str) -> set[str]:
    return {e.name for e in client(uri).search_experiments()}


def search_runs(uri: str, experiment_name: str) -> pd.DataFrame:
    """Every run of an experiment (columns ``metrics.*``, ``params.*``, ``tags.*``), empty if none."""
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment_name) is None:
        return pd.DataFrame()
    return mlflow.search_runs(experiment_names=[experiment_name], max_results=50000)
