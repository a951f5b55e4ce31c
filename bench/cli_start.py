"""How fast the command line answers before any work: ``--help``, a mistyped setting, a
value out of range, a mistyped method field (median of ``--runs`` fresh processes each).

    python -m bench.cli_start     # ~30 s; writes bench/results/cli_start.json

Goal (issue "A house a newcomer can live in"): ``--help`` and a one-line error for a
mistyped key or value within 2 s. A method field is checked against the method's config,
so that answer pays for importing torch and the planner.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cli_start.json"
GOAL_S = 2.0
CASES = {  # name -> (arguments, expected exit status)
    "--help": (["--help"], 0),
    "mistyped setting (max_concurent=2)": (["ablation=transfusion_steps", "max_concurent=2"], 2),
    "value out of range (max_concurrent=-2)": (["ablation=transfusion_steps", "max_concurrent=-2"], 2),
    "mistyped method field (method.stepz=3)": (["ablation=transfusion_steps", "method.stepz=3"], 2),
}


def seconds(arguments: list[str], expected: int) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.sweep", *arguments], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != expected:
        raise SystemExit(f"{arguments}: exit {done.returncode}, expected {expected}:\n{done.stderr[-2000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for name, (arguments, expected) in CASES.items():
        seconds(arguments, expected)  # warm the page cache
        times = [seconds(arguments, expected) for _ in range(args.runs)]
        rows.append({"case": name, "command": "python -m orchestrator.sweep " + " ".join(arguments), "median_s": round(statistics.median(times), 2),
                     "max_s": round(max(times), 2)})
        print(f"{name:<42} median {rows[-1]['median_s']:.2f} s  max {rows[-1]['max_s']:.2f} s  (goal {GOAL_S} s)")
    record = {"bench": "cli_start", "measured_on": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
              "load_average_1min": round(os.getloadavg()[0], 2), "runs": args.runs, "goal_s": GOAL_S, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
