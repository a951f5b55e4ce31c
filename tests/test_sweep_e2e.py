"""End-to-end sweeps through a real embedded Ray and a real SQLite MLflow store.

One inference-only Optuna sweep (TransFusion λ) checks train-once-evaluate-many, the
MLflow layout (parent + one child per trial, params, metrics, images) and the report; a
second run of the same sweep must train nothing.
"""

import json

import mlflow
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
        "method.epochs=2",
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
    assert children["metrics.models_trained"].sum() == 1  # one training, three evaluations
    assert children["params.method.disc_weight"].nunique() == 3
    for column in ("metrics.val_image_auroc", "metrics.test_image_auroc", "metrics.test_aupro", "metrics.images_per_second", "metrics.latency_ms"):
        assert children[column].notna().all(), column
    assert (children["params.method.epochs"] == "2").all()
    assert parents.iloc[0]["tags.git_commit"]
    client = mlflow.tracking.MlflowClient()
    images = client.list_artifacts(children.iloc[0]["run_id"], "anomaly_maps")
    assert len(images) == 2 and all(a.path.endswith(".png") for a in images)

    report = tmp_path / "reports" / "ablations" / "transfusion_lambda.md"
    text = report.read_text()
    assert "validation split" in text and "3 trials" in text
    for suffix in (".csv", ".tex", ".png"):
        assert report.with_suffix(suffix).stat().st_size > 0

    again = sweep.run(args)  # same training config: everything comes from the model store
    runs = mlflow.search_runs(experiment_names=["transfusion_lambda"])
    newest = runs[(runs["tags.kind"] == "trial") & (runs["tags.mlflow.parentRunId"] == again["parent_run_id"])]
    assert len(newest) == 3 and newest["metrics.models_trained"].sum() == 0
