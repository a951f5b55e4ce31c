"""Regenerate ablation tables from MLflow (never from side files).

    python -m orchestrator.report                         # every ablation found in MLflow
    python -m orchestrator.report ablation=transfusion_steps tracking_uri=sqlite:////abs/mlflow.db

For each ablation and dataset the latest sweep (parent run) is read back. Tables are laid
out like TransFusion's Table 4: the default condition in absolute numbers, every other
row as Δ to it; Det. = image AUROC, Loc. = AUPRO (×100), one column pair per dataset,
beside the paper's own numbers where the search space lists them. Written to
``reports/ablations/<name>.{md,csv,tex,png}`` plus ``<name>_per_category.{md,csv}``.

The leaderboard (``reports/leaderboard.{md,csv}``) has one row per method, dataset and
scale: the default configuration (the papers' defaults at that scale) from the most recent
sweep that ran it, whichever ablation that sweep belonged to.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import search_space as spaces
from orchestrator import tracking
from orchestrator.config import config_to_dict, resolve_method_config
from orchestrator.errors import ConfigError, UserError
from orchestrator.results import metric_name

log = logging.getLogger(__name__)

DATASET_NAMES = {"mvtec_ad": "MVTec AD", "visa": "VisA", "btad": "BTAD", "mpdd": "MPDD", "dagm": "DAGM", "synthetic": "Synthetic", "folder": "Folder"}
HEADLINE = {"det": metric_name("test", "image_auroc"), "loc": metric_name("test", "aupro")}


@dataclass
class Sweep:
    """One sweep's trials, read back from MLflow."""

    dataset: str
    run: pd.Series  # the parent run
    trials: pd.DataFrame  # child runs


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)


# Config fields renamed since runs were logged: old MLflow param -> today's. Runs logged
# under an old name are read as if logged under the new one.
PARAM_ALIASES = {
    "params.method.lr": "params.method.learning_rate",
    "params.method.base_lr": "params.method.learning_rate",
    "params.method.seg_lr": "params.method.segmentation_learning_rate",
    "params.method.diffusion_lr": "params.method.diffusion_learning_rate",
    "params.method.lr_decay": "params.method.lr_decay_factor",
    **{f"params.method.unet_{f}": f"params.method.{f}" for f in
       ("base_channels", "channel_mult", "layers_per_block", "attention_resolutions", "head_channels", "norm_groups", "dropout")},
}


