"""What `make run` does, timed and recorded: the TransFusion steps ablation from empty storage.

    python -m bench.make_run     # ~10 min on 2 cores

Runs ``python -m orchestrator.sweep ablation=transfusion_steps`` (the command of ``make
run``) in a temporary folder, with its own storage and MLflow store, and records its wall
time and the table it wrote (``reports/ablations/transfusion_steps.csv``) in
``bench/results/make_run.json``; ``bench.tables`` renders the README's table from it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "make_run.json"
COLUMNS = ("Condition", "Synthetic Det.", "Synthetic Loc.", "Synthetic val", "Synthetic img/s")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="make-run-"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "orchestrator.sweep", "ablation=transfusion_steps", f"storage_path={work / 'ray'}",
                           f"tracking_uri=sqlite:///{work / 'mlflow.db'}"], cwd=work, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:])
        return done.returncode
    with open(work / "reports" / "ablations" / "transfusion_steps.csv") as handle:
        rows = [{k: row[k] for k in COLUMNS} for row in csv.DictReader(handle)]
    out = {"bench": "make_run", "command": "python -m orchestrator.sweep ablation=transfusion_steps", "seconds": round(seconds),
           "measured_on": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
           "load_average_1min_at_end": round(os.getloadavg()[0], 2), "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{seconds:.0f} s; results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
