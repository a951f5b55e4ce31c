"""Fault injection with real processes (no mocks): killed Train workers, stopped drivers,
two sweeps sharing one model store, ASHA's early stops, DDP evaluation under Train's report
barrier. Long: run by `make test-long` (more in tests/test_durability.py).

Every scenario ends in finished MLflow runs, each trial exactly once, and the model
trained once.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest

from ray_heads import RayHead

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(1500)]  # a hang fails, never blocks CI


def sweep_args(tmp_path, cache_dir, *extra, storage=None):
    return [f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"storage_path={storage or tmp_path / 'ray'}", f"data.cache_dir={cache_dir}",
            "method.steps=5", "latency_images=1", "sample_maps=1", *extra]


def start_sweep(tmp_path, args, env=None):
    env = dict(env or os.environ)
    if "RAY_ADDRESS" not in (env or {}):
        env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def runs(tmp_path, ablation) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        return mlflow.search_runs(experiment_names=[ablation])
    except Exception:  # the store is still being created
        return pd.DataFrame()


def why(output: str) -> str:
    """What a failed sweep's output says: its error lines (a trial's error is logged long
    before the sweep's closing lines) and its end."""
    errors = [line for line in output.splitlines() if re.search(r"Error|error:|failed trial|Traceback", line)]
    return "\n".join(dict.fromkeys(errors))[-6000:] + "\n...\n" + output[-2500:]


def wait_for(predicate, proc, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the sweep ended before {what}:\n{proc.stdout.read()[-3000:]}"
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def children(tmp_path, ablation) -> pd.DataFrame:
    frame = runs(tmp_path, ablation)
    return frame[frame["tags.kind"] == "trial"] if "tags.kind" in frame else frame


def test_killed_train_worker_resumes_from_its_checkpoint(tmp_path, cache_dir):
    """SIGKILL the Ray Train worker mid-training: Train restarts it from the last
    checkpoint (one every second here), the trial finishes once, the model is trained once."""
    args = ["ablation=transfusion_final_mask", "max_concurrent=1"] + sweep_args(tmp_path, cache_dir, "method.epochs=8", "checkpoint_every_s=1")
    proc = start_sweep(tmp_path, args)
    try:
        wait_for(lambda: any((tmp_path / "ray" / "train").glob("train-*/checkpoint_*")), proc, 600, "a checkpoint")
        time.sleep(1)
        # this sweep's own Train worker: in the session of its driver (its embedded Ray's processes are)
        workers = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
        assert workers, "no Ray Train worker process found"
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)
        output = proc.communicate(timeout=900)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 0, why(output)
    trials = children(tmp_path, "transfusion_final_mask")
    assert len(trials) == 4 and (trials["status"] == "FINISHED").all()
    assert runs(tmp_path, "transfusion_final_mask").query("`tags.kind` == 'sweep'")["metrics.models_trained"].tolist() == [1]
    metas = list((tmp_path / "ray" / "models").glob("*/versions/*/meta.json"))
    assert len(metas) == 1
    assert json.loads(metas[0].read_text())["resumed_after_epoch"] > 0  # continued, not restarted


def test_sigterm_marks_the_sweep_killed_and_resume_finishes_it(tmp_path, cache_dir):
    args = ["ablation=transfusion_final_mask", "max_concurrent=1"] + sweep_args(tmp_path, cache_dir, "method.epochs=1")
    proc = start_sweep(tmp_path, args)
    try:
        wait_for(lambda: (children(tmp_path, "transfusion_final_mask").get("status", pd.Series(dtype=str)) == "FINISHED").any(),
                 proc, 600, "a finished trial")
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=300)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert "resume=true" in output, output[-3000:]
    frame = runs(tmp_path, "transfusion_final_mask")
    assert (frame[frame["tags.kind"] == "sweep"]["status"] == "KILLED").all()
    finished_before = children(tmp_path, "transfusion_final_mask")
    finished_before = finished_before[finished_before["status"] == "FINISHED"]

    resumed = start_sweep(tmp_path, args + ["resume=true"])
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, why(output)
    frame = runs(tmp_path, "transfusion_final_mask")
    parents, trials = frame[frame["tags.kind"] == "sweep"], frame[frame["tags.kind"] == "trial"]
    assert len(parents) == 1 and (parents["status"] == "FINISHED").all()
    assert len(trials) == 4 and (trials["status"] == "FINISHED").all()
    assert len(list((tmp_path / "ray" / "models").glob("*/versions/*"))) == 1  # trained once, before the interruption
    for run_id, end_time in zip(finished_before["run_id"], finished_before["end_time"]):  # not run again
        assert trials.set_index("run_id").at[run_id, "end_time"] == end_time


