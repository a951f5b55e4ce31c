"""`ray job submit` against a real throwaway head on loopback (no mocks).

Starts `ray start --head --num-cpus=2`, submits the TransFusion steps sweep at smoke scale
with a tiny budget, waits, then checks MLflow and the report, and stops the head.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from orchestrator.data import list_categories

pytestmark = [pytest.mark.slow, pytest.mark.long]
ROOT = Path(__file__).resolve().parent.parent


def ray_cli(*args, env, timeout=180):
    ray = Path(sys.executable).with_name("ray")
    return subprocess.run([str(ray), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def head(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    temp = Path("/tmp") / f"rayjob{os.getpid()}"  # Ray's socket paths must stay short
    started = ray_cli("start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                      "--dashboard-port=8299", "--port=6399", f"--temp-dir={temp}", "--disable-usage-stats", env=env)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield dict(env, RAY_ADDRESS="http://127.0.0.1:8299")
    finally:
        ray_cli("stop", "--force", env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_a_sweep(head, tmp_path, cache_dir):
    category = "washer"
    assert category in list_categories("synthetic", None, cache_dir=cache_dir)
    db = tmp_path / "mlflow.db"
    submitted = ray_cli(
        "job", "submit", "--working-dir", str(ROOT), "--entrypoint-num-cpus=0", "--",
        sys.executable, "-m", "orchestrator.sweep", "ablation=transfusion_steps", f"categories=[{category}]",
        "method.epochs=1", "max_concurrent=2", f"tracking_uri=sqlite:///{db}", f"storage_path={tmp_path / 'ray'}",
        f"data.cache_dir={cache_dir}", "latency_images=1", "sample_maps=1",
        env=head, timeout=900,
    )
    assert submitted.returncode == 0, (submitted.stdout[-3000:], submitted.stderr[-3000:])
    assert "succeeded" in submitted.stdout.lower()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["transfusion_steps"])
    trials = runs[runs["tags.kind"] == "trial"]
    assert len(trials) == 4 and (trials["status"] == "FINISHED").all()  # T in 5, 10, 20, 50
    assert sorted(trials["params.method.steps"].astype(int)) == [5, 10, 20, 50]
    assert "transfusion_steps.md" in submitted.stdout
