"""Nothing stalls, nothing doubles (long): an MLflow outage, a lost response, a dead
scheduler, leases on a real object store, two clusters on one bucket, a lost worker
node, `ray job stop` and a lost head. Real processes and services only (the session's
SeaweedFS, PostgreSQL and MLflow server: tests/services.py); every test counts the runs
and statuses of every sweep involved.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from bench import sleeper
from orchestrator import tracking
from ray_heads import RayHead, ray_cli

pytestmark = [pytest.mark.slow, pytest.mark.long]


def sleeper_sweep(tmp_path: Path, trials: int, categories: int = 1, *extra: str, storage: str | None = None, uri: str | None = None) -> list[str]:
    """The tokens of a sleeper sweep (bench/sleeper.py) over ``categories`` categories."""
    names = sleeper.write_dataset(tmp_path / "data", categories)
    space = sleeper.write_space(tmp_path / "sleeper_durability.yaml", trials)
    return [f"ablation={space}", "dataset=mvtec_ad", f"data.root={tmp_path / 'data'}", f"categories=[{','.join(names)}]",
            f"data.cache_dir={tmp_path / 'cache'}", f"storage_path={storage or tmp_path / 'ray'}",
            f"tracking_uri={uri or 'sqlite:///' + str(tmp_path / 'mlflow.db')}", "trial.cpus=1", "latency_images=1", "sample_maps=1", *extra]


def sweep_runs(uri: str, experiment: str, sweep_name: str) -> tuple[pd.Series, pd.DataFrame]:
    """One sweep's parent run and its child runs."""
    frame = tracking.search_runs(uri, experiment)
    parent = frame[(frame["tags.kind"] == "sweep") & (frame["tags.sweep"] == sweep_name)]
    assert len(parent) == 1, parent
    children = frame[frame[f"tags.{tracking.PARENT_TAG}"] == parent["run_id"].iloc[0]]
    return parent.iloc[0], children


def trial_times(storage: Path, sweep_name: str) -> list[tuple[float, float]]:
    """(start, end) of every trial by Tune's own clock: its last result's timestamp and time_total_s."""
    spans = []
    for result in (storage / "sweeps" / sweep_name).glob("*/result.json"):
        last = json.loads(result.read_text().strip().splitlines()[-1])
        spans.append((last["timestamp"] - last["time_total_s"], last["timestamp"]))
    return spans


# ------------------------------------------------------------------------- MLflow


@pytest.mark.timeout(1200)
def test_an_mlflow_outage_delays_the_runs_never_the_trials(services, tmp_path, ray_shutdown, monkeypatch):
    """The MLflow server is stopped for three minutes while trials run: by Tune's clock,
    trials keep starting and finishing during the outage; the sweep exits cleanly; every
    write that was spooled is replayed; MLflow then holds every run once, every metric
    history once and every artifact."""
    from orchestrator import sweep
    from orchestrator.ray_backend import start_local_ray

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes per write
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.chdir(tmp_path)
    sleeper.register()
    start_local_ray(num_cpus=2, runtime_env=sleeper.RUNTIME_ENV)
    trials = 16
    tokens = sleeper_sweep(tmp_path, trials, 1, "method.train_seconds=5", "method.eval_seconds=6", "max_concurrent=2",
                           uri=services.tracking_uri)
    outage: dict[str, float] = {}

    def stop_mlflow_for_three_minutes() -> None:
        deadline = time.monotonic() + 600
        while not list((tmp_path / "ray" / "models").glob("*/current")) and time.monotonic() < deadline:
            time.sleep(1)  # the model is trained: the trials are evaluating
        time.sleep(3)
        services.mlflow.stop()
        outage["start"] = time.time()
        time.sleep(180)
        outage["end"] = time.time()
        services.mlflow.start()

    outage_thread = threading.Thread(target=stop_mlflow_for_three_minutes)
    outage_thread.start()
    try:
        summary = sweep.run(tokens)
    finally:
        outage_thread.join()
    assert summary["failed"] == 0 and summary["unfinished"] == 0 and summary["trials"] == trials, summary
    assert summary["mlflow_spooled"] > 0 and summary["mlflow_replayed"] == summary["mlflow_spooled"], summary
    spans = trial_times(tmp_path / "ray", summary["sweep"])
    during = lambda t: outage["start"] < t < outage["end"]  # noqa: E731
    assert any(during(start) for start, _ in spans) and any(during(end) for _, end in spans), (outage, spans)
    parent, children = sweep_runs(services.tracking_uri, "sleeper_durability", summary["sweep"])
    assert parent["status"] == "FINISHED" and len(children) == trials and (children["status"] == "FINISHED").all()
    assert children["tags.trial_id"].is_unique
    client = tracking.client(services.tracking_uri)
    for run_id in children["run_id"]:
        for key in client.get_run(run_id).data.metrics:
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert len(steps) == len(set(steps)), (run_id, key, steps)  # replay wrote each point once
        assert tracking.artifact_paths(services.tracking_uri, run_id, "anomaly_maps"), run_id


