"""A sweep's table rows: per row each metric's mean over categories (:func:`row_stats`),
combined over a selection's sweeps and seeds (:func:`combine`), the seed-noise mark, the
selection-vs-test agreement and the Pareto front of a multi-objective sweep."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import search_space as spaces
from orchestrator import selection_stats as stats
from orchestrator.config import config_to_dict, param_text, resolve_method_config
from orchestrator.report.sweeps import PAPER_METRICS, Selection, Sweep, _text, all_sweeps, dataset_title, select
from orchestrator.results import metric_name


# ------------------------------------------------------------------------------ rows


def row_labels(space: spaces.SearchSpace, trials: pd.DataFrame) -> pd.Series:
    """Each trial's row: its method (benchmarks), condition name, or 'axis=value, ...' of its grid point."""
    if space.is_benchmark:
        return trials["params.method"].astype(str) if "params.method" in trials else pd.Series("?", index=trials.index)
    if space.conditions:
        return trials["params.condition"].astype(str)
    parts = [trials[f"params.method.{a.name}"].astype(str).radd(f"{a.name}=") if f"params.method.{a.name}" in trials
             else pd.Series(f"{a.name}=?", index=trials.index) for a in space.axes]
    label = parts[0]
    for p in parts[1:]:
        label = label + ", " + p
    return label


def default_label(space: spaces.SearchSpace, sweep: Sweep) -> str | None:
    """The default row's label (None for a benchmark: every row is a method's default), as
    the sweep logged it; sweeps recorded before it was logged: from the space and today's
    method config."""
    if space.is_benchmark:
        return None
    logged = _text(sweep.run.get("tags.default_label"))
    if logged:
        return logged
    if space.conditions:
        return space.default_label
    values = config_to_dict(resolve_method_config(space.method, sweep.identity.scale or space.scale, space.fixed))
    return ", ".join(f"{a.name}={param_text(values[a.name])}" for a in space.axes)


def default_rows(space: spaces.SearchSpace, sweep: Sweep) -> list[str]:
    """Labels of the rows that are a method's default configuration (leaderboard rows)."""
    return list(space.methods) if space.is_benchmark else [default_label(space, sweep)]


def per_category(trials: pd.DataFrame, categories: list[str], metric: str) -> pd.DataFrame:
    """[trial x category] test metric, from single-category trials or per-category keys."""
    out = pd.DataFrame(index=trials.index, columns=categories, dtype=float)
    for c in categories:
        key = f"metrics.{metric}/{c}"
        if key in trials:
            out[c] = trials[key]
        if "params.categories" in trials and f"metrics.{metric}" in trials:
            own = trials["params.categories"] == c
            out.loc[own, c] = trials.loc[own, f"metrics.{metric}"]
    return out


def shown_metrics(space: spaces.SearchSpace) -> list[str]:
    """Det., Loc., every other metric the paper reports, and throughput."""
    reported = set()
    paper = space.paper or {}
    for block in [paper.get("default") or {}, *((paper.get("rows") or {}).values())]:
        for values in (block or {}).values():
            reported.update(values or {})
    return [k for k in PAPER_METRICS if k in ("det", "loc", "fps") or k in reported]


@dataclass
class RowStats:
    """One sweep's table rows: per row, each metric's mean over categories (×100 where a
    fraction), the validation metric, finished/failed trial counts and the categories
    without a finished result; per row and category the per-category metrics. A
    ``seeds=N`` sweep has one such table per training seed in ``per_seed``; ``values`` is
    their mean."""

    values: pd.DataFrame  # row x (metric keys, "val")
    finished: dict[str, int]
    failed: dict[str, int]
    missing: dict[str, list[str]]
    categories: dict[str, pd.DataFrame]  # metric key -> row x category
    stopped: dict[str, int] = field(default_factory=dict)  # trials stopped early by the scheduler (ASHA)
    per_seed: list[pd.DataFrame] = field(default_factory=list)  # one values table per training seed

    @property
    def rows(self) -> list[str]:
        return list(self.values.index)


