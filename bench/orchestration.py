"""Orchestration overhead and the train-once gain, measured in one run.

    python -m bench.orchestration [--epochs 2] [--concurrency 2] [--lambda-trials 4]

1. Overhead. The ``transfusion_steps`` grid (T = 5, 10, 20, 50 on synthetic ``washer``,
   smoke scale, ``--epochs`` epochs) is run
   (a) as bare in-process calls of the training + evaluation function
       (``orchestrator.training.run_local``), one after the other, each with as many torch
       threads as a trial gets CPUs (1), and
   (b) through ``orchestrator.sweep`` (Ray Tune + Ray Train + MLflow + model store) with
       ``max_concurrent=--concurrency``.
   The ideal parallel schedule is the longest-processing-time packing of (a)'s per-trial
   times onto ``--concurrency`` slots; the headline is sweep wall time / ideal (goal
   <= 1.10). Ray start-up is timed separately and excluded; the data cache is built
   before either run, so neither pays for decoding.
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


def ideal_makespan(durations: list[float], slots: int) -> float:
    """Longest-processing-time-first packing of ``durations`` onto ``slots`` workers."""
    loads = [0.0] * slots
    for duration in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + duration)
    return max(loads)


def bare_runs(epochs: int, cache_dir: Path) -> list[float]:
    from orchestrator.training import run_local

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a trial with trial.cpus=1 gets one thread (OMP_NUM_THREADS=1 in Ray workers)
    durations = []
    for steps in STEPS:
        start = time.perf_counter()
        run_local("transfusion", [CATEGORY], scale="smoke", overrides={"epochs": epochs, "steps": steps}, cache_dir=cache_dir)
        durations.append(time.perf_counter() - start)
        print(f"  bare T={steps:>2}: {durations[-1]:6.1f} s", flush=True)
    torch.set_num_threads(threads)
    return durations


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
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--lambda-trials", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from orchestrator.data import list_categories
    from orchestrator.training import load_data
    from orchestrator.config import resolve_method_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # the sweeps write their reports under ./reports
        cache_dir = root / "cache"
        list_categories("synthetic", None, cache_dir=cache_dir)
        load_data("synthetic", [CATEGORY], resolve_method_config("transfusion", "smoke"), root=None, cache_dir=cache_dir,
                  val_fraction=0.2, seed=0)

        print(f"1. overhead: transfusion_steps (T = {', '.join(map(str, STEPS))}), {args.epochs} epochs, {CATEGORY}")
        durations = bare_runs(args.epochs, cache_dir)
        ideal = ideal_makespan(durations, args.concurrency)

        start = time.perf_counter()
        ray.init(num_cpus=max(2, args.concurrency), include_dashboard=False, logging_level=logging.WARNING)
        ray_start = time.perf_counter() - start
        common = [f"method.epochs={args.epochs}", f"max_concurrent={args.concurrency}"]
        swept, _ = sweep_seconds("transfusion_steps", root / "steps", cache_dir, common)

        print(f"\n  bare, sequential          {sum(durations):7.1f} s")
        print(f"  ideal parallel schedule   {ideal:7.1f} s  ({args.concurrency} slots)")
        print(f"  sweep (Ray up)            {swept:7.1f} s")
        print(f"  Ray start-up (separate)   {ray_start:7.1f} s")
        print(f"  sweep / ideal             {swept / ideal:7.2f}  (goal <= 1.10)")

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
