"""The Table-4-style ablation tables (:func:`build_table`) and the report files written
from them (:func:`write_reports`: Markdown, CSV, LaTeX, the plot, the per-category table)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from orchestrator import search_space as spaces
from orchestrator.report.paper import paper_datasets, paper_value
from orchestrator.report.plots import _plot
from orchestrator.report.rows import Combined, agreement, combine, default_label, noise_mark, order_rows, pareto, shown_metrics
from orchestrator.report.sweeps import PAPER_METRICS, Selection, _text, all_sweeps, dataset_title, select

log = logging.getLogger(__package__)  # the report's one logger, as before the split into modules


# ------------------------------------------------------------------------------ tables


def _fmt(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _fmt_paper(value: float | None) -> str:
    """A paper's number with the precision it was printed with (98.45, 99.2)."""
    if value is None:
        return ""
    text = f"{value:.2f}"
    return text[:-1] if text.endswith("0") else text


def _fmt_pm(mean: float, std: float | None, digits: int = 1, sign: bool = False) -> str:
    text = _fmt(mean, digits, sign)
    return f"{text} ± {std:.{digits}f}" if text and std is not None else text


def _flags(combined: Combined, row: str) -> str:
    if row in combined.not_run:
        return "not run in this sweep"
    parts = []
    if combined.failed[row]:
        parts.append(f"{combined.failed[row]} failed")
    if combined.stopped.get(row):
        parts.append(f"{combined.stopped[row]} stopped early by the scheduler")
    if combined.missing[row]:
        parts.append("missing " + ",".join(combined.missing[row]))
    return "; ".join(parts)


def build_table(space: spaces.SearchSpace, selections: list[Selection]) -> tuple[pd.DataFrame, pd.DataFrame, list[str], str | None]:
    """The Table-4-style frame (string cells), the per-category frame, notes, default row label."""
    default = default_label(space, selections[0].newest)
    keys = shown_metrics(space)
    combined = {sel.dataset: combine(space, sel, default) for sel in selections}
    rows = order_rows(space, sorted({r for c in combined.values() for r in c.rows}), default)
    table = pd.DataFrame(index=pd.Index(rows, name="Condition"))
    cats_all = []
    best_notes = []
    for sel in selections:
        comb = combined[sel.dataset]
        name = dataset_title(sel.dataset)
        if not comb.rows:
            continue
        has_base = default in comb.rows
        for key in keys:
            spec = PAPER_METRICS[key]
            cells = []
            for r in rows:
                if r not in comb.rows:
                    cells.append("")
                elif has_base and r != default and spec.accuracy:
                    cells.append(_fmt_pm(comb.mean(r, key) - comb.mean(default, key), comb.std(r, key), 2 if spec.scale == 1 else 1, sign=True))
                else:
                    cells.append(_fmt_pm(comb.mean(r, key), comb.std(r, key)))
            table[f"{name} {spec.short}"] = cells
        table[f"{name} val"] = [_fmt_pm(comb.mean(r, "val"), comb.std(r, "val")) if r in comb.rows else "" for r in rows]
        table[f"{name} trials"] = [str(comb.finished[r]) if r in comb.rows else "" for r in rows]
        table[f"{name} flags"] = [_flags(comb, r) if r in comb.rows else "" for r in rows]
        if has_base:
            table[f"{name} Δ Det. vs seed noise"] = [noise_mark(comb, r, default) for r in rows]
        agreed = agreement(space, comb)
        if agreed:
            best_notes.append(f"{name}: {agreed.text()}")
        front = pareto(space, sel.newest)
        if front:
            best_notes.append(f"{name}: {front.text()}")
        if space.search == "optuna":
            vals = {r: comb.mean(r, "val") for r in comb.rows if not math.isnan(comb.mean(r, "val"))}
            if vals:
                best = max(vals, key=vals.get) if space.mode == "max" else min(vals, key=vals.get)
                best_notes.append(f"{name}: best on validation ({space.metric}, {space.mode}) = {best} -> test Det. "
                                  f"{_fmt(comb.mean(best, 'det'))}, Loc. {_fmt(comb.mean(best, 'loc'))}")
        cats = pd.concat({k: comb.categories[k] for k in ("det", "loc")}, axis=1)
        cats.index.name = "Condition"
        cats_all.append(pd.concat({name: cats}, axis=1))
    _add_paper_columns(table, space, rows, default, keys)
    per_cat = pd.concat(cats_all, axis=1).reindex(rows) if cats_all else pd.DataFrame()
    notes = _notes(space, selections, default) + best_notes
    return table, per_cat, notes, default


