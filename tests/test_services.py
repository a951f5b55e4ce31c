"""The long tests' real services (tests/services.py) work together the way a cluster's
sweep uses them: runs recorded through orchestrator.tracking land in PostgreSQL behind
``mlflow server``, their artifacts in the S3 bucket; pyarrow (how Ray's storage and the
model store reach the bucket) reads and writes the bucket; a restarted MLflow server
still has every run."""

from __future__ import annotations

import uuid

import pytest

from orchestrator import tracking
from orchestrator.storage import Storage

pytestmark = pytest.mark.long


def _record_run(services, tmp_path, experiment: str, artifact_location: str | None = None):
    """A parent run like a sweep's, through orchestrator.tracking: params, a metric, one artifact file."""
    if artifact_location is not None:  # what a setting will pass: the experiment created with a location
        tracking.experiment_id(tracking.client(services.tracking_uri), experiment, artifact_location=artifact_location)
    sweep = tracking.SweepRun(services.tracking_uri, experiment, Storage(tmp_path / "storage"), f"services-sweep-{uuid.uuid4().hex[:6]}")
    sweep.open(tags={"storage": "s3"}, params={"method": "transfusion", "steps": 5}, resume=False)
    sweep.writer.flush()
    run_id = sweep.run_id
    sweep.client.log_metric(run_id, "val_image_auroc", 0.75, step=1)
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    sweep.log_artifact(report, "reports")
    sweep.finish("FINISHED")
    assert sweep.writer.flush(timeout=120) and sweep.writer.spooled == 0
    return sweep, run_id


