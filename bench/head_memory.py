"""How much memory a sweep's head node needs per concurrent trial, measured.

    python -m bench.head_memory [--trials 1 4 8]

For each count N a local multi-node Ray (``ray.cluster_utils.Cluster``: a head without
CPUs and N worker nodes of one CPU and one ``slot``, the stand-in for a GPU) runs a sweep
of N trials of ``method=sleeper`` (bench/sleeper.py) over N categories: N pipeline
trainings at once, then N trials evaluating. Everything the sweep runs on the head is
sampled every second: the sweep's driver (this process), Ray's head processes (GCS,
dashboard, the head's raylet) and every worker the head's raylet started (the sweep's
scheduler with its training threads, the trials' drivers, Ray Train's controller,
synchronisation actor and placement-group cleaner of each training). Memory is the sum of
each process's proportional set size (PSS: shared pages split among the processes that
share them, so the sum is what the node really holds). The peak per N and a least-squares
line through them give the per-trial slope; the head a sweep of G GPUs needs (one trial
and one training per GPU) is intercept + G x slope.

The results go to ``bench/results/head_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import sleeper

RESULTS = Path(__file__).resolve().parent / "results" / "head_memory.json"


def children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(roots: list[int]) -> set[int]:
    tree, found, todo = children(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += tree.get(pid, [])
    return found


def pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def title(pid: int) -> str:
    """What a process is: Ray's title for its workers (``TrainController``, ``IDLE``, ...), a
    Python program's module or script, else its executable's name (``raylet``, ``gcs_server``)."""
    try:
        words = [w.decode(errors="replace") for w in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if w]
    except OSError:
        return "?"
    if not words:
        return "?"
    first = words[0]
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0].removeprefix("ray::")
    if first.startswith("ray-dashboard-"):  # the dashboard's module processes retitle themselves
        return "dashboard module"
    if Path(first.split()[0]).name.startswith("python"):
        if "-m" in words[1:-1]:
            return "python -m " + words[words.index("-m") + 1]
        return next((Path(w).name for w in words[1:] if w.endswith(".py")), "python")
    return Path(first.split()[0]).name


def node_pids(node) -> list[int]:
    """A node's own processes (GCS, dashboard, raylet, ...): its workers are the raylet's children."""
    return [info.process.pid for infos in node.all_processes.values() for info in infos if info.process is not None]


def measure(trials: int, train_s: float, eval_s: float, work: Path) -> dict:
    import ray
    from orchestrator import sweep

    sleeper.register()
    names = sleeper.write_dataset(work / "data", trials)
    space = sleeper.write_space(work / "space.yaml", trials)
    cluster = sleeper.start_cluster(trials)
    ray.init(address=cluster.address, runtime_env=sleeper.RUNTIME_ENV, namespace="diffad")
    # The head's processes and the driver's (this process) with everything they started, but
    # not the other nodes: on one machine their raylets are children of this process too.
    roots = node_pids(cluster.head_node) + [os.getpid()]
    others = [pid for node in cluster.worker_nodes for pid in node_pids(node)]
    samples: list[tuple[float, float, int, dict[str, list[float]]]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            by_title: dict[str, list[float]] = {}
            for pid in descendants(roots) - descendants(others):
                kind = title(pid)
                by_title.setdefault(kind, [0, 0.0])
                by_title[kind][0] += 1
                by_title[kind][1] += pss_mib(pid)
            samples.append((time.time(), sum(v[1] for v in by_title.values()), sum(v[0] for v in by_title.values()), by_title))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    args = [f"ablation={space}", f"tracking_uri=sqlite:///{work / 'mlflow.db'}", f"storage_path={work / 'ray'}",
            f"data.cache_dir={work / 'cache'}", "dataset=mvtec_ad", f"data.root={work / 'data'}", f"categories=[{','.join(names)}]",
            "trial.cpus=1", "trial.resources={slot: 1}", f"method.train_seconds={train_s}", f"method.eval_seconds={eval_s}",
            "latency_images=1", "sample_maps=0"]
    try:
        summary = sweep.run(args)
    finally:
        done.set()
        sampler.join()
        ray.shutdown()
        cluster.shutdown()
    assert summary.get("failed") == 0 and summary.get("max_concurrent") == trials, summary
    peak = max(samples, key=lambda s: s[1])
    breakdown = {kind: {"processes": int(n), "pss_mib": round(mib, 1)} for kind, (n, mib) in sorted(peak[3].items(), key=lambda kv: -kv[1][1])}
    return {"trials": trials, "peak_pss_mib": round(peak[1], 1), "processes_at_peak": peak[2], "at_peak": breakdown,
            "samples": len(samples)}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--train-s", type=float, default=60.0)
    parser.add_argument("--eval-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one machine: nothing to preempt
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3600")
    rows = []
    for n in args.trials:
        row = measure(n, args.train_s, args.eval_s, Path(tempfile.mkdtemp(prefix=f"head-memory-{n}-")))
        rows.append(row)
        print(f"{n} trial(s) at once: head peak {row['peak_pss_mib']:.0f} MiB PSS over {row['processes_at_peak']} processes: "
              + ", ".join(f"{kind} {v['processes']} x {v['pss_mib'] / v['processes']:.0f}" for kind, v in row["at_peak"].items()))
    intercept, slope = fit([r["trials"] for r in rows], [r["peak_pss_mib"] for r in rows])
    need = {gpus: round((intercept + gpus * slope) / 1024, 1) for gpus in (8, 16, 64)}
    print(f"fit: {intercept:.0f} MiB + {slope:.0f} MiB per concurrent trial; a head for 64 GPUs (64 trials, 64 trainings): "
          f"{need[64]} GiB (16: {need[16]} GiB, 8: {need[8]} GiB)")
    out = {"bench": "head_memory", "measured_on": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
           "train_s": args.train_s, "eval_s": args.eval_s, "rows": rows, "intercept_mib": round(intercept, 1),
           "slope_mib_per_trial": round(slope, 1), "head_gib_for_gpus": need}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
