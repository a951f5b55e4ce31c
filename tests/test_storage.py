"""storage_path as a local folder and its conditional writes (object stores:
tests/test_services.py and tests/test_cluster.py, against a real S3 server)."""

import pytest

from orchestrator.errors import ConfigError
from orchestrator.plan import check_storage
from orchestrator.storage import Storage, is_remote
from orchestrator.tracking import local_copy


def test_local_storage_round_trip_listing_and_delete(tmp_path):
    storage = Storage(tmp_path / "ray")
    assert not storage.remote and storage.uri == str((tmp_path / "ray").resolve())
    storage.write_text("models/k/current", "v1\n")
    storage.write_bytes("models/k/versions/v1/model.pt", b"123")
    assert storage.read_text("models/k/current") == "v1\n" and storage.is_file("models/k/current")
    assert [e.path for e in storage.list("models/k")] == ["models/k/current", "models/k/versions"]
    assert [e.path for e in storage.list("models", recursive=True) if storage.is_file(e.path)] == \
        ["models/k/current", "models/k/versions/v1/model.pt"]
    assert storage.list("absent") == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("absent")
    assert storage.join("models", "k") == str(tmp_path.resolve() / "ray" / "models" / "k")
    assert not list((tmp_path / "ray" / "models" / "k").glob(".*"))  # no temporary file left behind
    storage.delete("models/k")
    storage.delete("models/k")  # absent: nothing to do
    assert storage.list("models") == []


def test_uris_and_their_checks(tmp_path):
    assert is_remote("s3://bucket/x") and is_remote("gs://bucket/x") and not is_remote(tmp_path)
    assert Storage("s3://bucket/x/").join("models", "k") == "s3://bucket/x/models/k"
    with pytest.raises(ConfigError, match="unknown scheme") as error:
        check_storage("ftp://host/x")
    assert "\n" not in str(error.value)
    assert local_copy(str(tmp_path / "absent.png")) is None
    (tmp_path / "map.png").write_bytes(b"png")
    assert local_copy(str(tmp_path / "map.png")) == tmp_path / "map.png"


def test_conditional_writes_on_a_folder(tmp_path):
    storage = Storage(tmp_path)
    tag = storage.create("leases/x.json", b"one")
    assert tag and storage.create("leases/x.json", b"two") is None  # exists: refused
    assert storage.swap("leases/x.json", b"three", "stale") is None  # changed since read: refused
    new = storage.swap("leases/x.json", b"three", tag)
    assert new and storage.read_tagged("leases/x.json") == (b"three", new)
    assert storage.read_tagged("leases/absent.json") is None and storage.swap("leases/absent.json", b"", tag) is None
    storage.check_conditional_writes()  # a folder honours them
    with pytest.raises(ConfigError, match="conditional writes") as error:
        Storage("gs://bucket/x").check_conditional_writes()
    assert "\n" not in str(error.value)


def test_a_sqlite_stores_artifacts_live_beside_it_not_in_the_working_folder(tmp_path, empty_store, monkeypatch):
    """Under `ray job submit` the driver's working folder is the job's temporary copy."""
    import shutil

    from orchestrator import tracking

    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path.parent)
    sweep = tracking.SweepRun(f"sqlite:///{tmp_path / 'mlflow.db'}", "transfusion_steps", Storage(tmp_path / "ray"), "s")
    assert sweep.client.get_experiment(sweep.experiment).artifact_location == (tmp_path / "mlruns").as_uri()
    assert tracking.artifact_root("http://127.0.0.1:5000") is None