def with_current_names(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with old param columns folded into today's names (see PARAM_ALIASES)."""
    for old, new in PARAM_ALIASES.items():
        if old in runs:
            runs[new] = runs[new].fillna(runs[old]) if new in runs else runs[old]
            runs = runs.drop(columns=old)
    return runs


def load_sweeps(ablation: str, uri: str) -> list[Sweep]:
    """The latest sweep per dataset of an ablation (finished ones preferred)."""
    runs = with_current_names(tracking.search_runs(uri, ablation))
    if runs.empty or "tags.kind" not in runs:
        return []
    parents = runs[runs["tags.kind"] == "sweep"].copy()
    parents["finished"] = parents["status"] == "FINISHED"
    parents = parents.sort_values(["finished", "start_time"])
    sweeps = []
    for dataset, group in parents.groupby("tags.dataset"):
        parent = group.iloc[-1]
        trials = runs[(runs["tags.kind"] == "trial") & (runs["tags.mlflow.parentRunId"] == parent["run_id"])]
        sweeps.append(Sweep(str(dataset), parent, trials))
    return sweeps


def row_labels(space: spaces.SearchSpace, trials: pd.DataFrame) -> pd.Series:
    """Each trial's row: its condition name, or 'axis=value, ...' of its grid point."""
    if space.conditions:
        return trials["params.condition"].astype(str)
    parts = [trials[f"params.method.{a.name}"].astype(str).radd(f"{a.name}=") for a in space.axes]
    label = parts[0]
    for p in parts[1:]:
        label = label + ", " + p
    return label


def default_label(space: spaces.SearchSpace, scale: str) -> str:
    if space.conditions:
        return space.default_label
    values = config_to_dict(resolve_method_config(space.method, scale, space.fixed))
    return ", ".join(f"{a.name}={_param(values[a.name])}" for a in space.axes)


def per_category(trials: pd.DataFrame, categories: list[str], metric: str) -> pd.DataFrame:
    """[trial x category] test metric, from single-category trials or per-category keys."""
    out = pd.DataFrame(index=trials.index, columns=categories, dtype=float)
    for c in categories:
        key = f"metrics.{metric}/{c}"
        if key in trials:
            out[c] = trials[key]
        if "params.categories" in trials:
            own = trials["params.categories"] == c
            out.loc[own, c] = trials.loc[own, f"metrics.{metric}"]
    return out


def ablation_frame(space: spaces.SearchSpace, sweep: Sweep) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows: label -> det, loc, val metric, images/s; per-category det/loc)."""
    trials = sweep.trials[sweep.trials["status"] == "FINISHED"].copy()
    if trials.empty:
        return pd.DataFrame(), pd.DataFrame()
    trials["row"] = row_labels(space, trials)
    categories = [c for c in str(sweep.run.get("params.categories", "")).split(",") if c]
    det = per_category(trials, categories, HEADLINE["det"])
    loc = per_category(trials, categories, HEADLINE["loc"])
    det["row"], loc["row"] = trials["row"], trials["row"]
    det_rows, loc_rows = det.groupby("row").mean(), loc.groupby("row").mean()
    selection = f"metrics.{space.metric}"
    summary = pd.DataFrame({
        "det": 100 * det_rows.mean(axis=1),
        "loc": 100 * loc_rows.mean(axis=1),
        "val": 100 * trials.groupby("row")[selection].mean() if selection in trials else np.nan,
        "images_per_second": trials.groupby("row")["metrics.images_per_second"].mean() if "metrics.images_per_second" in trials else np.nan,
        "trials": trials.groupby("row").size(),
    })
    cats = pd.concat({"det": 100 * det_rows, "loc": 100 * loc_rows}, axis=1)
    return summary, cats


def order_rows(space: spaces.SearchSpace, labels: list[str], default: str) -> list[str]:
    if space.conditions:
        ordered = [n for n in space.condition_names() if n in labels]
    else:
        ordered = sorted(labels, key=_natural)
    return [default] + [r for r in ordered if r != default] if default in labels else ordered


def _natural(label: str) -> list[Any]:
    out: list[Any] = []
    for part in label.split(", "):
        value = part.split("=", 1)[-1]
        try:
            out.append((0, float(value)))
        except ValueError:
            out.append((1, value))
    return out


def build_table(space: spaces.SearchSpace, sweeps: list[Sweep]) -> tuple[pd.DataFrame, pd.DataFrame, list[str], str]:
    """The Table-4-style frame (string cells), the per-category frame, notes, default row label."""
    scale = str(sweeps[0].run.get("tags.scale", space.scale))
    default = default_label(space, scale)
    frames = {s.dataset: ablation_frame(space, s) for s in sweeps}
    labels = sorted({r for summary, _ in frames.values() for r in summary.index})
    rows = order_rows(space, labels, default)
    table = pd.DataFrame(index=pd.Index(rows, name="Condition"))
    cats_all = []
    best_notes = []
    for dataset, (summary, cats) in frames.items():
        name = DATASET_NAMES.get(dataset, dataset)
        if summary.empty:
            continue
        base = summary.loc[default] if default in summary.index else None
        for col, title in (("det", "Det."), ("loc", "Loc.")):
            cells = []
            for r in rows:
                if r not in summary.index or pd.isna(summary.at[r, col]):
                    cells.append("")
                elif base is None or r == default:
                    cells.append(f"{summary.at[r, col]:.1f}")
                else:
                    cells.append(f"{summary.at[r, col] - base[col]:+.1f}")
            table[f"{name} {title}"] = cells
        table[f"{name} val"] = [f"{summary.at[r, 'val']:.1f}" if r in summary.index and pd.notna(summary.at[r, "val"]) else "" for r in rows]
        table[f"{name} img/s"] = [f"{summary.at[r, 'images_per_second']:.1f}" if r in summary.index and pd.notna(summary.at[r, "images_per_second"]) else "" for r in rows]
        table[f"{name} trials"] = [str(int(summary.at[r, "trials"])) if r in summary.index else "" for r in rows]
        if space.search == "optuna":
            best = summary["val"].idxmax() if space.mode == "max" else summary["val"].idxmin()
            best_notes.append(f"{name}: best on validation ({space.metric}, {space.mode}) = {best} -> test Det. {summary.at[best, 'det']:.1f}, Loc. {summary.at[best, 'loc']:.1f}")
        cats.index.name = "Condition"
        cats_all.append(pd.concat({name: cats}, axis=1))
    _add_paper_columns(table, space, rows, default)
    per_cat = pd.concat(cats_all, axis=1).reindex(rows) if cats_all else pd.DataFrame()
    notes = _notes(space, sweeps, default) + best_notes
    return table, per_cat, notes, default


def _add_paper_columns(table: pd.DataFrame, space: spaces.SearchSpace, rows: list[str], default: str) -> None:
    paper = space.paper or {}
    reported = paper.get("rows") or {}
    if not reported:
        return
    datasets = sorted({d for r in reported.values() if isinstance(r, dict) for d in r})
    for dataset in datasets:
        name = DATASET_NAMES.get(dataset, dataset)
        for key, title in (("det", "Det."), ("loc", "Loc.")):
            cells = []
            for r in rows:
                value = (reported.get(r) or reported.get(default if r == default else r, {}) or {}).get(dataset, {}).get(key)
                if value is None and r == default:
                    value = ((paper.get("default") or {}).get(dataset) or {}).get(key)
                cells.append("" if value is None else f"{value:+.1f}" if paper.get("delta") and r != default else f"{value:.1f}")
            if any(cells):
                table[f"paper {name} {title}"] = cells


def _notes(space: spaces.SearchSpace, sweeps: list[Sweep], default: str) -> list[str]:
    notes = [space.description]
    if space.search == "optuna":
        notes.append(f"Selection: configurations were chosen by Optuna (TPE) on the validation split ({space.metric}, {space.mode}); "
                     "the test split is evaluated once per trial and never used for selection.")
    else:
        notes.append(f"Selection: none — a grid ablation reports every row; validation metric shown is {space.metric}. "
                     "Test metrics are evaluated once per trial.")
    notes.append(f"Default row: {default} (absolute); other rows are Δ to it. Det. = image AUROC, Loc. = AUPRO (FPR ≤ 0.3), ×100, "
                 "mean over categories, test split.")
    for s in sweeps:
        status = s.trials["status"].value_counts().to_dict() if not s.trials.empty else {}
        notes.append(f"{DATASET_NAMES.get(s.dataset, s.dataset)}: sweep {s.run.get('tags.sweep')} ({s.run.get('status')}), "
                     f"{len(s.trials)} trials {status}, scale {s.run.get('tags.scale')}, commit {s.run.get('tags.git_commit')}, "
                     f"categories {s.run.get('params.categories')}")
    skipped = {s.run.get("params.skipped_points") for s in sweeps} - {None, "none"}
    notes += [f"Skipped grid points: {x}" for x in skipped]
    if space.paper:
        notes.append(f"Paper numbers: {space.paper.get('source', 'the paper')}" + (" (rows other than the default are deltas)" if space.paper.get("delta") else ""))
    return notes


def _markdown(frame: pd.DataFrame) -> str:
    frame = frame.reset_index()
    cols = [str(c) if not isinstance(c, tuple) else " ".join(map(str, c)) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else (f"{v:.1f}" if isinstance(v, float) else str(v)) for v in row) + " |")
    return "\n".join(lines)


def _latex(frame: pd.DataFrame, caption: str) -> str:
    frame = frame.reset_index()
    cols = [str(c) if not isinstance(c, tuple) else " ".join(map(str, c)) for c in frame.columns]
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    for _, row in frame.iterrows():
        lines.append(" & ".join(esc("" if pd.isna(v) else (f"{v:.1f}" if isinstance(v, float) else v)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _plot(space: spaces.SearchSpace, sweeps: list[Sweep], path: Path, default: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_axis, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    for s in sweeps:
        summary, _ = ablation_frame(space, s)
        if summary.empty:
            continue
        name = DATASET_NAMES.get(s.dataset, s.dataset)
        rows = order_rows(space, list(summary.index), default)
        summary = summary.loc[rows]
        numeric = len(space.axes) == 1 and all(isinstance(v, (int, float)) for v in _axis_values(summary.index))
        x = _axis_values(summary.index) if numeric else np.arange(len(rows))
        order = np.argsort(x) if numeric else np.arange(len(rows))
        for col, title, marker in (("det", "Det. (image AUROC)", "o"), ("loc", "Loc. (AUPRO)", "s"), ("val", f"val ({space.metric})", "^")):
            ax_axis.plot(np.asarray(x)[order], summary[col].to_numpy()[order], marker=marker, label=f"{name} {title}")
        if not numeric:
            ax_axis.set_xticks(x, rows, rotation=30, ha="right", fontsize=8)
        ax_speed.scatter(summary["images_per_second"], summary["det"], label=name)
        for r in rows:
            ax_speed.annotate(r, (summary.at[r, "images_per_second"], summary.at[r, "det"]), fontsize=7)
    ax_axis.set_xlabel(", ".join(a.name for a in space.axes) if space.axes else "condition")
    ax_axis.set_ylabel("×100")
    ax_axis.set_title(space.name)
    ax_axis.legend(fontsize=7)
    ax_speed.set_xlabel("inference images/s")
    ax_speed.set_ylabel("Det. (image AUROC ×100)")
    ax_speed.set_title("detection vs throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _axis_values(labels) -> list[Any]:
    out = []
    for label in labels:
        value = label.split("=", 1)[-1]
        try:
            out.append(float(value))
        except ValueError:
            out.append(value)
    return out


def write_reports(ablation: str, uri: str, out_root: Path) -> list[Path]:
    """Write the ablation's report files; returns their paths (empty if no runs yet)."""
    space = spaces.load(ablation)
    sweeps = load_sweeps(ablation, uri)
    if not sweeps:
        log.warning("no sweeps of %s in %s", ablation, uri)
        return []
    table, per_cat, notes, default = build_table(space, sweeps)
    folder = out_root / "ablations"
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / ablation
    paths = [base.with_suffix(".md"), base.with_suffix(".csv"), base.with_suffix(".tex"), base.with_suffix(".png"),
             folder / f"{ablation}_per_category.md", folder / f"{ablation}_per_category.csv"]
    header = f"# {ablation}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n"
    paths[0].write_text(header + _markdown(table) + "\n")
    table.to_csv(paths[1])
    paths[2].write_text(_latex(table, f"{ablation}: {space.description}"))
    _plot(space, sweeps, paths[3], default)
    paths[4].write_text(f"# {ablation} per category (test split, ×100, absolute)\n\n" + (_markdown(per_cat) if not per_cat.empty else "(no finished trials)") + "\n")
    per_cat.to_csv(paths[5])
    return paths