def _add_paper_columns(table: pd.DataFrame, space: spaces.SearchSpace, rows: list[str], default: str | None, keys: list[str]) -> None:
    paper = space.paper or {}
    for dataset in paper_datasets(space):
        name = dataset_title(dataset)
        for key in keys:
            cells = []
            for r in rows:
                value = paper_value(space, dataset, r, key, default, absolute=False)
                delta = paper.get("delta") and r != default and not space.is_benchmark
                cells.append(("+" if delta and value is not None and value >= 0 else "") + _fmt_paper(value))
            if any(cells):
                table[f"paper {name} {PAPER_METRICS[key].short}"] = cells


def _notes(space: spaces.SearchSpace, selections: list[Selection], default: str | None) -> list[str]:
    notes = [space.description]
    if space.search == "optuna":
        notes.append(f"Selection: configurations were chosen by Optuna (TPE) on the validation split ({space.metric}, {space.mode}); "
                     "the test split is evaluated once per trial and never used for selection.")
    else:
        notes.append(f"Selection: none — a grid ablation reports every row; validation metric shown is {space.metric}. "
                     "Test metrics are evaluated once per trial.")
    if default is None:
        notes.append("Every row is a method at its own defaults (absolute numbers). Det. = image AUROC, Loc. = AUPRO (FPR ≤ 0.3), ×100, "
                     "mean over categories, test split.")
    else:
        notes.append(f"Default row: {default} (absolute); other rows are Δ to it. Det. = image AUROC, Loc. = AUPRO (FPR ≤ 0.3), ×100, "
                     "mean over categories, test split; img/s absolute.")
    for sel in selections:
        for s in sel.sweeps:
            status = s.trials["status"].value_counts().to_dict() if not s.trials.empty else {}
            notes.append(f"{dataset_title(s.dataset)}: sweep {s.name} ({s.status}), {len(s.trials)} trials {status}, scale {s.identity.scale}, "
                         f"seed {s.seed}, commit {_text(s.run.get('tags.git_commit'), 'unknown')}, categories {s.identity.categories}, "
                         f"method overrides {s.identity.overrides} — {sel.reason}")
    skipped = {_text(s.run.get("params.skipped_points"), "none") for sel in selections for s in sel.sweeps} - {"none"}
    notes += [f"Skipped grid points: {x}" for x in skipped]
    if space.paper:
        notes.append(f"Paper numbers: {space.paper.get('source', 'the paper')}" + (" (rows other than the default are deltas)" if space.paper.get("delta") else ""))
    return notes


def _markdown(frame: pd.DataFrame) -> str:
    frame = frame.reset_index()
    cols = [str(c) if not isinstance(c, tuple) else " ".join(str(x) for x in c if str(x)) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else (f"{v:.1f}" if isinstance(v, float) else str(v)) for v in row) + " |")
    return "\n".join(lines)


def _latex(frame: pd.DataFrame, caption: str) -> str:
    frame = frame.reset_index()
    cols = [str(c) if not isinstance(c, tuple) else " ".join(str(x) for x in c if str(x)) for c in frame.columns]
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("±", r"$\pm$")
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    for _, row in frame.iterrows():
        lines.append(" & ".join(esc("" if pd.isna(v) else (f"{v:.1f}" if isinstance(v, float) else v)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_reports(ablation: str | spaces.SearchSpace, uri: str, out_root: Path, sweep: str | None = None) -> list[Path]:
    """Write the ablation's report files; returns their paths (empty if no runs yet).
    ``ablation``: a search-space name or path, or the space itself (a sweep passes the
    one it ran). ``sweep``: build them from that sweep only (see :func:`select`)."""
    space = ablation if isinstance(ablation, spaces.SearchSpace) else spaces.load(ablation)
    ablation = space.name
    selections = select(all_sweeps(ablation, uri), sweep)
    if not selections:
        log.warning("no sweeps of %s in %s", ablation, uri)
        return []
    table, per_cat, notes, default = build_table(space, selections)
    folder = out_root / "ablations"
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / ablation
    paths = [base.with_suffix(".md"), base.with_suffix(".csv"), base.with_suffix(".tex"), base.with_suffix(".png"),
             folder / f"{ablation}_per_category.md", folder / f"{ablation}_per_category.csv"]
    header = f"# {ablation}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n"
    paths[0].write_text(header + _markdown(table) + "\n")
    table.to_csv(paths[1])
    paths[2].write_text(_latex(table, f"{ablation}: {space.description}"))
    _plot(space, selections, paths[3], default)
    paths[4].write_text(f"# {ablation} per category (test split, ×100, absolute)\n\n" + (_markdown(per_cat) if not per_cat.empty else "(no finished trials)") + "\n")
    per_cat.to_csv(paths[5])
    return paths
