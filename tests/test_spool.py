"""MLflow writes during an outage: retried, kept under the storage, replayed later (real
MLflow clients: an unreachable server, then a SQLite store)."""

import shutil

import mlflow
import pytest

from orchestrator import tracking
from orchestrator.storage import Storage


def test_failed_writes_are_kept_and_replayed_in_order(tmp_path, empty_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(tracking.Spool, "BACKOFF_S", (0.0,))
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tracking.client(uri)
    run_id = store.create_run(tracking.experiment_id(store, "spool")).info.run_id
    artifact = tmp_path / "map.png"
    artifact.write_bytes(b"png")

    spool = tracking.Spool(Storage(tmp_path / "ray"), "mlflow-spool/sweep.jsonl")
    kept = tmp_path / "ray" / "mlflow-spool" / "sweep.jsonl"
    down = tracking.client("http://127.0.0.1:9")  # nothing listens there
    assert not spool.write(down, "log_batch", run_id=run_id, metrics=[["val_image_auroc", 0.75, 1, 3]])
    assert not spool.write(down, "log_artifact", run_id=run_id, local_path=str(artifact), artifact_path="anomaly_maps")
    assert not spool.write(down, "set_terminated", run_id=run_id, status="FINISHED")
    assert len(kept.read_text().splitlines()) == 3
    assert spool.replay(down) == (0, 3)  # still down: everything kept

    assert spool.replay(store) == (3, 0) and not kept.exists()
    run = store.get_run(run_id)
    assert run.data.metrics["val_image_auroc"] == 0.75 and run.info.status == "FINISHED"
    assert [a.path for a in store.list_artifacts(run_id, "anomaly_maps")] == ["anomaly_maps/map.png"]
    assert spool.write(store, "set_tag", run_id=run_id, key="k", value="v") and not kept.exists()


def test_an_unknown_write_is_refused():
    with pytest.raises(ValueError, match="unknown MLflow write"):
        tracking._apply(None, "delete_run", {})