class DroppingProxy(ThreadingHTTPServer):
    """Forwards HTTP to ``target``; the first run-creation request reaches the server, but
    its answer is dropped (the connection closes), as a network blip would drop it."""

    def __init__(self, target: str):
        self.target, self.dropped = target, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                upstream = http.client.HTTPConnection(*proxy.target.split(":"), timeout=60)
                upstream.request(self.command, self.path, body=body, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                answer = upstream.getresponse()
                data = answer.read()
                if self.command == "POST" and self.path.endswith("/runs/create") and not proxy.dropped:
                    proxy.dropped += 1
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.mark.timeout(300)
def test_a_run_whose_creation_answer_was_lost_exists_once(services, tmp_path, monkeypatch):
    """MLflow has no idempotency key: its client retries the POST whose answer was lost and
    the server creates a second run; the writer's client key finds both and keeps one."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    proxy = DroppingProxy(services.mlflow.url.removeprefix("http://"))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{proxy.server_address[1]}"
    experiment = tracking.experiment_id(tracking.client(uri), f"lossy-{uuid.uuid4().hex[:6]}")
    from orchestrator.storage import Storage

    writer = tracking.Writer(uri, Storage(tmp_path / "ray"), "lossy", experiment)
    writer.submit("create", "lossy/t1", experiment=experiment, name="t1", tags={"kind": "trial"})
    writer.submit("tag", "lossy/t1", name="after", value="yes")
    assert writer.flush(timeout=120) and writer.spooled == 0 and writer.dead == 0
    writer.close()
    proxy.shutdown()
    assert proxy.dropped == 1
    runs = tracking.client(services.tracking_uri).search_runs([experiment], run_view_type=3)  # active and deleted
    active = [r for r in runs if r.info.lifecycle_stage == "active"]
    assert len(runs) == 2, [r.info.run_id for r in runs]  # the retry did create a second run...
    assert len(active) == 1 and active[0].data.tags["after"] == "yes"  # ...and one is left, with every later write


# ------------------------------------------------------------------------ leases


@pytest.mark.timeout(600)
def test_the_object_store_honours_conditional_writes_under_concurrency(services, tmp_path, monkeypatch):
    """100 rounds of three concurrent acquires of one lease on the bucket: exactly one
    winner each; and a holder paused past its lease cannot publish over its successor."""
    from orchestrator.leases import Lease
    from orchestrator.storage import Storage
    from orchestrator.model_store import ModelKey, ModelStore
    from test_leases import PAUSED_HOLDER

    for name, value in services.s3_env.items():
        monkeypatch.setenv(name, value)
    storage = Storage(f"s3://{services.store.bucket}/leases-{uuid.uuid4().hex[:8]}")
    storage.check_conditional_writes()
    with ThreadPoolExecutor(3) as pool:
        for round_ in range(100):
            won = list(pool.map(Lease.acquire, [Lease(storage, f"race-{round_}", f"owner-{i}") for i in range(3)]))
            assert sum(won) == 1, (round_, won)
    env = {**os.environ, **services.s3_env}
    first = subprocess.Popen([sys.executable, "-c", PAUSED_HOLDER, storage.uri, "first", "3"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout.readline().split() == ["holding", "1"]
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run([sys.executable, "-c", PAUSED_HOLDER, storage.uri, "second", "0"], capture_output=True, text=True,
                                timeout=120, env=env)
        assert second.stdout.split()[:3] == ["holding", "2", "published"], second.stdout + second.stderr
        first.send_signal(signal.SIGCONT)
        out = first.communicate(timeout=120)[0]
    finally:
        first.kill()
    assert "refused" in out, out
    assert ModelStore(storage).load(ModelKey("k" * 64, {}))[1]["by"] == "second"


# --------------------------------------------------------------------- the driver's side


@pytest.mark.timeout(900)
def test_a_dead_scheduler_neither_fails_trials_nor_trains_twice(tmp_path, ray_shutdown, monkeypatch):
    """The sweep's scheduler actor is killed while its pipeline trains: the trials go on
    without it, train what is missing under the models' leases from their checkpoints,
    and each model is published once."""
    import ray

    from orchestrator import sweep
    from orchestrator.ray_backend import NAMESPACE, start_local_ray

    monkeypatch.chdir(tmp_path)
    sleeper.register()
    start_local_ray(num_cpus=2, runtime_env=sleeper.RUNTIME_ENV)
    tokens = sleeper_sweep(tmp_path, 4, 2, "method.train_seconds=24", "method.epochs=4", "method.eval_seconds=1", "checkpoint_every_s=1")
    killed: list[str] = []

    def kill_scheduler() -> None:
        deadline = time.monotonic() + 600
        while not list((tmp_path / "ray" / "train").glob("train-*/checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.5)
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("diffad-scheduler-"):
                ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE))
                killed.append(actor["name"])

    killer = threading.Thread(target=kill_scheduler)
    killer.start()
    summary = sweep.run(tokens)
    killer.join()
    assert killed, "no scheduler to kill"
    assert summary["failed"] == 0 and summary["unfinished"] == 0 and summary["trials"] == 4, summary
    versions = {p.parent.parent.name: len(list(p.parent.glob("*"))) for p in (tmp_path / "ray" / "models").glob("*/versions/*")}
    assert len(versions) == 2 and set(versions.values()) == {1}, versions  # two models, each published once
    metas = [json.loads(p.read_text()) for p in (tmp_path / "ray" / "models").glob("*/versions/*/meta.json")]
    assert any(m["resumed_after_epoch"] > 0 for m in metas), metas  # taken over from a checkpoint, not restarted


# ------------------------------------------------------------------------ clusters


def job_id(output: str) -> str:
    found = re.search(r"(raysubmit_\w+)", output)
    assert found, output[-2000:]
    return found.group(1)


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def synthetic_tree(out: Path) -> Path:
    """The embedded synthetic dataset written out as an MVTec-layout tree (one category)."""
    done = subprocess.run([sys.executable, "-m", "orchestrator.data", "make-synthetic", f"out={out}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for category in [p.name for p in out.iterdir() if p.is_dir() and p.name != "washer"]:
        shutil.rmtree(out / category)
    return out


@pytest.mark.cluster_faults  # not in CI yet: make test-cluster-faults (docs/testing.md)
@pytest.mark.timeout(1200)  # 340 s measured alone on 2 cores
def test_two_clusters_on_one_bucket_train_each_model_once_and_take_over_a_dead_ones(services, tmp_path, cache_dir):
    """Two Ray clusters (two heads, as two RayJobs would have) share one bucket and mount
    the same data at different paths. Two sweeps needing the same model train it once,
    and neither closes the other's live runs. Then one head dies while its sweep trains
    a model; the other cluster's sweep waits for the lease to expire, takes it over and
    finishes from the last checkpoint."""
    first_data = synthetic_tree(tmp_path / "mount-a")
    second_data = tmp_path / "elsewhere" / "mount-b"
    shutil.copytree(first_data, second_data)  # same files, another path (and other modification times)
    storage = f"s3://{services.store.bucket}/two-clusters-{uuid.uuid4().hex[:8]}"
    lease_env = {"DIFFAD_LEASE_SECONDS": "20"}  # a dead holder's lease expires in 20 s
    runtime_env = json.dumps({"env_vars": {**services.env, **lease_env}})
    heads = [RayHead(1, {**os.environ, **services.s3_env, **lease_env}) for _ in range(2)]
    try:
        for head in heads:
            head.wait_for_jobs()

        def args(data: Path, *extra: str) -> list[str]:
            return ["ablation=transfusion_final_mask", "dataset=mvtec_ad", f"data.root={data}", "categories=[washer]",
                    f"data.cache_dir={cache_dir}", f"storage_path={storage}", f"tracking_uri={services.tracking_uri}",
                    "method.steps=5", "latency_images=1", "sample_maps=1", *extra]

        # 1. the same model needed on both clusters at once: trained once
        with ThreadPoolExecutor(2) as pool:
            jobs = list(pool.map(lambda hd: hd[0].submit(args(hd[1], "method.epochs=2")), zip(heads, (first_data, second_data))))
        for job in jobs:
            assert job.returncode == 0 and "succeeded" in job.stdout.lower(), job.stdout[-3000:]
        names = [re.search(r"sweep (transfusion_final_mask-mvtec_ad-\S+): 4 trials", j.stdout).group(1) for j in jobs]
        runs = [sweep_runs(services.tracking_uri, "transfusion_final_mask", name) for name in names]
        assert [p["status"] for p, _ in runs] == ["FINISHED", "FINISHED"]  # neither closed the other's live runs
        assert all(len(c) == 4 and (c["status"] == "FINISHED").all() for _, c in runs)
        assert sum(p["metrics.models_trained"] for p, _ in runs) == 1

        # 2. a head dies mid-training; the other cluster takes the model's lease over
        submitted = heads[0].submit(args(first_data, "method.epochs=8", "checkpoint_every_s=1"), runtime_env=runtime_env, wait=False)
        s3 = services.store.client()
        prefix = storage.split("/", 3)[3] + "/train/"

        def checkpointed() -> bool:  # a checkpoint of a second Train run: the 8-epoch model's
            listing = s3.list_objects_v2(Bucket=services.store.bucket, Prefix=prefix).get("Contents", [])
            return len({o["Key"].split("/")[2] for o in listing if "/checkpoint_" in o["Key"] and o["Key"].endswith("state.pt")}) >= 2

        wait_for(checkpointed, 900, "a checkpoint of the second model")
        heads[0].kill()
        taker = heads[1].submit(args(second_data, "method.epochs=8", "checkpoint_every_s=1"), runtime_env=runtime_env)
        assert taker.returncode == 0 and "succeeded" in taker.stdout.lower(), taker.stdout[-3000:]
        assert job_id(submitted.stdout)
        meta_keys = [o["Key"] for o in s3.list_objects_v2(Bucket=services.store.bucket, Prefix=storage.split("/", 3)[3] + "/models/")["Contents"]
                     if o["Key"].endswith("meta.json")]
        metas = [json.loads(s3.get_object(Bucket=services.store.bucket, Key=k)["Body"].read()) for k in meta_keys]
        eight = [m for m in metas if m["epochs"] == 8]
        assert len(eight) == 1 and eight[0]["resumed_after_epoch"] > 0 and eight[0]["token"] == 2, eight  # taken over, continued
    finally:
        for head in heads:
            head.stop()


@pytest.mark.cluster_faults  # not in CI yet: make test-cluster-faults (docs/testing.md)
@pytest.mark.timeout(900)  # 271 s measured alone on 2 cores
def test_a_lost_worker_node_resumes_the_training_on_the_other(services, tmp_path, cache_dir):
    """The node running a training is lost (its raylet and workers killed): Ray Train
    restarts the worker group on the remaining node from the last checkpoint and the sweep
    finishes, with the model trained once."""
    head = RayHead(0, {**os.environ, **services.s3_env})
    try:
        nodes = [head.add_node(1) for _ in range(2)]
        head.wait_for_jobs()
        storage = f"s3://{services.store.bucket}/node-lost-{uuid.uuid4().hex[:8]}"
        submitted = head.submit(["ablation=transfusion_final_mask", "categories=[washer]", f"data.cache_dir={cache_dir}",
                                 f"storage_path={storage}", f"tracking_uri={services.tracking_uri}", "method.epochs=8", "method.steps=5",
                                 "checkpoint_every_s=1", "latency_images=1", "sample_maps=1", "max_concurrent=1"],
                                runtime_env=json.dumps({"env_vars": services.env}), wait=False)
        assert submitted.returncode == 0, submitted.stderr
        s3, prefix = services.store.client(), storage.split("/", 3)[3]

        def training_node() -> list:
            # Two checkpoints written: the first one's report has returned, so Train has
            # registered it (an upload alone is not yet a checkpoint Train restarts from).
            written = {o["Key"].rsplit("/", 2)[-2] for o in s3.list_objects_v2(Bucket=services.store.bucket, Prefix=f"{prefix}/train/").get("Contents", [])
                       if "/checkpoint_" in o["Key"] and o["Key"].endswith("state.pt")}
            return [n for n in nodes if len(written) >= 2 and any(b"RayTrainWorker" in Path(f"/proc/{p}/cmdline").read_bytes()
                                                                  for p in n.pids() if Path(f"/proc/{p}").exists())]

        wait_for(training_node, 900, "two checkpoints and the node training")
        training_node()[0].kill()
        job = job_id(submitted.stdout)
        wait_for(lambda: head_job_status(head, job) in ("succeeded", "failed", "stopped"), 1200, "the job's end")
        logs = ray_cli("job", "logs", job, env=head.job_env).stdout
        assert head_job_status(head, job) == "succeeded", logs[-3000:]
        name = re.search(r"sweep (transfusion_final_mask-synthetic-\S+): 4 trials", logs).group(1)
        parent, children = sweep_runs(services.tracking_uri, "transfusion_final_mask", name)
        assert parent["status"] == "FINISHED" and len(children) == 4 and (children["status"] == "FINISHED").all()
        metas = [k for k in (o["Key"] for o in s3.list_objects_v2(Bucket=services.store.bucket, Prefix=f"{prefix}/models/")["Contents"])
                 if k.endswith("meta.json")]
        assert len(metas) == 1
        meta = json.loads(s3.get_object(Bucket=services.store.bucket, Key=metas[0])["Body"].read())
        assert meta["resumed_after_epoch"] > 0, (meta, logs[-6000:])
    finally:
        head.stop()


def head_job_status(head: RayHead, job: str) -> str:
    """pending | running | succeeded | failed | stopped (what `ray job status` says)."""
    out = ray_cli("job", "status", job, env=head.job_env).stdout.lower()
    return next((s for s in ("succeeded", "failed", "stopped", "running", "pending") if s in out), "?")


@pytest.mark.cluster_faults  # not in CI yet: make test-cluster-faults (docs/testing.md)
@pytest.mark.timeout(1500)  # about 160 s measured alone on 2 cores
def test_job_stop_and_a_lost_head_end_the_sweep_and_resume_finishes_it(services, tmp_path, cache_dir):
    """`ray job stop` ends a sweep as SIGTERM does: runs KILLED, leases released, and
    `resume=true` goes on. A lost head (no GCS fault tolerance) ends its cluster: on a new
    head `resume=true` trains nothing twice, continues from the checkpoints and finishes."""
    storage = tmp_path / "storage"  # a folder both heads see, as a cluster's shared volume
    env = {**os.environ, **services.s3_env, "RAY_JOB_STOP_WAIT_TIME_S": "300"}  # time for Tune to save its state (120 s was too little on a loaded 2-core machine)
    args = ["ablation=transfusion_final_mask", "categories=[washer]", f"data.cache_dir={cache_dir}", f"storage_path={storage}",
            f"tracking_uri={services.tracking_uri}", "method.epochs=12", "method.steps=5", "checkpoint_every_s=1",
            "latency_images=1", "sample_maps=1", "max_concurrent=1"]
    runtime_env = json.dumps({"env_vars": services.env})
    head = RayHead(2, env)
    try:
        head.wait_for_jobs()
        submitted = head.submit(args, runtime_env=runtime_env, wait=False)
        job = job_id(submitted.stdout)
        wait_for(lambda: any(storage.glob("train/train-*/checkpoint_*")), 900, "a checkpoint")
        stop = ray_cli("job", "stop", job, env=head.job_env, timeout=300)
        assert stop.returncode == 0, stop.stderr
        frame = tracking.search_runs(services.tracking_uri, "transfusion_final_mask")
        mine = frame[(frame["tags.kind"] == "sweep") & (frame["tags.storage"] == str(storage))]
        assert (mine["status"] == "KILLED").all() and len(mine) == 1, mine["status"]
        leases = [json.loads(p.read_text()) for p in (storage / "leases").glob("*.json")]
        assert leases and all(lease["expires"] == 0 for lease in leases), leases  # released, not left to expire

        resumed_at = time.time()
        resumed = head.submit([*args, "resume=true"], runtime_env=runtime_env, wait=False)
        job_id(resumed.stdout)
        wait_for(lambda: any(p.stat().st_mtime > resumed_at for p in storage.glob("train/train-*/checkpoint_*")), 900,
                 "a checkpoint of the resumed training")
        head.kill()  # the head is lost
        head.stop()
        head = RayHead(2, env)
        head.wait_for_jobs()
        final = head.submit([*args, "resume=true"], runtime_env=runtime_env)
        assert final.returncode == 0 and "succeeded" in final.stdout.lower(), final.stdout[-3000:]
        name = mine["tags.sweep"].iloc[0]
        parent, children = sweep_runs(services.tracking_uri, "transfusion_final_mask", name)
        assert parent["status"] == "FINISHED" and len(children) == 4 and (children["status"] == "FINISHED").all()
        metas = [json.loads(p.read_text()) for p in storage.glob("models/*/versions/*/meta.json")]
        assert len(metas) == 1 and metas[0]["resumed_after_epoch"] > 0, metas  # trained once, from where the last head stopped
    finally:
        head.stop()