@pytest.fixture
def ray_head():
    """A `ray start --head` of this test's own that both sweeps join (stopped by killing its
    own processes, never `ray stop`)."""
    head = RayHead(2, dict(os.environ))
    try:
        head.wait_for_jobs()
        yield dict(head.env, RAY_ADDRESS=head.gcs)
    finally:
        head.stop()


def test_two_sweeps_sharing_a_store_train_the_model_once(tmp_path, cache_dir, ray_head):
    """Two ablations whose trials need the same default model, started at once on one
    cluster and one storage: the model's lease lets one train it; the other waits and loads it."""
    # One MLflow store each: two drivers writing one SQLite file lock each other (a server is the cluster answer).
    (tmp_path / "lam").mkdir()
    (tmp_path / "final").mkdir()
    lam = start_sweep(tmp_path, ["ablation=transfusion_lambda", "num_samples=2", "max_concurrent=1",
                                 *sweep_args(tmp_path / "lam", cache_dir, "method.epochs=2", storage=tmp_path / "ray")], env=ray_head)
    final = start_sweep(tmp_path, ["ablation=transfusion_final_mask", "max_concurrent=1",
                                   *sweep_args(tmp_path / "final", cache_dir, "method.epochs=2", storage=tmp_path / "ray")], env=ray_head)
    outputs = [p.communicate(timeout=1200)[0] for p in (lam, final)]
    assert lam.returncode == 0 and final.returncode == 0, "\n=====\n".join(why(o) for o in outputs)
    parents = [runs(tmp_path / "lam", "transfusion_lambda"), runs(tmp_path / "final", "transfusion_final_mask")]
    assert sum(p.query("`tags.kind` == 'sweep'")["metrics.models_trained"].sum() for p in parents) == 1
    assert len(list((tmp_path / "ray" / "models").glob("*/versions/*"))) == 1



def test_two_sweeps_at_once_each_with_its_own_embedded_ray(tmp_path, cache_dir):
    """Two drivers started together without RAY_ADDRESS: each starts its own embedded Ray
    (its own temp folder naming its own address, so Ray Train's helpers never see
    "multiple active Ray instances"); both finish, and neither leaves Ray processes behind."""
    procs = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        procs.append(start_sweep(tmp_path / name, ["ablation=transfusion_final_mask", "max_concurrent=1",
                                                   *sweep_args(tmp_path / name, cache_dir, "method.epochs=1")]))
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(why(o) for o in outputs)
    for name, output in zip(("one", "two"), outputs):
        # Ray may warn that it sees two instances; it must never fail to pick its own
        assert "Please specify the one to connect to" not in output
        trials = children(tmp_path / name, "transfusion_final_mask")
        assert len(trials) == 4 and (trials["status"] == "FINISHED").all()
    for p in procs:  # the embedded Ray ends with its driver (its processes may take a while to exit on a loaded machine)
        deadline = time.monotonic() + 60
        while (left := subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, text=True).stdout.split()) and time.monotonic() < deadline:
            time.sleep(2)
        assert not left, f"processes of driver {p.pid} still running 60 s after it exited: {left}"


ASHA_SPACE = """
description: "ASHA over TransFusion's learning rate (test)"
method: transfusion
dataset: synthetic
categories: [washer]
scale: smoke
axes:
  learning_rate: {loguniform: [1.0e-8, 1.0e-2]}
search: optuna
num_samples: 5
# one good rate and one too small to learn anything in an epoch run first (two at a time),
# so both are on ASHA's rung at epoch 1 before the next starts; three more small rates
# (each distinct: one rate is one model, trained once and then only loaded) fall below
# the rung's median and are stopped
points_to_evaluate: [{learning_rate: 1.0e-3}, {learning_rate: 1.0e-8}, {learning_rate: 2.0e-8}, {learning_rate: 3.0e-8}, {learning_rate: 4.0e-8}]
metric: val_pixel_ap
mode: max
asha: {grace_period: 1, max_t: 3, reduction_factor: 2}
trial: {cpus: 1, workers: 1}
"""


