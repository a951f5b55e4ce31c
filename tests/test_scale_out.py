"""The same sweep command fills whatever cluster it runs on (long: three real sweeps).

A head declaring 4 CPUs runs 4 one-CPU trials at once, one declaring 8 runs 8, with no
concurrency flag; ``max_concurrent=2`` still gives 2. The trials are ``method=sleeper``
(bench/sleeper.py): all of them need the one model the pipeline trains (a 15 s sleep), so
every trial Tune admits is running while it waits, and the overlap of their MLflow runs
counts what Tune admitted.
"""

import mlflow
import pytest

from bench import sleeper

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.timeout(900)]


def most_at_once(starts: list[float], ends: list[float]) -> int:
    events = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends], key=lambda e: (e[0], e[1]))
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


@pytest.mark.parametrize("cpus, extra, expected", [(4, [], 4), (8, [], 8), (4, ["max_concurrent=2"], 2)],
                         ids=["4 CPUs, auto", "8 CPUs, auto", "max_concurrent=2"])
def test_trials_at_once_follow_the_cluster(tmp_path, cpus, extra, expected, ray_shutdown):
    from orchestrator import sweep
    from orchestrator.ray_backend import start_local_ray

    sleeper.register()
    start_local_ray(num_cpus=cpus, runtime_env=sleeper.RUNTIME_ENV)  # the head, declaring `cpus` CPUs
    names = sleeper.write_dataset(tmp_path / "data", 1)
    space = sleeper.write_space(tmp_path / "sleeper_concurrency.yaml", 8)
    summary = sweep.run([f"ablation={space}", "dataset=mvtec_ad", f"data.root={tmp_path / 'data'}", f"categories=[{names[0]}]",
                         f"data.cache_dir={tmp_path / 'cache'}", f"storage_path={tmp_path / 'ray'}", f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                         "trial.cpus=1", "method.train_seconds=15", "method.eval_seconds=1", "latency_images=1", "sample_maps=0", *extra])
    assert summary["failed"] == 0 and summary["trials"] == 8 and summary["max_concurrent"] == expected, summary
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["sleeper_concurrency"])
    trials = runs[runs["tags.kind"] == "trial"]
    assert len(trials) == 8 and (trials["status"] == "FINISHED").all()
    overlap = most_at_once([t.timestamp() for t in trials["start_time"]], [t.timestamp() for t in trials["end_time"]])
    assert overlap == expected, f"{overlap} trials ran at once, expected {expected}"