def _row_values(space: spaces.SearchSpace, done: pd.DataFrame, rows: list[str], categories: list[str]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Per row, each metric's mean over categories, and per metric the row x category table."""
    values = pd.DataFrame(index=pd.Index(rows, name="Condition"), dtype=float)
    per_cat: dict[str, pd.DataFrame] = {}
    for key, spec in PAPER_METRICS.items():
        if spec.per_category:
            frame = per_category(done, categories, spec.column)
            frame["row"] = done["row"]
            by_row = (spec.scale * frame.groupby("row").mean()).reindex(rows)
            per_cat[key] = by_row
            values[key] = by_row.mean(axis=1)  # mean over the categories that have a result (missing ones are flagged)
        else:
            column = f"metrics.{spec.column}"
            values[key] = (spec.scale * done.groupby("row")[column].mean()).reindex(rows) if column in done else np.nan
    selection = f"metrics.{space.metric}"
    values["val"] = (100 * done.groupby("row")[selection].mean()).reindex(rows) if selection in done else np.nan
    return values, per_cat


def row_stats(space: spaces.SearchSpace, sweep: Sweep) -> RowStats:
    trials = sweep.trials.copy()
    if trials.empty:
        return RowStats(pd.DataFrame(), {}, {}, {}, {})
    trials["row"] = row_labels(space, trials)
    done = trials[trials["status"] == "FINISHED"]
    categories = sweep.categories
    rows = sorted(set(trials["row"]))
    values, per_cat = _row_values(space, done, rows, categories)
    seeds = sorted(done["params.train_seed"].dropna().unique()) if "params.train_seed" in done else []
    per_seed = [_row_values(space, done[done["params.train_seed"] == seed], rows, categories)[0] for seed in seeds] if len(seeds) > 1 else []
    if per_seed:
        values = pd.concat(per_seed).groupby(level=0).mean().reindex(rows)  # a seed without a value is skipped
    det = per_cat["det"]
    missing = {r: [c for c in categories if pd.isna(det.at[r, c])] for r in rows}
    finished = {r: int((done["row"] == r).sum()) for r in rows}
    failed = {r: int(((trials["row"] == r) & (trials["status"] == "FAILED")).sum()) for r in rows}
    early = done["tags.stopped_early"] == "true" if "tags.stopped_early" in done else pd.Series(False, index=done.index)
    stopped = {r: int(((done["row"] == r) & early).sum()) for r in rows}
    return RowStats(values, finished, failed, missing, per_cat, stopped, per_seed)


@dataclass
class Combined:
    """A selection's rows over its sweeps (seeds): per row and key the values of each sweep."""

    rows: list[str]
    values: dict[str, dict[str, list[float]]]  # row -> key -> one value per sweep that has it
    finished: dict[str, int]
    failed: dict[str, int]
    missing: dict[str, list[str]]  # categories without a finished result in some sweep
    categories: dict[str, pd.DataFrame]  # metric key -> row x category, mean over sweeps
    not_run: set[str] = field(default_factory=set)  # rows the space names that no trial ran
    stopped: dict[str, int] = field(default_factory=dict)  # trials stopped early by the scheduler

    def mean(self, row: str, key: str) -> float:
        v = self.values.get(row, {}).get(key) or []
        return float(np.mean(v)) if v else float("nan")

    def std(self, row: str, key: str) -> float | None:
        v = self.values.get(row, {}).get(key) or []
        return float(np.std(v, ddof=1)) if len(v) > 1 else None


def combine(space: spaces.SearchSpace, selection: Selection, default: str | None) -> Combined:
    stats = [row_stats(space, s) for s in selection.sweeps]
    ran = {r for st in stats for r in st.rows}
    rows = order_rows(space, sorted(ran | set(expected_rows(space))), default)
    values: dict[str, dict[str, list[float]]] = {r: {} for r in rows}
    finished, failed, stopped, missing = dict.fromkeys(rows, 0), dict.fromkeys(rows, 0), dict.fromkeys(rows, 0), {r: [] for r in rows}
    for st in stats:
        for r in st.rows:
            for table in st.per_seed or [st.values]:  # one value per (sweep, training seed)
                for key in table.columns:
                    v = table.at[r, key]
                    if pd.notna(v):
                        values[r].setdefault(key, []).append(float(v))
            finished[r] += st.finished[r]
            failed[r] += st.failed[r]
            stopped[r] += st.stopped.get(r, 0)
            missing[r] += [c for c in st.missing[r] if c not in missing[r]]
    for st in stats:  # a row a sweep never ran counts as missing all of its categories there
        for r in rows:
            if r not in st.rows:
                missing[r] += [c for c in selection.newest.categories if c not in missing[r]]
    categories = {}
    for key in stats[0].categories if stats else {}:
        frames = [st.categories[key] for st in stats if key in st.categories]
        categories[key] = pd.concat(frames).groupby(level=0).mean().reindex(rows) if frames else pd.DataFrame()
    return Combined(rows, values, finished, failed, missing, categories, set(rows) - ran, stopped)


def seeds_of(combined: Combined, row: str, key: str = "det") -> int:
    """How many (sweep, training seed) values a row's metric is the mean of."""
    return len(combined.values.get(row, {}).get(key) or [])


def noise_mark(combined: Combined, row: str, default: str | None, key: str = "det") -> str:
    """Whether a row's Δ to the default row is beyond the seed noise (see
    :func:`orchestrator.selection_stats.noise_verdict`); "" for the default row itself."""
    if default is None or row == default or row not in combined.rows or default not in combined.rows:
        return ""
    delta = combined.mean(row, key) - combined.mean(default, key)
    if math.isnan(delta):
        return ""
    n = min(seeds_of(combined, row, key), seeds_of(combined, default, key))
    return stats.noise_verdict(delta, combined.std(row, key) or 0.0, combined.std(default, key) or 0.0, max(n, 1)).value


def test_key_of(selection_metric: str) -> str | None:
    """The report key of the test metric of the selection metric's kind (val_image_auroc -> det)."""
    kind = selection_metric.removeprefix("val_")
    return next((k for k, spec in PAPER_METRICS.items() if spec.column == metric_name("test", kind)), None)


@dataclass(frozen=True)
class Agreement:
    """How well the selection metric ranks a sweep's rows as the test does."""

    selection_metric: str
    test_metric: str
    rows: int
    tau: float
    interval: tuple[float, float] | None
    regret: float  # test points lost by the validation-best row
    saturated: bool
    seeds: int

    def text(self) -> str:
        interval = f" (95 % bootstrap interval {self.interval[0]:+.2f} … {self.interval[1]:+.2f})" if self.interval else ""
        tau = "undefined (a constant column)" if math.isnan(self.tau) else f"{self.tau:+.2f}{interval}"
        verdict = (f" SATURATED: its spread across rows is below {'the seed noise' if self.seeds > 1 else '0.5 point'}, "
                   "so it cannot tell these rows apart." if self.saturated else "")
        return (f"Selection on the validation split ({self.selection_metric}) vs test ({self.test_metric}) over {self.rows} rows: "
                f"Kendall τ {tau}; test regret of the validation-best row {self.regret:.1f} points.{verdict}")


def agreement(space: spaces.SearchSpace, combined: Combined) -> Agreement | None:
    """Kendall τ (with a bootstrap interval), test regret and saturation of the selection
    metric over the rows that have both values; None with fewer than two such rows."""
    key = test_key_of(space.metric)
    if key is None:
        return None
    rows = [r for r in combined.rows if not math.isnan(combined.mean(r, "val")) and not math.isnan(combined.mean(r, key))]
    if len(rows) < 2:
        return None
    val = [combined.mean(r, "val") for r in rows]
    test = [combined.mean(r, key) for r in rows]
    seed_stds = [sd for r in rows if (sd := combined.std(r, "val")) is not None]
    seeds = max(seeds_of(combined, r, "val") for r in rows)
    # Both in report points (×100): 0.5 point is the smallest spread one seed can resolve.
    saturated = stats.is_saturated(val, seed_stds if seeds > 1 else None, min_spread=100 * stats.HALF_POINT)
    return Agreement(space.metric, PAPER_METRICS[key].column, len(rows), stats.kendall_tau_b(val, test),
                     stats.bootstrap_tau_interval(val, test, seed=0), stats.regret_on_test(val, test, space.mode), saturated, seeds)


@dataclass(frozen=True)
class ParetoFront:
    """A multi-objective sweep's non-dominated trials on its validation objectives, with
    the test value of the selection metric's kind beside each (reported, never used)."""

    objectives: tuple[tuple[str, str], ...]  # (metric, mode), the selection metric first
    test_metric: str
    trials: int  # finished trials with every objective
    rows: tuple[tuple[str, tuple[float, ...], float], ...]  # (row label, objective values, test value), best first objective first

    def header(self) -> list[str]:
        return ["Row", *(f"{name} ({mode})" for name, mode in self.objectives), self.test_metric]

    def cells(self) -> list[list[str]]:
        return [[label, *(f"{v:.4g}" for v in values), f"{test:.4g}"] for label, values, test in self.rows]

    def text(self) -> str:
        goals = ", ".join(f"{n} ({m})" for n, m in self.objectives)
        rows = "; ".join(f"{label}: " + ", ".join(f"{v:.4g}" for v in values) + f" -> {self.test_metric} {test:.4g}"
                         for label, values, test in self.rows)
        return f"Pareto front on validation ({goals}): {len(self.rows)} of {self.trials} trials — {rows}"


def objectives_of(sweep: Sweep, space: spaces.SearchSpace) -> tuple[tuple[str, str], ...]:
    """The (metric, mode) objectives a sweep optimised (its ``objectives`` tag), else the space's metric."""
    names = [n for n in _text(sweep.run.get("tags.objectives")).split(",") if n] or [space.metric]
    return tuple((n, spaces.SPEED_OBJECTIVES.get(n, space.mode if n == space.metric else "max")) for n in names)


def pareto(space: spaces.SearchSpace, sweep: Sweep) -> ParetoFront | None:
    """The Pareto front of a multi-objective sweep's finished trials; None for one objective."""
    objectives = objectives_of(sweep, space)
    columns = [f"metrics.{n}" for n, _ in objectives]
    if len(objectives) < 2 or sweep.trials.empty or not all(c in sweep.trials for c in columns):
        return None
    done = sweep.trials[sweep.trials["status"] == "FINISHED"].dropna(subset=columns)
    if done.empty:
        return None
    key = test_key_of(space.metric)
    test_column = f"metrics.{PAPER_METRICS[key].column}" if key else columns[0]
    labels = row_labels(space, done)
    front = stats.pareto_front(done[columns].to_numpy(), [m for _, m in objectives])
    picked = done.iloc[front]
    rows = sorted(((labels.iloc[i], tuple(float(v) for v in picked.iloc[j][columns]), float(picked.iloc[j].get(test_column, np.nan)))
                   for j, i in enumerate(front)), key=lambda r: r[1][0], reverse=objectives[0][1] == "max")
    return ParetoFront(objectives, test_column.removeprefix("metrics."), len(done), tuple(rows))


def agreement_lines(space: spaces.SearchSpace, uri: str, sweep: str) -> list[str]:
    """The agreement of one finished sweep, a line per dataset (printed at the end of a sweep)."""
    lines = []
    for sel in select(all_sweeps(space.name, uri), sweep):
        comb = combine(space, sel, default_label(space, sel.newest))
        agreed = agreement(space, comb)
        lines.append(f"{dataset_title(sel.dataset)}: " + (agreed.text() if agreed else "fewer than two rows with validation and test values: no agreement to measure"))
        front = pareto(space, sel.newest)
        if front:
            lines.append(f"{dataset_title(sel.dataset)}: {front.text()}")
    return lines


def expected_rows(space: spaces.SearchSpace) -> list[str]:
    """Rows a space names up front (benchmark methods, conditions); grid/Optuna rows are whatever ran."""
    if space.is_benchmark:
        return list(space.methods)
    return space.condition_names() if space.conditions else []


def order_rows(space: spaces.SearchSpace, labels: list[str], default: str | None) -> list[str]:
    if space.is_benchmark:
        return [m for m in space.methods if m in labels] + sorted(r for r in labels if r not in space.methods)
    if space.conditions:
        ordered = [n for n in space.condition_names() if n in labels] + sorted(r for r in labels if r not in space.condition_names())
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
