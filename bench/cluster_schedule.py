"""How well a sweep packs its work onto a cluster, measured and simulated in one run.

    python -m bench.cluster_schedule                 # measured on 8 slots, then simulated at 64 and 512 GPUs
    python -m bench.cluster_schedule --simulate-only # the simulations alone (seconds)

**Measured.** A local multi-node Ray (``ray.cluster_utils.Cluster``: a head without CPUs
and ``--slots`` nodes of one CPU and one ``slot`` each; a slot stands in for a GPU, which
a CPU machine cannot give Ray Train: with logical GPUs Train would pick NCCL, which the CPU
torch build lacks) runs an Optuna sweep of ``--trials`` trials over the inference-only axis
of ``method=sleeper`` (bench/sleeper.py), whose training sleeps ``--train-s`` seconds and
whose evaluation of a category sleeps ``--eval-s`` seconds, on ``--categories`` categories:
one pipeline training per category, one evaluation per (trial, category). The sweep's own
schedule records (every job's ready, grant, start and end, from the scheduler and the
jobs themselves) give

* (a) makespan / LB, LB = max(total held slot-seconds / slots, the longest training +
  evaluation chain): a job holds its slot from its grant to its end, Train's start-up included;
* (b) the share of slot-time a slot stood free while a job whose inputs existed had not
  been granted;
* (c) the start-up of a training: from its grant to its first line of training code.

**Simulated.** The same scheduling code (:func:`orchestrator.schedule.simulate` drives
:class:`orchestrator.schedule.Scheduler`) replays sweeps planned by the real planner on
MVTec AD's 15 categories (their real training and test image counts) with durations from
the timing model (orchestrator/timing.py; estimates unless ``bench.gpu`` measured them):
``benchmark_mvtec_ad`` with 4 seeds on 64 GPUs (244 trainings of five methods) and
``transfusion_losses`` with 21 seeds on 512 GPUs (1,575 trainings), each with at least three
times more trainings than GPUs, trials admitted as Tune admits them (``max_concurrent=auto``).

Goals (issue "Every GPU busy"): measured free-while-ready <= 2 % and makespan / LB <= 1.10;
simulated makespan / LB <= 1.05. The results go to ``bench/results/cluster_schedule.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import sleeper
from orchestrator import schedule

RESULTS = Path(__file__).resolve().parent / "results" / "cluster_schedule.json"
GOALS = {"measured_free_while_ready": 0.02, "measured_ratio": 1.10, "simulated_ratio": 1.05}

# MVTec AD's official split: category -> (training images, test images).
MVTEC_AD = {"bottle": (209, 83), "cable": (224, 150), "capsule": (219, 132), "carpet": (280, 117), "grid": (264, 78),
            "hazelnut": (391, 110), "leather": (245, 124), "metal_nut": (220, 115), "pill": (267, 167), "screw": (320, 160),
            "tile": (230, 117), "toothbrush": (60, 42), "transistor": (213, 100), "wood": (247, 79), "zipper": (240, 151)}
SIMULATIONS = [("benchmark_mvtec_ad", 4, 64), ("transfusion_losses", 21, 512)]  # (ablation, seeds, GPUs)


def measure(args: argparse.Namespace, work: Path) -> dict:
    import ray
    from orchestrator import sweep

    sleeper.register()
    names = sleeper.write_dataset(work / "data", args.categories)
    space = sleeper.write_space(work / "sleeper_schedule.yaml", args.trials)
    # One machine: no spot preemption to watch for (one process fewer per training), and
    # worker groups may wait long for a slot while other trainings hold them.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3600")
    started = time.monotonic()
    cluster = sleeper.start_cluster(args.slots)
    ray.init(address=cluster.address, runtime_env=sleeper.RUNTIME_ENV, namespace="diffad")
    print(f"ray: {args.slots} one-slot nodes up in {time.monotonic() - started:.1f} s")
    common = [f"ablation={space}", f"tracking_uri=sqlite:///{work / 'mlflow.db'}", f"storage_path={work / 'ray'}",
              f"data.cache_dir={work / 'cache'}", "dataset=mvtec_ad", f"data.root={work / 'data'}", f"categories=[{','.join(names)}]",
              "trial.cpus=1", "trial.resources={slot: 1}", f"method.train_seconds={args.train_s}",
              f"method.eval_seconds={args.eval_s}", "latency_images=1", "sample_maps=0"]
    try:
        # The data cache first (not timed): a dry start of the sweep's preparation.
        from orchestrator.config import parse_overrides
        from orchestrator.plan import plan

        values, overrides = parse_overrides(common)
        sweep.prepare_data(plan(values, overrides))
        summary = sweep.run(common)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary.get("failed") == 0 and summary.get("trials") == args.trials, summary
    records = [schedule.TaskRecord(**r) for r in json.loads(Path(summary["schedule"]).read_text())]
    f = schedule.figures(records, "slot", args.slots)
    return {"slots": args.slots, "categories": args.categories, "trials": args.trials, "train_s": args.train_s,
            "eval_s": args.eval_s, "max_concurrent": summary["max_concurrent"], **figure_dict(f),
            # what else ran on the machine: start-up is CPU-bound (process starts, imports)
            "load_average_1min_at_end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
            "per_slot": per_slot(records)}


def per_slot(records: list[schedule.TaskRecord]) -> dict[str, list[list]]:
    """Each node's jobs in order: [kind, granted, start, end] relative to the first ready time."""
    t0 = min(r.ready for r in records)
    slots: dict[str, list[list]] = {}
    for r in sorted(records, key=lambda r: r.granted):
        slots.setdefault(r.slot[:8] or "?", []).append([r.kind, round(r.granted - t0, 1), round(r.start - t0, 1), round(r.end - t0, 1)])
    return slots


