"""Orchestration overhead and the train-once gain, measured in one run.

    python -m bench.orchestration [--epochs N] [--concurrency 2] [--lambda-trials 4]

1. Overhead. The ``transfusion_steps`` grid (T = 5, 10, 20, 50 on synthetic ``washer``,
   smoke scale, ``--epochs`` epochs; by default the smoke preset's, i.e. what
   ``make run`` trains) is run
   (a) as bare in-process calls of the training + evaluation function
       (``orchestrator.training.run_local``), one after the other, each with as many torch
       threads as a trial gets CPUs (1), and
   (b) through ``orchestrator.sweep`` (Ray Tune + Ray Train + MLflow + model store) with
       ``max_concurrent=--concurrency``.
   (a) runs before and after (b) and the mean is used, because a shared machine's
   speed drifts over minutes. The ideal parallel schedule runs (a)'s per-trial times
   on ``--concurrency`` slots in the sweep's trial order (grid order: a scheduler
   cannot know durations in advance); the headline is sweep wall time / ideal (goal
   <= 1.10). The longest-first packing is printed too, to show how much of the gap is
   trial order rather than overhead. Ray start-up is timed separately and excluded;
   the data cache is built before either run, so neither pays for decoding.
   The overhead is printed in seconds per trial, with the part spent in slower
   training epochs (each trial's training seconds from MLflow vs the bare runs'). The
   rest is mostly fixed per training trial: Ray Train starts five processes per run
   (controller, worker, synchronisation and queue actors, a placement-group cleaner),
   each importing Ray and most importing torch.
2. Train-once gain. ``transfusion_lambda`` (an inference-only axis) with
   ``--lambda-trials`` Optuna trials, once as shipped (one training, n evaluations) and
   once with ``reuse_models=false`` (every trial trains its own model): the ratio of the
   two wall times.

On 2 CPU cores the trials compete with Ray's own processes and the driver, so the
overhead ratio is an upper bound of what a larger machine sees.
"""

from __future__ import annotations

import argparse
import os
import heapq
import logging
import tempfile
import time
from pathlib import Path

import torch

STEPS = (5, 10, 20, 50)
CATEGORY = "washer"


def makespan(durations: list[float], slots: int) -> float:
    """Wall time of running ``durations`` in this order, each on the first free slot."""
    loads = [0.0] * slots
    for duration in durations:
        heapq.heappush(loads, heapq.heappop(loads) + duration)
    return max(loads)


def bare_runs(epochs: int, cache_dir: Path) -> tuple[list[float], list[float]]:
    """Wall seconds of each bare trial (training + evaluation), and its training seconds."""
    from orchestrator.local import run_local

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a trial with trial.cpus=1 gets one thread (OMP_NUM_THREADS=1 in Ray workers)
    durations, train_seconds = [], []
    for steps in STEPS:
        start = time.perf_counter()
        result = run_local("transfusion", [CATEGORY], scale="smoke", overrides={"epochs": epochs, "steps": steps}, cache_dir=cache_dir)
        durations.append(time.perf_counter() - start)
        train_seconds.append(result.train_seconds)
        print(f"  bare T={steps:>2}: {durations[-1]:6.1f} s", flush=True)
    torch.set_num_threads(threads)
    return durations, train_seconds


