"""Leases on the shared storage and the versioned model store, with real processes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from orchestrator.config import resolve_method_config
from orchestrator.data import DataSpec
from orchestrator.leases import Lease
from orchestrator.store import ModelStore, model_key, prune

HOLD = """
import sys, time
from orchestrator.leases import Lease
lease = Lease(sys.argv[1], "model-x", owner="other", seconds=float(sys.argv[2]))
assert lease.acquire()
lease.hold()
print("held", flush=True)
time.sleep(600)
"""


def test_one_owner_at_a_time_and_release(tmp_path):
    a, b = Lease(tmp_path, "k", "a"), Lease(tmp_path, "k", "b")
    assert a.acquire() and not b.acquire() and a.acquire()  # re-acquiring one's own lease renews it
    a.release()
    assert b.acquire() and b.read().owner == "b"


def test_a_killed_owners_lease_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        mine = Lease(tmp_path, "model-x", "me")
        assert not mine.acquire() and mine.read().owner == "other"  # alive and renewed: not taken
        proc.kill()
        proc.wait()
        assert mine.acquire() and mine.read().owner == "me"  # its process is gone: taken over at once
    finally:
        proc.kill()


def test_an_unrenewed_lease_expires(tmp_path):
    stale = Lease(tmp_path, "k", "far-away", seconds=0.2)
    assert stale.acquire()
    info = json.loads(stale.path.read_text())
    stale.path.write_text(json.dumps({**info, "host": "another-host"}))  # not this host: only the clock can tell
    other = Lease(tmp_path, "k", "me")
    assert not other.acquire()
    time.sleep(0.3)
    assert other.acquire() and other.read().owner == "me"


def test_heartbeat_keeps_a_short_lease(tmp_path):
    held = Lease(tmp_path, "k", "a", seconds=0.6).hold()
    try:
        assert held.acquire()
        time.sleep(1.5)
        info = json.loads(held.path.read_text())
        assert info["expires"] > time.time()  # renewed by the heartbeat
    finally:
        held.release()
    assert not held.path.exists()


def _key(tmp_path):
    return model_key("transfusion", resolve_method_config("transfusion", "smoke"), DataSpec("synthetic", None, str(tmp_path / "cache"), 0.2, 0), ["washer"])


def test_store_versions_a_retraining_and_prunes_the_old_one(tmp_path, cache_dir):
    key = model_key("transfusion", resolve_method_config("transfusion", "smoke"), DataSpec("synthetic", None, str(cache_dir), 0.2, 0), ["washer"])
    store = ModelStore(tmp_path)
    first = store.save(key, {"w": torch.ones(1)}, {"sweep": "a"})
    second = store.save(key, {"w": torch.zeros(1)}, {"sweep": "b"})  # retrain=true: a new version becomes current
    assert first != second and store.current(key) == second
    state, meta = store.load(key)
    assert torch.equal(state["w"], torch.zeros(1)) and meta["sweep"] == "b" and store.meta(key)["version"] == Path(second).name
    assert prune(tmp_path, min_age_s=3600) == []  # too young: a reader may still be loading it
    assert prune(tmp_path, min_age_s=0) == [first]
    assert store.exists(key) and not Path(first).exists()
    assert (tmp_path / "models" / "SCHEMA").read_text().strip() == "2"


def test_runs_of_a_dead_sweep_are_closed_and_a_live_ones_are_not(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "ray")
    client = MlflowClient(uri)
    experiment = client.create_experiment("transfusion_steps")
    ids = {}
    for name in ("dead", "alive", "elsewhere"):
        parent = client.create_run(experiment, tags={"kind": "sweep", "sweep": name, "storage": storage if name != "elsewhere" else "/other"})
        child = client.create_run(experiment, tags={"kind": "trial", tracking.PARENT_TAG: parent.info.run_id})
        ids[name] = (parent.info.run_id, child.info.run_id)
    live = Lease(tmp_path / "ray" / "leases", "sweep-alive", "driver")
    assert live.acquire()
    closed = tracking.close_dead_sweeps(uri, "transfusion_steps", storage,
                                        alive=lambda name: Lease(tmp_path / "ray" / "leases", f"sweep-{name}", "").alive())
    assert closed == ["dead"]
    status = {name: [client.get_run(i).info.status for i in pair] for name, pair in ids.items()}
    assert status == {"dead": ["KILLED", "KILLED"], "alive": ["RUNNING", "RUNNING"], "elsewhere": ["RUNNING", "RUNNING"]}
