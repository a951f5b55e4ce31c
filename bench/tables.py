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
            ["machine load average (1 min) at the end", f"{m.get('load_average_1min_at_end', 'not recorded')} on {m.get('cpus', '?')} CPUs", ""],
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


def make_run() -> str:
    r = load("make_run")
    body = [[row["Condition"], row["Synthetic Det."], row["Synthetic Loc."], row["Synthetic val"], row["Synthetic img/s"]] for row in r["rows"]]
    return (rows(["Condition", "Det.", "Loc.", "val (pixel AP)", "img/s"], body)
            + f"\n`{r['command']}` from empty storage: {r['seconds'] // 60} min {r['seconds'] % 60} s ({r['machine']}, load average "
              f"{r.get('load_average_1min_at_end', 'not recorded')} at the end, {r['measured_on']}).\n")


def learning() -> str:
    r = load("learning")
    body = []
    for method, m in r["methods"].items():
        seeds = m["seeds"]
        others = [seeds[s]["test_image_auroc"] for s in seeds if s != "0"]
        body.append([method, "+".join(m["categories"]), f"{seeds['0']['test_image_auroc']:.3f} / {seeds['0']['test_pixel_auroc']:.3f}",
                     f"{m['bounds']['test_image_auroc']:.2f} / {m['bounds']['test_pixel_auroc']:.2f}",
                     f"{m['spread']['test_image_auroc']['mean']:.3f} ± {m['spread']['test_image_auroc']['std']:.3f} "
                     f"(min {min(others):.3f})"])
    return rows(["method", "category (chosen on validation, seed 1)", "seed 0: test image / pixel AUROC", "bound (image / pixel)",
                 "seeds 1-4: test image AUROC, mean ± std"], body)


def selection() -> str:
    r = load("selection")
    out = []
    for axis, a in sorted(r["axes"].items()):
        chosen = a["chosen"]
        body = []
        for metric, g in a["agreement"].items():
            interval = f"[{g['interval'][0]:+.2f}, {g['interval'][1]:+.2f}]" if g["interval"] else "n/a"
            body.append([("**val_" + metric + "** (the rule's)") if metric == chosen else "val_" + metric, f"{a['signal_to_noise'][metric]:.2f}",
                         ", ".join(f"{t:+.2f}" for t in g["tau_per_seed"].values()), f"{g['tau_pooled']:+.2f} {interval}", f"{g['p_value']:.4f}",
                         ", ".join(f"{100 * x:.1f}" for x in g["regret_per_seed"].values())])
        out.append(f"**{axis}** (`{a['field']}` in {a['values']}; {len(a['values'])} configurations x {len(r['seeds'])} seeds):\n\n"
                   + rows(["selection metric", "signal / noise (seeds 0, 1)", "τ per held-out seed (2, 3, 4)",
                           "τ pooled [95 % interval]", "p (permutation)", "test regret, points (seeds 2, 3, 4)"], body) + "\n")
    return "".join(out)


def selection_rows() -> str:
    """Every configuration's validation and test value of the rule's metric, per seed."""
    r = load("selection")
    out = []
    for axis, a in sorted(r["axes"].items()):
        m = a["chosen"]
        body = [[f"{a['field']}={row['value']}", str(row["seed"]), f"{row['val'][m]:.4f}", f"{row['test'][m]:.4f}",
                 f"{row['test']['image_auroc']:.4f}"] for row in a["rows"]]
        out.append(f"{axis}:\n\n" + rows(["configuration", "seed", f"val {m}", f"test {m}", "test image_auroc"], body) + "\n")
    return "".join(out)


def generality() -> str:
    r = load("generality")

    def over_seeds(per_category: dict[str, list[float]]) -> str:
        means = [sum(v) / len(v) for v in zip(*per_category.values())]  # mean over categories, per seed
        mean = sum(means) / len(means)
        std = (sum((x - mean) ** 2 for x in means) / (len(means) - 1)) ** 0.5 if len(means) > 1 else 0.0
        return f"{mean:.3f} ± {std:.3f}" + (" ✓" if mean >= r["bound"] else "")

    body = []
    for method, m in r["methods"].items():
        best = m["selected"]
        chosen = json.dumps(m["candidates"][best]) if m["candidates"][best] else "the preset"
        body.append([method, over_seeds(m["preset_test_image_auroc"]), f"`{chosen}` (validation {m['val_means'][0]:.3f} -> {m['val_means'][best]:.3f})",
                     over_seeds(m["chosen_test_image_auroc"]),
                     ", ".join(f"{c} {sum(v) / len(v):.3f}" for c, v in m["preset_test_image_auroc"].items())])
    seeds = next(iter(r["methods"].values()))["seeds"] if r["methods"] else 0
    return (rows(["method", "preset: test image AUROC", "chosen on validation", "chosen: test image AUROC", "preset, per category"], body)
            + f"\nGenerality set {r['version']} ({', '.join(r['categories'])}; defects {', '.join(r['defects'])}); mean ± std over "
              f"{seeds} training seeds; ✓: the mean reaches {r['bound']}.\n")


def cli_start() -> str:
    r = load("cli_start")
    body = [[row["case"], f"`{row['command']}`", f"{row['median_s']:.2f} s", f"{row['max_s']:.2f} s",
             "yes" if row["median_s"] <= r["goal_s"] else "no"] for row in r["rows"]]
    return (rows(["case", "command", f"median of {r['runs']}", "slowest", f"within {r['goal_s']:g} s"], body)
            + f"\n{r['machine']}, load average {r['load_average_1min']} at the end, {r['measured_on']}.\n")


RENDERERS: dict[str, Callable[[], str]] = {"cli_start": cli_start, "cluster_schedule": cluster_schedule, "head_memory": head_memory, "make_run": make_run,
                                           "learning": learning, "selection": selection, "selection_rows": selection_rows,
                                           "generality": generality}


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
