"""MLflow: the only place the orchestrator touches it.

One experiment per ablation (named after it), one parent run per sweep, one child run
per Tune trial. All writes happen in the driver (a Tune callback), so a local SQLite
store never sees concurrent writers. The default store is ``sqlite:////<cwd>/mlflow.db``
(absolute: Tune and ``ray job submit`` change working directories).
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
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray.tune import Callback

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
# Result keys logged as metrics (Tune adds its own bookkeeping keys; those are skipped).
METRIC_PREFIXES = ("val_", "test_", "train_", "epoch", "images_per_second", "latency_ms", "model_train_seconds", "models_trained")


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
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client: MlflowClient, name: str) -> str:
    """Create (once, in the driver, before any trial starts) or fetch the experiment."""
    found = mlflow_client.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow_client.create_experiment(name)


def start_sweep_run(mlflow_client: MlflowClient, experiment: str, sweep_name: str, tags: dict[str, str],
                    params: dict[str, Any], resume: bool) -> str:
    """The sweep's parent run; ``resume`` reopens the run of the same sweep."""
    if resume:
        runs = mlflow_client.search_runs([experiment], filter_string=f"tags.sweep = '{sweep_name}'", max_results=1)
        if runs:
            run_id = runs[0].info.run_id
            mlflow_client.update_run(run_id, status="RUNNING")
            return run_id
    run = mlflow_client.create_run(experiment, run_name=sweep_name, tags={"sweep": sweep_name, "kind": "sweep", **tags})
    log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id


def log_params(mlflow_client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    existing = mlflow_client.get_run(run_id).data.params
    fresh = {k: _param(v) for k, v in params.items() if k not in existing}
    for start in range(0, len(fresh), 100):
        chunk = dict(list(fresh.items())[start : start + 100])
        mlflow_client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in chunk.items()])


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in result.items():
        if key.startswith(METRIC_PREFIXES) and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def finish_run(mlflow_client: MlflowClient, run_id: str, ok: bool = True, status: str | None = None) -> None:
    mlflow_client.set_terminated(run_id, status=status or ("FINISHED" if ok else "FAILED"))


class MLflowTrialLogger(Callback):
    """Tune callback (driver side): one child run per trial under the sweep's run.

    ``trial_params(config)`` gives a trial's params (its resolved config, flattened).
    Intermediate results (validation during training) are logged with their step;
    the final result adds test metrics, timings and the sample-map PNGs.
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str, trial_params: Callable[[dict[str, Any]], dict[str, Any]],
                 tags: dict[str, str]):
        self.uri, self.experiment, self.parent = uri, experiment, parent_run_id
        self.trial_params = trial_params
        self.tags = tags
        self.runs: dict[str, str] = {}  # trial_id -> run_id
        self.mlflow = client(uri)

    # Tune pickles callbacks into the experiment state (for resume=true); the client holds
    # a database connection, so it is rebuilt from the URI instead of pickled.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "mlflow"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.mlflow = client(self.uri)

    def _run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        existing = self.mlflow.search_runs(
            [self.experiment], filter_string=f"tags.trial_id = '{trial.trial_id}' and tags.`{PARENT_TAG}` = '{self.parent}'", max_results=1)
        if existing:  # a resumed sweep: keep writing into the trial's run
            run_id = existing[0].info.run_id
            self.mlflow.update_run(run_id, status="RUNNING")
        else:
            run = self.mlflow.create_run(self.experiment, run_name=str(trial), tags={PARENT_TAG: self.parent, "trial_id": trial.trial_id, "kind": "trial", **self.tags})
            run_id = run.info.run_id
            log_params(self.mlflow, run_id, self.trial_params(trial.config))
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        step = int(result.get("training_iteration", 0))
        metrics = numeric_metrics(result)
        stamp = int(time.time() * 1000)
        self.mlflow.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, stamp, step) for k, v in metrics.items()])
        if result.get("model_keys"):
            self.mlflow.set_tag(run_id, "model_keys", result["model_keys"])
        for path in json.loads(result.get("artifacts") or "[]"):
            if Path(path).exists():
                self.mlflow.log_artifact(run_id, path, artifact_path="anomaly_maps")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.mlflow.set_terminated(self._run_for(trial), status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        error = getattr(trial, "error_file", None) or ""
        self.mlflow.set_tag(run_id, "error", str(error)[:4000])
        self.mlflow.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED))