def _keys(services, prefix: str) -> list[str]:
    listing = services.store.client().list_objects_v2(Bucket=services.store.bucket, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def test_run_is_in_postgres_and_its_artifact_in_the_bucket(services, tmp_path):
    import psycopg

    experiment = f"services-{uuid.uuid4().hex[:8]}"
    sweep, run_id = _record_run(services, tmp_path, experiment)

    run = tracking.client(services.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "transfusion" and run.data.params["steps"] == "5"
    assert run.data.metrics["val_image_auroc"] == 0.75
    assert tracking.artifact_paths(services.tracking_uri, run_id, "reports") == ["reports/report.md"]
    copy = tracking.download_artifact(services.tracking_uri, run_id, "reports/report.md", tmp_path / "copy.md")
    assert copy.read_text() == "# report\n"

    # The run really is a row in PostgreSQL (not a file store somewhere) ...
    with psycopg.connect(services.postgres.uri) as connection:
        row = connection.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
    assert row == ("FINISHED",)
    # ... and the server proxied the artifact into the bucket, under its --artifacts-destination.
    assert tracking.client(services.tracking_uri).get_experiment(sweep.experiment).artifact_location.startswith("mlflow-artifacts:")
    assert f"mlflow-artifacts/{sweep.experiment}/{run_id}/artifacts/reports/report.md" in _keys(services, "mlflow-artifacts/")


def test_explicit_artifact_location_writes_to_the_bucket_directly(services, tmp_path, monkeypatch):
    for name, value in services.s3_env.items():  # the client itself now talks to S3
        monkeypatch.setenv(name, value)
    experiment = f"services-explicit-{uuid.uuid4().hex[:8]}"
    location = f"s3://{services.store.bucket}/explicit/{experiment}"
    sweep, run_id = _record_run(services, tmp_path, experiment, artifact_location=location)

    assert tracking.client(services.tracking_uri).get_experiment(sweep.experiment).artifact_location == location
    assert f"explicit/{experiment}/{run_id}/artifacts/reports/report.md" in _keys(services, f"explicit/{experiment}/")
    assert tracking.artifact_paths(services.tracking_uri, run_id, "reports") == ["reports/report.md"]
    # An existing experiment keeps its location whatever is passed later.
    assert tracking.experiment_id(sweep.client, experiment, artifact_location="s3://elsewhere/x") == sweep.experiment


def _round_trip(filesystem, path: str, payload: bytes) -> bytes:
    with filesystem.open_output_stream(path) as f:
        f.write(payload)
    with filesystem.open_input_stream(path) as f:
        return f.read()


def test_pyarrow_reaches_the_bucket(services, monkeypatch):
    """The forms Ray's storage_path and the model store can use with SeaweedFS (path-style
    addressing, plain http): pyarrow's default (force_virtual_addressing=False) is
    path-style whenever an endpoint is given."""
    import pyarrow.fs as pafs

    store = services.store
    host_port = store.endpoint.removeprefix("http://")
    bucket = store.bucket

    # 1. An explicit S3FileSystem.
    s3 = pafs.S3FileSystem(endpoint_override=host_port, scheme="http", access_key=store.access_key,
                           secret_key=store.secret_key, region=store.region)
    assert _round_trip(s3, f"{bucket}/pyarrow/explicit.bin", b"explicit") == b"explicit"

    # 2. Everything in one URI, e.g. Ray's storage_path: the keys as user:password (pyarrow
    # refuses access_key=/secret_key= query parameters), the endpoint as host:port + scheme.
    uri = (f"s3://{store.access_key}:{store.secret_key}@{bucket}/pyarrow/uri"
           f"?endpoint_override={host_port}&scheme=http&region={store.region}")
    filesystem, path = pafs.FileSystem.from_uri(uri)
    assert path == f"{bucket}/pyarrow/uri"
    assert _round_trip(filesystem, f"{path}/object.bin", b"uri") == b"uri"
    # The object written one way is the object read the other way.
    with s3.open_input_stream(f"{bucket}/pyarrow/uri/object.bin") as f:
        assert f.read() == b"uri"

    # 3. A plain s3:// URI with the endpoint and keys in the environment (AWS_ENDPOINT_URL,
    # scheme included): what a sweep's processes get from `services.env`.
    for name, value in services.s3_env.items():
        monkeypatch.setenv(name, value)
    filesystem, path = pafs.FileSystem.from_uri(f"s3://{bucket}/pyarrow/env")
    assert _round_trip(filesystem, f"{path}/object.bin", b"env") == b"env"

    # Ray resolves storage_path exactly so (pyarrow's from_uri).
    from ray.train._internal.storage import get_fs_and_path

    filesystem, path = get_fs_and_path(f"s3://{bucket}/pyarrow/env")
    assert filesystem.get_file_info(f"{path}/object.bin").size == 3
    assert "pyarrow/env/object.bin" in _keys(services, "pyarrow/")


def test_runs_survive_an_mlflow_server_restart(services, tmp_path):
    experiment = f"services-restart-{uuid.uuid4().hex[:8]}"
    sweep, run_id = _record_run(services, tmp_path, experiment)
    url = services.tracking_uri

    services.mlflow.stop()
    assert not services.mlflow.running
    services.mlflow.start()

    assert services.tracking_uri == url  # same port: clients keep their URI
    run = tracking.client(url).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["val_image_auroc"] == 0.75
    assert tracking.sweep_experiment(url, sweep.key) == experiment  # the sweep's parent run is found again
    assert tracking.artifact_paths(url, run_id, "reports") == ["reports/report.md"]


def test_model_store_spool_and_sample_maps_on_the_bucket(services, tmp_path, monkeypatch, empty_store):
    """What a sweep keeps under storage_path=s3://...: model versions (and their pruning),
    the MLflow spool, sample maps that the driver downloads to log."""
    import numpy as np
    import torch

    from orchestrator.config import resolve_method_config
    from orchestrator.data import DataSpec
    from orchestrator.storage import Storage
    from orchestrator.model_store import ModelStore, model_key, prune
    from orchestrator.visualize import save_sample_maps

    for name, value in services.s3_env.items():
        monkeypatch.setenv(name, value)
    prefix = f"storage-{uuid.uuid4().hex[:8]}"
    storage = Storage(f"s3://{services.store.bucket}/{prefix}")
    storage.probe()
    key = model_key("transfusion", resolve_method_config("transfusion", "smoke"), DataSpec("synthetic", None, str(tmp_path), 0.2, 0), ["washer"])
    store = ModelStore(storage.uri)
    assert not store.exists(key)
    first = store.save(key, {"w": torch.ones(2)}, {"sweep": "a"})
    second = store.save(key, {"w": torch.zeros(2)}, {"sweep": "b"})
    assert store.current(key) == second and second.startswith(f"s3://{services.store.bucket}/{prefix}/models/")
    state, meta = store.load(key)
    assert torch.equal(state["w"], torch.zeros(2)) and meta["sweep"] == "b"
    assert prune(storage.uri, min_age_s=0) == [first] and store.exists(key)
    assert not [k for k in _keys(services, f"{prefix}/models/") if first.split(f"{prefix}/", 1)[1] in k]

    # the MLflow spool on the bucket: an unreachable server's writes, with the artifact copied in
    monkeypatch.setattr(tracking.Writer, "BACKOFF_S", (0.0,))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own HTTP retries would take minutes
    writer = tracking.Writer("http://127.0.0.1:9", storage, "sweep", experiment="0")  # nothing listens there
    (tmp_path / "map.png").write_bytes(b"png")
    writer.submit("artifact", "sweep", source=str(tmp_path / "map.png"), folder="anomaly_maps")
    writer.submit("tag", "sweep", name="k", value="v")
    assert writer.flush(timeout=120) and writer.down and writer.spooled == 2
    kept = _keys(services, f"{prefix}/mlflow-spool/")
    assert f"{prefix}/mlflow-spool/sweep.jsonl" in kept and any(k.endswith("/map.png") for k in kept), kept
    writer.close()

    images = np.zeros((2, 3, 8, 8), np.uint8)
    paths = save_sample_maps(storage.join("artifacts", "sweep", "t1"), "washer", images, np.random.rand(2, 8, 8),
                             np.zeros((2, 8, 8)), np.array([1, 0]), 2)
    assert all(p.startswith("s3://") for p in paths) and len(paths) == 2
    local = tracking.local_copy(paths[0])
    assert local is not None and local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bucket_we_cannot_write_is_one_line(services, monkeypatch):
    from orchestrator.errors import ConfigError
    from orchestrator.plan import check_storage

    for name, value in {**services.s3_env, "AWS_SECRET_ACCESS_KEY": "wrong"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="not writable") as error:
        check_storage(f"s3://{services.store.bucket}/denied")
    assert "\n" not in str(error.value)