def check_asha_sweep(frame: pd.DataFrame, summary_stopped: int) -> pd.Series:
    """Every trial finished or was stopped early (at least one), stops tagged."""
    parents, trials = frame[frame["tags.kind"] == "sweep"], frame[frame["tags.kind"] == "trial"]
    assert (parents["status"] == "FINISHED").all() and (trials["status"] == "FINISHED").all()
    stopped = trials["tags.stopped_early"].eq("true") if "tags.stopped_early" in trials else pd.Series(False, index=trials.index)
    assert stopped.sum() >= 1 and stopped.sum() == summary_stopped, (stopped.sum(), summary_stopped)
    assert trials.loc[~stopped, "metrics.test_image_auroc"].notna().all()  # completed trials have their test result
    assert trials["metrics.train_loss"].notna().all()  # the loss is logged every epoch
    return stopped


def test_asha_stops_trials_early_and_releases_their_training_resources(tmp_path, cache_dir, ray_shutdown, monkeypatch):
    """ASHA with two trials at once: trials it stops are finished trials tagged
    stopped_early, the others complete; no stopped trial's Train placement group is left
    behind (it would hold a CPU, and the next trial's workers would never start)."""
    import ray

    from orchestrator import sweep

    space = tmp_path / "transfusion_asha.yaml"
    space.write_text(ASHA_SPACE)
    monkeypatch.chdir(tmp_path)
    summary = sweep.run([f"ablation={space}", "max_concurrent=2", "eval_every=1", "eval_batch_size=32"]
                        + sweep_args(tmp_path, cache_dir, "method.epochs=3"))
    assert summary["trials"] == 5 and summary["failed"] == 0 and summary["unfinished"] == 0, summary
    check_asha_sweep(runs(tmp_path, "transfusion_asha"), summary["stopped_early"])
    deadline = time.monotonic() + 60  # Train's placement-group cleaner acts within seconds
    while time.monotonic() < deadline:
        alive = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        if not alive:
            break
        time.sleep(2)
    assert not alive, alive


ONE_TRAINING = """
description: "one model trained inside its trial (test)"
method: transfusion
dataset: synthetic
categories: [washer]
scale: smoke
axes:
  steps: {grid: [20]}
search: grid
metric: val_pixel_ap
trial: {cpus: 1, workers: 1}
"""


def test_ddp_evaluation_on_every_rank_passes_trains_report_barrier(tmp_path, cache_dir):
    """A training inside its trial (reuse_models=false) with two DDP workers evaluates its
    model on both ranks. Ray Train's report barrier is set to time out after 3 s, less than
    one rank's evaluation: had rank 0 evaluated alone while rank 1 waited at the barrier,
    the trial would fail."""
    space = tmp_path / "one_training.yaml"
    space.write_text(ONE_TRAINING)
    timeout = 3.0
    env = dict(os.environ, RAY_TRAIN_COLLECTIVE_TIMEOUT_S=str(timeout))
    args = [f"ablation={space}", "reuse_models=false", "trial.workers=2", "latency_images=2",
            *sweep_args(tmp_path, cache_dir, "method.epochs=1")]
    args = [a for a in args if a != "method.steps=5"]  # the space's 20 steps: an evaluation of several seconds
    proc = start_sweep(tmp_path, args, env=env)
    output = proc.communicate(timeout=1200)[0]
    assert proc.returncode == 0, why(output)
    (trial,) = [row for _, row in children(tmp_path, "one_training").iterrows()]
    assert trial["status"] == "FINISHED" and trial["metrics.models_trained"] == 1
    # each rank predicted half the test split, and that half alone took longer than the barrier's timeout
    test_images = 60  # the synthetic washer's test split
    per_rank = test_images / trial["metrics.images_per_second"]
    assert 2 * per_rank > timeout, f"the evaluation ({2 * per_rank:.1f} s on one rank) is too short to test the barrier"
    meta = [json.loads(p.read_text()) for p in (tmp_path / "ray" / "models").glob("*/versions/*/meta.json")]
    assert [m["world_size"] for m in meta] == [2]
