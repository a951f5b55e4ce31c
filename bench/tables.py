"""The measured tables of the README and docs/, generated from the results files in
bench/results/ (each written by the benchmark that measured it).

    python -m bench.tables          # rewrite every table between its markers (`make tables`)
    python -m bench.tables --check  # exit 1 when a table differs from its results (tests/test_tables.py)

A table sits in a Markdown file between ``<!-- table: NAME -->`` and ``<!-- /table -->``;
NAME is one of :data:`RENDERERS`, which reads ``bench/results/<file>.json``. Nothing in a
table is typed by hand: change the results (rerun the benchmark), then regenerate.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"(<!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the benchmark that writes it (see its module docstring)")
    return json.loads(path.read_text())


def pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def rows(header: list[str], body: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]) + "\n"


# ------------------------------------------------------------------------------ renderers


def cluster_schedule() -> str:
    r = load("cluster_schedule")
    goals = r["goals"]
    out = []
    m = r.get("measured")
    if m:
        out.append(rows(["measured (" + r["machine"] + ", " + m["measured_on"] + ")", "value", "goal"], [
            ["slots; trainings x seconds; trials x evaluations x seconds",
             f"{m['slots']}; {m['categories']} x {m['train_s']:g} s; {m['trials']} x {m['categories']} x {m['eval_s']:g} s", ""],
            ["(a) makespan / LB", f"{m['ratio']:.3f} ({m['makespan']:.0f} s / {m['lower_bound']:.0f} s)", f"<= {goals['measured_ratio']}"],
            ["(b) slot-time free while a job was ready", pct(m["free_while_ready"]), f"<= {100 * goals['measured_free_while_ready']:.0f} %"],
            ["(c) start-up per training (grant to first line of training)",
             f"{m['startup_s']:.1f} s = {100 * m['startup_s'] / m['train_s']:.1f} % of a training", "< 10 % of a training"],
        ]))
    sims = r.get("simulated", [])
    if sims:
        out.append("\n" + rows(["simulated sweep (MVTec AD, paper scale)", "GPUs", "trainings", "trials", "makespan / LB",
                                "free while ready", "durations", "goal"],
                               [[f"`{s['ablation']}` seeds={s['seeds']}", str(s["gpus"]), str(s["trainings"]), str(s["trials"]),
                                 f"{s['ratio']:.3f} ({'work' if s['work_bound'] >= s['chain_bound'] else 'chain'}-bound)",
                                 pct(s["free_while_ready"]), s["durations"], f"<= {goals['simulated_ratio']}"] for s in sims]))
    return "".join(out)


def head_memory() -> str:
    r = load("head_memory")
    body = [[str(row["trials"]), f"{row['peak_pss_mib'] / 1024:.1f} GiB", str(row["processes_at_peak"]),
             ", ".join(f"{kind.removeprefix('ray::')} {v['processes']} x {v['pss_mib'] / v['processes']:.0f} MiB"
                       for kind, v in list(row["at_peak"].items())[:6])] for row in r["rows"]]
    table = rows(["trials (and trainings) at once", "head's memory at its peak (PSS)", "processes", "largest, by process"], body)
    need = r["head_gib_for_gpus"]
    return table + (f"\nFit: {r['intercept_mib'] / 1024:.1f} GiB + {r['slope_mib_per_trial'] / 1024:.2f} GiB per concurrent trial "
                    f"({r['machine']}, {r['measured_on']}): a head for 8 GPUs needs about {need['8']} GiB, 16 GPUs "
                    f"{need['16']} GiB, 64 GPUs {need['64']} GiB.\n")


RENDERERS: dict[str, Callable[[], str]] = {"cluster_schedule": cluster_schedule, "head_memory": head_memory}


# ---------------------------------------------------------------------------------- main


def render(text: str) -> str:
    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise KeyError(f"unknown table {name!r}; known: {', '.join(RENDERERS)}")
        return match.group(1) + RENDERERS[name]() + match.group(4)

    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report tables that differ from their results; change nothing")
    args = parser.parse_args(argv)
    stale = []
    for document in DOCUMENTS:
        text = document.read_text()
        fresh = render(text)
        if fresh != text:
            stale.append(document)
            if not args.check:
                document.write_text(fresh)
    for document in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {document.relative_to(ROOT)}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