def leaderboard(uri: str) -> pd.DataFrame:
    """Default-configuration rows of every ablation's latest sweeps; the newest per
    (method, dataset, scale) wins."""
    rows = []
    for name in ablations_in_store(uri):
        space = spaces.load(name)
        for sweep in load_sweeps(name, uri):
            summary, _ = ablation_frame(space, sweep)
            scale = str(sweep.run.get("tags.scale", space.scale))
            default = default_label(space, scale)
            if summary.empty or default not in summary.index:
                continue
            row = summary.loc[default]
            rows.append({"Method": space.method, "Dataset": DATASET_NAMES.get(sweep.dataset, sweep.dataset), "Scale": scale,
                         "Det.": row["det"], "Loc.": row["loc"], "img/s": row["images_per_second"],
                         "Categories": sweep.run.get("params.categories"),
                         "Overrides": sweep.run.get("tags.method_overrides", "none"), "Sweep": sweep.run.get("tags.sweep"),
                         "started": sweep.run["start_time"]})
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).sort_values("started").groupby(["Method", "Dataset", "Scale"]).tail(1)
    return frame.drop(columns="started").sort_values(["Dataset", "Scale", "Det."], ascending=[True, True, False]).set_index("Method")


def write_leaderboard(uri: str, out_root: Path) -> list[Path]:
    board = leaderboard(uri)
    if board.empty:
        return []
    out_root.mkdir(parents=True, exist_ok=True)
    md, csv = out_root / "leaderboard.md", out_root / "leaderboard.csv"
    md.write_text("# Leaderboard\n\n- One row per method, dataset and scale: the default configuration (the papers' defaults at "
                  "that scale, plus the sweep's command-line method overrides) from the most recent sweep that ran it.\n- Det. = image AUROC, Loc. = AUPRO (FPR ≤ 0.3), ×100, mean "
                  "over the listed categories, test split; img/s = batched inference throughput.\n- Smoke-scale rows are CPU "
                  "smoke runs on small images, not comparable with the papers' numbers.\n\n" + _markdown(board) + "\n")
    board.to_csv(csv)
    return [md, csv]


def ablations_in_store(uri: str) -> list[str]:
    names = tracking.experiment_names(uri)
    return [n for n in spaces.available() if n in names]


def main(argv: list[str] | None = None) -> int:
    from orchestrator.config import parse_overrides

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        values, method = parse_overrides(sys.argv[1:] if argv is None else argv)
        unknown = (set(values) | set(method)) - {"ablation", "tracking_uri", "out", "help"}
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))}; valid: ablation, tracking_uri, out")
        if values.get("help"):
            print(__doc__)
            return 0
        uri = tracking.resolve_uri(values.get("tracking_uri"))
        names = [values["ablation"]] if values.get("ablation") else ablations_in_store(uri)
        if values.get("ablation"):
            spaces.load(values["ablation"])  # unknown ablation -> ConfigError listing the valid ones
        if not names:
            print(f"no ablation runs found in {uri}")
            return 0
        out = Path(values.get("out", "reports"))
        for name in names:
            for path in write_reports(name, uri, out):
                print(path)
        for path in write_leaderboard(uri, out):
            print(path)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
