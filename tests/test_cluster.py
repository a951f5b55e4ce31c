"""The cluster path end to end, with real parts only (no mocks): a two-node Ray cluster on
loopback (a head and a worker node, one CPU each, started by `ray start`), SeaweedFS as
the S3 object store and `mlflow server` on PostgreSQL (the shared ``services`` fixture).

`ray job submit` runs TransFusion's final-mask grid (inference-only: one training, four
evaluations) with ``storage_path=s3://...`` and ``trial.workers=2 trial.cpus=1``: the one
training is DDP (gloo) across both nodes — each node has a single CPU, so the two Train
workers can only run one per node — and every trial evaluates the model from the bucket.
These are the steps of docs/cluster.md.
"""

import json
import os
import re
import uuid
from pathlib import Path

import pytest

from orchestrator import tracking
from ray_heads import RayHead

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(services):
    """A head and one worker node, each with 1 CPU, their processes holding the S3
    variables (what a cluster's nodes get from their launcher). Each node has a temp
    folder of its own, as on a machine of its own (with the head's, its runtime-env agent
    deleted the job's unpacked working dir, the driver's cwd, when its own workers were done
    with it); stopped by killing their own processes only."""
    head = RayHead(1, {**os.environ, **services.s3_env})
    try:
        head.add_node(1)
        head.wait_for_jobs()
        yield head
    finally:
        head.stop()


def test_job_on_two_nodes_with_object_storage_and_mlflow_server(cluster, services, cache_dir):
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    storage = f"s3://{services.store.bucket}/{prefix}"
    # The job's runtime environment carries the tracking URI and the S3 settings to every
    # worker process of the job (deploy/rayjob.yaml does the same).
    runtime_env = {"env_vars": {k: v for k, v in services.env.items()}}
    submitted = cluster.submit(
        ["ablation=transfusion_final_mask", "categories=[washer]",
         "method.epochs=1", "method.steps=5", "trial.workers=2", "trial.cpus=1", "max_concurrent=1",
         f"storage_path={storage}", f"tracking_uri={services.tracking_uri}", f"data.cache_dir={cache_dir}",
         "latency_images=1", "sample_maps=1"], runtime_env=json.dumps(runtime_env))
    errors = "\n".join(line for line in submitted.stdout.splitlines() if "Error" in line or "error:" in line)
    assert submitted.returncode == 0, f"{errors[-4000:]}\n...\n{submitted.stdout[-3000:]}"
    assert "succeeded" in submitted.stdout.lower() and "transfusion_final_mask.md" in submitted.stdout  # the report was written

    # MLflow (PostgreSQL behind the server): the sweep and its four trials, one training.
    frame = tracking.search_runs(services.tracking_uri, "transfusion_final_mask")
    parent = frame[(frame["tags.kind"] == "sweep") & (frame["tags.storage"] == storage)]
    assert len(parent) == 1 and parent["status"].iloc[0] == "FINISHED"
    trials = frame[frame[f"tags.{tracking.PARENT_TAG}"] == parent["run_id"].iloc[0]]
    assert len(trials) == 4 and (trials["status"] == "FINISHED").all()
    assert parent["metrics.models_trained"].iloc[0] == 1 and trials["metrics.test_image_auroc"].notna().all()
    # ... each trial's sample map went through the server into the bucket.
    for run_id in trials["run_id"]:
        assert tracking.artifact_paths(services.tracking_uri, run_id, "anomaly_maps"), run_id

    # The object store: the model (one version, trained by two Train workers on two nodes),
    # Train's checkpoints and Tune's experiment state; nothing under a local folder.
    s3 = services.store.client()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=services.store.bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    metas = [k for k in keys if k.startswith(f"{prefix}/models/") and k.endswith("/meta.json")]
    assert len(metas) == 1 and any(k.endswith("/model.pt") for k in keys)
    meta = json.loads(s3.get_object(Bucket=services.store.bucket, Key=metas[0])["Body"].read())
    assert meta["world_size"] == 2 and len(meta["nodes"]) == 2, meta  # DDP, one worker per node
    assert any(k.startswith(f"{prefix}/train/") and "/checkpoint_" in k for k in keys)
    assert any(k.startswith(f"{prefix}/sweeps/transfusion_final_mask-") for k in keys)
    assert any(k.startswith(f"{prefix}/artifacts/") and k.endswith(".png") for k in keys)
    assert not (ROOT / "s3:").exists()


def test_asha_on_two_nodes_stops_trials_and_leaves_no_placement_group(cluster, services, cache_dir, tmp_path):
    """The ASHA scenario of tests/test_faults.py submitted to the two-node cluster: stopped
    trials are finished trials, and no stopped trial's Train placement group is left on
    either node."""
    from test_faults import ASHA_SPACE, check_asha_sweep

    space = tmp_path / "transfusion_asha.yaml"
    space.write_text(ASHA_SPACE)
    storage = f"s3://{services.store.bucket}/asha-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {k: v for k, v in services.env.items()}}
    submitted = cluster.submit(
        [f"ablation={space}", "max_concurrent=2", "eval_every=1", "eval_batch_size=32",
         "method.epochs=3", "method.steps=5", f"storage_path={storage}", f"tracking_uri={services.tracking_uri}",
         f"data.cache_dir={cache_dir}", "latency_images=1", "sample_maps=1"], runtime_env=json.dumps(runtime_env))
    assert submitted.returncode == 0, submitted.stdout[-4000:]
    frame = tracking.search_runs(services.tracking_uri, "transfusion_asha")
    parent = frame[(frame["tags.kind"] == "sweep") & (frame["tags.storage"] == storage)]
    mine = frame[(frame["run_id"].isin(parent["run_id"])) | (frame[f"tags.{tracking.PARENT_TAG}"].isin(parent["run_id"]))]
    stopped = re.search(r"(\d+) stopped early by the scheduler", submitted.stdout)
    assert stopped, submitted.stdout[-2000:]
    check_asha_sweep(mine, int(stopped.group(1)))
    import ray

    ray.init(address=cluster.gcs)
    try:
        alive = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        # drivers=head (the default): the sweeps' schedulers, trial drivers and Train controllers
        # all ran on the head, the worker node only ran Train workers and evaluations
        from ray.util.state import list_actors

        head = next(n["NodeID"] for n in ray.nodes() if n["Resources"].get("node:__internal_head__"))
        drivers = [a for a in list_actors(cluster.dashboard, limit=10_000, detail=True, raise_on_missing_output=False)
                   if a.class_name in ("SweepScheduler", "ImplicitFunc", "TrainController")]
    finally:
        ray.shutdown()
    assert not alive, alive
    assert {a.class_name for a in drivers} == {"SweepScheduler", "ImplicitFunc", "TrainController"}, drivers
    assert {a.node_id for a in drivers} == {head}, [(a.class_name, a.node_id) for a in drivers if a.node_id != head]