def trial_train_seconds(summary: dict) -> list[float]:
    """Training seconds of each trial of a finished sweep, as recorded in MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return [r.data.metrics["model_train_seconds"] for r in runs]


def sweep_seconds(ablation: str, folder: Path, cache_dir: Path, extra: list[str]) -> tuple[float, dict]:
    from orchestrator import sweep

    folder.mkdir(parents=True, exist_ok=True)
    tokens = [f"ablation={ablation}", f"categories=[{CATEGORY}]", f"tracking_uri=sqlite:///{folder / 'mlflow.db'}",
              f"storage_path={folder / 'ray'}", f"data.cache_dir={cache_dir}", "latency_images=1", "sample_maps=0", *extra]
    start = time.perf_counter()
    summary = sweep.run(tokens)
    seconds = time.perf_counter() - start
    if summary["failed"]:
        raise SystemExit(f"{ablation}: {summary['failed']} trials failed; see the log above")
    return seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per trial (default: the smoke preset's)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--lambda-trials", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from orchestrator import ray_backend
    from orchestrator.config import resolve_method_config
    from orchestrator.data import DataSpec, list_categories
    from orchestrator.training import load_datas

    if args.epochs is None:
        args.epochs = resolve_method_config("transfusion", "smoke").epochs

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # the sweeps write their reports under ./reports
        cache_dir = root / "cache"
        list_categories("synthetic", None, cache_dir=cache_dir)
        load_datas(DataSpec("synthetic", None, str(cache_dir), val_fraction=0.2, seed=0), [CATEGORY], resolve_method_config("transfusion", "smoke"))

        print(f"1. overhead: transfusion_steps (T = {', '.join(map(str, STEPS))}), {args.epochs} epochs, {CATEGORY}")
        before, before_train = bare_runs(args.epochs, cache_dir)

        start = time.perf_counter()
        ray_backend.start_local_ray(max(2, args.concurrency), logging_level=logging.WARNING)  # as the sweep would start it
        ray_start = time.perf_counter() - start
        common = [f"method.epochs={args.epochs}", f"max_concurrent={args.concurrency}"]
        swept, summary = sweep_seconds("transfusion_steps", root / "steps", cache_dir, common)
        swept_train = sum(trial_train_seconds(summary))

        # Bare runs again after the sweep: a shared machine's speed drifts over minutes,
        # and the mean of before and after brackets the sweep.
        after, after_train = bare_runs(args.epochs, cache_dir)
        durations = [(a + b) / 2 for a, b in zip(before, after)]
        bare_train = (sum(before_train) + sum(after_train)) / 2
        ideal = makespan(durations, args.concurrency)
        longest_first = makespan(sorted(durations, reverse=True), args.concurrency)

        print(f"\n  bare, sequential          {sum(durations):7.1f} s  (before {sum(before):.1f}, after {sum(after):.1f})")
        print(f"  ideal parallel schedule   {ideal:7.1f} s  ({args.concurrency} slots, grid order)")
        print(f"  ... longest first         {longest_first:7.1f} s  (sweep / this = {swept / longest_first:.2f})")
        print(f"  sweep (Ray up)            {swept:7.1f} s")
        print(f"  Ray start-up (separate)   {ray_start:7.1f} s")
        print(f"  sweep / ideal             {swept / ideal:7.2f}  (goal <= 1.10)")
        # n trials of bare length L and overhead o on k slots: sweep/ideal = 1 + o/L.
        n_trials = len(durations)
        per_trial = (swept - ideal) * args.concurrency / n_trials
        slower_training = (swept_train - bare_train) / n_trials
        print(f"  overhead per trial        {per_trial:7.1f} s  (mean bare trial {sum(durations) / n_trials:.1f} s)")
        print(f"  ... of which training     {slower_training:7.1f} s  (epochs inside trials took {swept_train / bare_train:.2f}x "
              f"the bare ones: CPU shared with Ray's processes)")

        n = args.lambda_trials
        print(f"\n2. train-once gain: transfusion_lambda, {n} trials, {args.epochs} epochs")
        lam = [*common, f"num_samples={n}"]
        once, _ = sweep_seconds("transfusion_lambda", root / "once", cache_dir, lam)
        each, _ = sweep_seconds("transfusion_lambda", root / "each", cache_dir, [*lam, "reuse_models=false"])
        print(f"\n  train once, evaluate {n}    {once:7.1f} s")
        print(f"  every trial retrains      {each:7.1f} s")
        print(f"  gain                      {each / once:7.2f}x")
        ray.shutdown()


if __name__ == "__main__":
    main()