def figure_dict(f: schedule.Figures) -> dict:
    return {**dataclasses.asdict(f), "ratio": f.ratio}


def simulate_sweep(ablation: str, seeds: int, gpus: int, startup_s: float, work: Path) -> dict:
    """Plan ``ablation`` on MVTec AD (a tree of empty stand-ins, with the real split sizes
    put back for the timing model) and replay it on ``gpus`` GPUs."""
    from orchestrator.config import parse_overrides
    from orchestrator.plan import Cluster, plan, resolve_trial_resources, simulation_jobs, with_trials

    root = work / f"mvtec-{ablation}"
    if not root.exists():
        write_stand_in(root)
    values, overrides = parse_overrides([f"ablation={ablation}", "dataset=mvtec_ad", f"data.root={root}", f"data.cache_dir={work / 'cache'}",
                                         f"storage_path={work / 'sim'}", "scale=paper", f"seeds={seeds}"])
    draft = plan(values, overrides)
    val = draft.settings.data.val_fraction
    sizes = {c: (round(n * (1 - val)), 2 * round(n * val) + t) for c, (n, t) in MVTEC_AD.items()}
    planned = with_trials(dataclasses.replace(draft, split_sizes=sizes))
    where = Cluster({"GPU": float(gpus), "CPU": 8.0 * gpus}, f"{gpus} GPUs")
    resources = resolve_trial_resources(planned.settings, where)
    trainings, trials = simulation_jobs(planned, resources)
    started = time.monotonic()
    sim = schedule.simulate(trainings, trials, where.resources, resources.max_concurrent, startup_s=startup_s)
    f = schedule.figures(sim.records, "GPU", gpus, origin=0.0)
    sources = sorted({t.expected.source for t in planned.trainings})
    return {"ablation": ablation, "seeds": seeds, "gpus": gpus, "trainings": len(trainings), "trials": len(trials),
            "max_concurrent": resources.max_concurrent, "startup_s": startup_s, "durations": ", ".join(sources),
            "simulated_in_s": round(time.monotonic() - started, 2), **figure_dict(f)}


def write_stand_in(root: Path) -> None:
    """MVTec AD's layout with one tiny image per split and category (the planner reads the
    categories from the tree; the split sizes are put back from MVTEC_AD)."""
    from PIL import Image

    for category in MVTEC_AD:
        for folder, name in (("train/good", "000.png"), ("test/good", "000.png"), ("test/crack", "000.png"), ("ground_truth/crack", "000_mask.png")):
            path = root / category / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L" if "ground_truth" in folder else "RGB", (8, 8), 255 if "ground_truth" in folder else 0).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--categories", type=int, default=24, help="pipeline trainings (3 per slot at 8 slots)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--train-s", type=float, default=300.0)
    parser.add_argument("--eval-s", type=float, default=10.0)
    parser.add_argument("--startup-s", type=float, default=30.0, help="a training's start-up in the simulations")
    parser.add_argument("--simulate-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cluster-schedule-"))
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out.update({"bench": "cluster_schedule", "goals": GOALS, "machine": f"{os.cpu_count()} CPU cores"})
    if not args.simulate_only:
        measured = measure(args, work)
        out["measured"] = {**measured, "measured_on": time.strftime("%Y-%m-%d")}
        print(f"measured on {args.slots} slots: {args.categories} trainings of {args.train_s:.0f} s, {args.trials} trials x "
              f"{args.categories} evaluations of {args.eval_s:.0f} s")
        print(f"  (a) makespan {measured['makespan']:.0f} s, LB {measured['lower_bound']:.0f} s -> makespan / LB = {measured['ratio']:.3f} "
              f"(goal <= {GOALS['measured_ratio']})")
        print(f"  (b) free while ready: {100 * measured['free_while_ready']:.2f} % of slot-time (goal <= {100 * GOALS['measured_free_while_ready']:.0f} %)")
        print(f"  (c) start-up per training: {measured['startup_s']:.1f} s ({100 * measured['startup_s'] / args.train_s:.1f} % of a training)")
    out["simulated"] = []
    for ablation, seeds, gpus in SIMULATIONS:
        row = simulate_sweep(ablation, seeds, gpus, args.startup_s, work)
        out["simulated"].append(row)
        print(f"simulated {ablation} seeds={seeds} on {gpus} GPUs: {row['trainings']} trainings, {row['trials']} trials, "
              f"makespan / LB = {row['ratio']:.3f} (goal <= {GOALS['simulated_ratio']}), free while ready "
              f"{100 * row['free_while_ready']:.2f} %, durations: {row['durations']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
