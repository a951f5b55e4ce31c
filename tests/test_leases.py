"""Leases on the shared storage and the versioned model store, with real processes."""

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from orchestrator.config import resolve_method_config
from orchestrator.data import DataSpec
from orchestrator.leases import Lease
from orchestrator.storage import Storage
from orchestrator.model_store import ModelKey, ModelStore, model_key, prune

HOLD = """
import sys, time
from orchestrator.leases import Lease
from orchestrator.storage import Storage
lease = Lease(Storage(sys.argv[1]), "model-x", owner="other", seconds=float(sys.argv[2]))
assert lease.acquire()
lease.hold()
print("held", flush=True)
time.sleep(600)
"""


def test_one_owner_at_a_time_and_release(tmp_path):
    storage = Storage(tmp_path)
    a, b = Lease(storage, "k", "a"), Lease(storage, "k", "b")
    assert a.acquire() and not b.acquire() and a.acquire()  # re-acquiring one's own lease renews it
    assert a.token == 1
    a.release()
    assert not a.alive() and b.acquire() and b.read().owner == "b" and b.token == 2  # every acquisition: the next token


def test_a_killed_owners_lease_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        mine = Lease(Storage(tmp_path), "model-x", "me")
        assert not mine.acquire() and mine.read().owner == "other"  # alive and renewed: not taken
        proc.kill()
        proc.wait()
        assert mine.acquire() and mine.read().owner == "me"  # its process is gone: taken over at once
    finally:
        proc.kill()


def test_an_unrenewed_lease_expires_and_its_holder_knows_it_lost_it(tmp_path):
    storage = Storage(tmp_path)
    stale = Lease(storage, "k", "far-away", seconds=0.2)
    assert stale.acquire()
    info = json.loads(storage.read_text("leases/k.json"))
    storage.write_text("leases/k.json", json.dumps({**info, "host": "another-host"}))  # not this host: only the clock can tell
    other = Lease(storage, "k", "me")
    assert not other.acquire()
    time.sleep(0.3)
    assert other.acquire() and other.read().owner == "me" and other.token == 2
    assert not stale.renew() and stale.lost  # its next heartbeat finds the record changed


def test_concurrent_acquires_have_one_winner(tmp_path):
    """Three threads race for each of 50 leases; the conditional write lets exactly one win."""
    storage = Storage(tmp_path)
    for round_ in range(50):
        leases = [Lease(storage, f"race-{round_}", f"owner-{i}") for i in range(3)]
        with ThreadPoolExecutor(3) as pool:
            won = list(pool.map(Lease.acquire, leases))
        assert sum(won) == 1, (round_, won)


def test_heartbeat_keeps_a_short_lease(tmp_path):
    held = Lease(Storage(tmp_path), "k", "a", seconds=0.6).hold()
    try:
        assert held.acquire()
        time.sleep(1.5)
        info = held.read()
        assert info.expires > time.time() and not held.lost  # renewed by the heartbeat
    finally:
        held.release()
    assert not held.alive()


PAUSED_HOLDER = """
import sys, time, torch
from orchestrator.leases import Lease
from orchestrator.storage import Storage
from orchestrator.model_store import ModelKey, ModelStore, StaleLease
storage = Storage(sys.argv[1])
lease = Lease(storage, "model-k", owner=sys.argv[2], seconds=2.0)
while not lease.acquire():
    time.sleep(0.2)
lease.hold()
print("holding", lease.token, flush=True)
time.sleep(float(sys.argv[3]))  # training
try:
    ModelStore(storage).save(ModelKey("k" * 64, {}), {"w": torch.full((1,), float(lease.token))}, {"by": sys.argv[2]}, token=lease.token)
    print("published", flush=True)
except StaleLease as exc:
    print("refused", exc, flush=True)
lease.release()
"""


@pytest.mark.slow
def test_a_holder_paused_past_its_lease_cannot_publish_over_its_successor(tmp_path):
    """A holder is stopped (SIGSTOP) mid-training until its lease expired, a successor took
    it over, trained and published; resumed, the first holder finds its lease lost and the
    store refuses its model: the successor's stays current."""
    first = subprocess.Popen([sys.executable, "-c", PAUSED_HOLDER, str(tmp_path), "first", "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().split() == ["holding", "1"]
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run([sys.executable, "-c", PAUSED_HOLDER, str(tmp_path), "second", "0"], capture_output=True, text=True, timeout=120)
        assert second.stdout.split()[:3] == ["holding", "2", "published"], second.stdout + second.stderr
        first.send_signal(signal.SIGCONT)
        out = first.communicate(timeout=120)[0]
    finally:
        first.kill()
    assert "refused" in out and "token 1 is older" in out, out
    state, meta = ModelStore(tmp_path).load(ModelKey("k" * 64, {}))
    assert meta["by"] == "second" and meta["token"] == 2 and float(state["w"]) == 2.0


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
    live = Lease(Storage(storage), "sweep-alive", "driver")
    assert live.acquire()
    closed = tracking.close_dead_sweeps(uri, "transfusion_steps", storage,
                                        alive=lambda name: Lease(Storage(storage), f"sweep-{name}", "").alive())
    assert closed == ["dead"]
    status = {name: [client.get_run(i).info.status for i in pair] for name, pair in ids.items()}
    assert status == {"dead": ["KILLED", "KILLED"], "alive": ["RUNNING", "RUNNING"], "elsewhere": ["RUNNING", "RUNNING"]}
