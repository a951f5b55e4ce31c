"""End-to-end sweeps through a real embedded Ray and a real SQLite MLflow store.

One inference-only Optuna sweep (TransFusion λ) checks train-once-evaluate-many, the
MLflow layout (parent + one child per trial, params, metrics, images) and the report; a
second run of the same sweep, with two objectives, must train nothing and report a Pareto front. An inference-only grid (TransFusion's
final-mask rows) is interrupted with Ctrl-C after its first finished trial and resumed
with resume=true: only the missing trials run, into the same MLflow runs.
"""

import os
import signal
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest

from orchestrator import sweep
from orchestrator.data import list_categories

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def category(cache_dir):
    found = list_categories("synthetic", None, cache_dir=cache_dir)
    assert "washer" in found
    return "washer"


def common(tmp_path, cache_dir, category):
    return [
        f"categories=[{category}]",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"storage_path={tmp_path / 'ray'}",
        f"data.cache_dir={cache_dir}",
        "method.epochs=1",
        "method.steps=5",  # a cheap reverse process: these tests are about orchestration
        "max_concurrent=2",
        "latency_images=1",
        "sample_maps=2",
    ]


def test_inference_only_sweep_trains_once_and_logs_everything(tmp_path, cache_dir, category, ray_shutdown, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["ablation=transfusion_lambda", "num_samples=3"] + common(tmp_path, cache_dir, category)
    summary = sweep.run(args)
    assert summary["trials"] == 3 and summary["failed"] == 0

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["transfusion_lambda"])
    parents = runs[runs["tags.kind"] == "sweep"]
    children = runs[runs["tags.kind"] == "trial"]
    assert len(parents) == 1 and len(children) == 3
    assert set(children["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}
    assert parents.iloc[0]["metrics.models_trained"] == 1 and summary["models_trained"] == 1  # one training, three evaluations
    assert children["metrics.models_trained"].sum() == 0  # the sweep's pipeline trained it, not a trial
    assert children["params.method.disc_weight"].nunique() == 3
    for column in ("metrics.val_image_auroc", "metrics.test_image_auroc", "metrics.test_aupro", "metrics.images_per_second", "metrics.latency_ms"):
        assert children[column].notna().all(), column
    assert (children["params.method.epochs"] == "1").all() and (children["params.method.steps"] == "5").all()
    assert parents.iloc[0]["tags.git_commit"]
    client = mlflow.tracking.MlflowClient()
    images = client.list_artifacts(children.iloc[0]["run_id"], "anomaly_maps")
    assert len(images) == 2 and all(a.path.endswith(".png") for a in images)

    report = tmp_path / "reports" / "ablations" / "transfusion_lambda.md"
    text = report.read_text()
    assert "validation split" in text and "3 trials" in text
    for suffix in (".csv", ".tex", ".png"):
        assert report.with_suffix(suffix).stat().st_size > 0
    board = (tmp_path / "reports" / "leaderboard.md").read_text()  # the λ = 0.95 start point is the default row
    assert "| transfusion | Synthetic | smoke |" in board and "method.epochs=1 method.steps=5" in board

    # Same training config: everything comes from the model store. This time two objectives
    # (validation AUROC and throughput, timed one trial at a time): a Pareto front is reported.
    multi = [a for a in args if not a.startswith("max_concurrent")] + ["objectives=[val_pixel_ap,images_per_second]", "max_concurrent=1"]
    again = sweep.run(multi)
    runs = mlflow.search_runs(experiment_names=["transfusion_lambda"])
    newest = runs[(runs["tags.kind"] == "trial") & (runs["tags.mlflow.parentRunId"] == again["parent_run_id"])]
    assert len(newest) == 3 and again["models_trained"] == 0 and again["failed"] == 0
    parent = runs[runs["run_id"] == again["parent_run_id"]].iloc[0]
    assert parent["tags.objectives"] == "val_pixel_ap,images_per_second"
    text = report.read_text()
    assert "Pareto front on validation (val_pixel_ap (max), images_per_second (max))" in text, text


def test_interrupted_sweep_resumes_only_the_missing_trials(tmp_path, cache_dir, category, ray_shutdown, monkeypatch):
    """Ctrl-C a running grid sweep after its first finished trial, then resume=true."""
    monkeypatch.chdir(tmp_path)
    args = ["ablation=transfusion_final_mask", "max_concurrent=1"] + [a for a in common(tmp_path, cache_dir, category) if not a.startswith("max_concurrent")]
    env = dict(os.environ, RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    deadline = time.monotonic() + 600
    finished = pd.DataFrame()
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(2)
        try:
            runs = mlflow.search_runs(experiment_names=["transfusion_final_mask"])
        except Exception:  # the store is still being created
            continue
        if "tags.kind" in runs and "status" in runs:
            finished = runs[(runs["tags.kind"] == "trial") & (runs["status"] == "FINISHED")]
            if len(finished):
                break
    assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{proc.stdout.read()[-3000:]}"
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert "resume=true" in output, output[-3000:]
    done_before = dict(zip(finished["run_id"], finished["end_time"]))
    assert 1 <= len(done_before) < 4

    summary = sweep.run(args + ["resume=true"])
    assert summary["failed"] == 0
    runs = mlflow.search_runs(experiment_names=["transfusion_final_mask"])
    parents = runs[runs["tags.kind"] == "sweep"]
    trials = runs[runs["tags.kind"] == "trial"]
    assert len(parents) == 1 and len(trials) == 4  # resumed into the same runs, no duplicates
    assert (trials["status"] == "FINISHED").all()
    assert set(trials["params.method.final_mask"]) == {"combined", "last", "disc", "recon"}
    for run_id, end_time in done_before.items():  # trials finished before the interrupt were not re-run
        assert trials.set_index("run_id").at[run_id, "end_time"] == end_time
    assert len(list((tmp_path / "ray" / "models").glob("*/versions/*"))) == 1  # one inference-only grid, one model
