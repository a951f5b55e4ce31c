"""The MLflow writer: every write on a background thread, an outage spooled under the
storage and replayed in order, run creation safe to retry, refused writes set aside.
Real MLflow clients on a SQLite store; the outage is the store's client failing the way
an unreachable server fails (tests/test_faults.py stops a real server)."""

import json
import shutil
import threading
import time

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from orchestrator import tracking
from orchestrator.storage import Storage


@pytest.fixture
def store(tmp_path, empty_store, monkeypatch):
    monkeypatch.setattr(tracking.Writer, "BACKOFF_S", (0.0,))
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, tracking.experiment_id(tracking.client(uri), "writer")


class Outage:
    """While ``on``, every MLflow call of the wrapped client fails as a lost connection does."""

    def __init__(self, client):
        self.client, self.on, self.calls = client, False, 0

    def __getattr__(self, name):
        method = getattr(self.client, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.on:
                raise MlflowException("API request failed with exception ConnectionError: the server is down")
            return method(*args, **kwargs)
        return call


def wait(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_write_returns_at_once_while_mlflow_is_slow(store, tmp_path):
    uri, experiment = store
    writer = tracking.Writer(uri, Storage(tmp_path / "ray"), "sweep", experiment)
    release = threading.Event()
    real = writer.client.create_run
    writer.client.create_run = lambda *a, **k: (release.wait(30), real(*a, **k))[1]
    started = time.monotonic()
    writer.submit("create", "sweep/t1", experiment=experiment, name="t1", tags={"kind": "trial"})
    writer.submit("metrics", "sweep/t1", metrics=[["val_image_auroc", 0.5, 1, 1]])
    assert time.monotonic() - started < 0.5 and not writer.flush(timeout=0.5)  # queued, not written
    release.set()
    assert writer.flush(timeout=30)
    assert tracking.client(uri).get_run(writer.run_id("sweep/t1")).data.metrics == {"val_image_auroc": 0.5}
    writer.close()


def test_an_outage_is_spooled_in_order_and_replayed_when_mlflow_answers(store, tmp_path):
    uri, experiment = store
    storage = Storage(tmp_path / "ray")
    writer = tracking.Writer(uri, storage, "sweep", experiment, probe_s=0.2)
    outage = Outage(writer.client)
    writer.client = outage
    writer.submit("create", "sweep", experiment=experiment, name="sweep", tags={"kind": "sweep"})
    assert writer.flush(timeout=30)
    outage.on = True
    artifact = tmp_path / "map.png"
    artifact.write_bytes(b"png")
    writer.submit("create", "sweep/t1", experiment=experiment, name="t1", parent="sweep", tags={"kind": "trial"})
    for step in (1, 2):
        writer.submit("metrics", "sweep/t1", metrics=[["train_loss", 1.0 / step, step, step]])
    writer.submit("artifact", "sweep/t1", source=str(artifact), folder="anomaly_maps")
    writer.submit("terminate", "sweep/t1", status="FINISHED")
    assert writer.flush(timeout=30) and writer.down and writer.spooled == 5 and writer.replayed == 0
    spooled = [json.loads(line) for line in (tmp_path / "ray" / "mlflow-spool" / "sweep.jsonl").read_text().splitlines()]
    assert [e["op"] for e in spooled] == ["create", "metrics", "metrics", "artifact", "terminate"]
    artifact.unlink()  # the driver's file is gone: the spool kept its own copy
    outage.on = False
    wait(lambda: not writer.down)
    assert writer.replayed == 5 and not (tmp_path / "ray" / "mlflow-spool" / "sweep.jsonl").exists()
    assert not list((tmp_path / "ray" / "mlflow-spool").glob("sweep-files/*"))  # copies removed once uploaded
    client = tracking.client(uri)
    run = client.get_run(writer.run_id("sweep/t1"))
    assert run.info.status == "FINISHED" and run.data.tags[tracking.PARENT_TAG] == writer.run_id("sweep")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] == [(1, 1.0), (2, 0.5)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "anomaly_maps")] == ["anomaly_maps/map.png"]
    writer.close()


def test_another_driver_replays_what_was_spooled_into_the_same_runs(store, tmp_path):
    """resume=true: a new driver's writer replays the spool first, finding the runs an
    earlier driver created by their client keys."""
    uri, experiment = store
    storage = Storage(tmp_path / "ray")
    first = tracking.Writer(uri, storage, "sweep", experiment)
    first.submit("create", "sweep/t1", experiment=experiment, name="t1", tags={"kind": "trial"})
    assert first.flush(timeout=30)
    run_id = first.run_id("sweep/t1")
    first.client = Outage(first.client)
    first.client.on = True
    first.submit("metrics", "sweep/t1", metrics=[["val_image_auroc", 0.9, 1, 3]])
    assert first.flush(timeout=30) and first.spooled == 1
    first.close()
    second = tracking.Writer(uri, storage, "sweep", experiment)
    assert second.flush(timeout=30)
    wait(lambda: second.replayed == 1)
    second.submit("create", "sweep/t1", experiment=experiment, name="t1", tags={"kind": "trial"}, reopen=True)
    assert second.flush(timeout=30) and second.run_id("sweep/t1") == run_id  # found, not created again
    assert tracking.client(uri).get_run(run_id).data.metrics == {"val_image_auroc": 0.9}
    second.close()


def test_a_create_whose_answer_was_lost_leaves_one_run(store, tmp_path):
    """MLflow has no idempotency key: the first POST created the run but its answer never
    came, the retry created a second; the writer keeps the older and deletes the other."""
    uri, experiment = store
    writer = tracking.Writer(uri, Storage(tmp_path / "ray"), "sweep", experiment)
    real, calls = writer.client.create_run, []

    def lossy(*args, **kwargs):
        calls.append(1)
        run = real(*args, **kwargs)
        if len(calls) == 1:
            real(*args, **kwargs)  # a retry below MLflow's client (its own HTTP retries) made a second one
            raise MlflowException("API request failed with exception ReadTimeout: the answer was lost")
        return run
    writer.client.create_run = lossy
    writer.submit("create", "sweep/t1", experiment=experiment, name="t1", tags={"kind": "trial"})
    writer.submit("tag", "sweep/t1", name="k", value="v")
    assert writer.flush(timeout=30) and writer.spooled == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_ids=[experiment])
    assert len(runs) == 1 and runs.iloc[0]["tags.k"] == "v" and runs.iloc[0][f"tags.{tracking.CLIENT_KEY}"] == "sweep/t1"
    assert len(calls) == 1  # found by its key on the retry: not created a third time
    writer.close()


def test_a_refused_write_is_set_aside_once_and_the_rest_goes_on(store, tmp_path):
    uri, experiment = store
    writer = tracking.Writer(uri, Storage(tmp_path / "ray"), "sweep", experiment)
    writer.submit("create", "sweep/t1", experiment=experiment, name="t1", tags={"kind": "trial"})
    writer.submit("tag", "sweep/t1", name="x" * 300, value="v")  # MLflow answers 400 (INVALID_PARAMETER_VALUE): a tag name that long
    writer.submit("tag", "sweep/t1", name="after", value="yes")
    assert writer.flush(timeout=30) and writer.dead == 1 and writer.spooled == 0
    (dead,) = [json.loads(line) for line in (tmp_path / "ray" / "mlflow-spool" / "sweep.dead.jsonl").read_text().splitlines()]
    assert dead["op"] == "tag" and "exceeds the maximum length" in dead["reason"], dead  # the reason is what MLflow said
    assert tracking.client(uri).get_run(writer.run_id("sweep/t1")).data.tags["after"] == "yes"
    writer.close()
