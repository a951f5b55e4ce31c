"""Regenerate ablation tables, leaderboards and the HTML report site from MLflow (never
from side files; MLflow is read only through orchestrator/tracking.py).

    python -m orchestrator.report                         # every ablation found in MLflow
    python -m orchestrator.report ablation=transfusion_steps tracking_uri=sqlite:////abs/mlflow.db
    python -m orchestrator.report sweep=transfusion_steps-synthetic-20260101-120000   # report that sweep
    python -m orchestrator.report mlflow_ui_url=http://127.0.0.1:5000                # where run links point

Keys: ablation, sweep, tracking_uri, out (default reports), mlflow_ui_url (default
http://127.0.0.1:5000, where ``mlflow ui`` listens).

Which sweeps a table shows. A sweep's *identity* is (ablation, dataset, scale, categories,
command-line method overrides). Per dataset, a table is built from one identity: the one
of the latest sweep that ran the space's own defaults (no method overrides), else the
latest sweep; if that identity ran with several seeds, its latest sweep per seed is
averaged (mean ± std). Every other sweep of the ablation is listed, never mixed in;
``sweep=<name>`` reports exactly that sweep instead.

Tables are laid out like TransFusion's Table 4: the default condition in absolute numbers,
every other row as Δ to it; Det. = image AUROC, Loc. = AUPRO (×100), plus every other
metric the search space's ``paper:`` block reports (pixel AUROC, pixel AP, FPS), one
column group per dataset, beside the paper's own numbers. Written to
``reports/ablations/<name>.{md,csv,tex,png}`` plus ``<name>_per_category.{md,csv}``.

Leaderboards (``reports/leaderboard.{md,csv}``): one per dataset and scale, a separate
table per category set; a row is a method's default configuration from the newest sweep
that ran it (any ablation, or a benchmark space). Rows are ranked by Det. only against
rows of the same category set, and only when complete and without method overrides;
failed trials and categories without a finished result are flagged in the row.

The site (``reports/site/index.html``, opens from disk): an index of ablations and
leaderboards, one page per ablation (paper vs reproduced, plot, per-category table,
sample anomaly maps, the reproducing command, git commit, MLflow links), the
leaderboards. :func:`write_leaderboard` (run at the end of every sweep) rewrites it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from orchestrator import search_space as spaces
from orchestrator import selection as stats
from orchestrator import tracking
from orchestrator.config import Settings, config_to_dict, flatten, param_text, resolve_method_config
from orchestrator.errors import ConfigError, UserError
from orchestrator.results import metric_name

log = logging.getLogger(__name__)

DATASET_NAMES = {"mvtec_ad": "MVTec AD", "visa": "VisA", "btad": "BTAD", "mpdd": "MPDD", "dagm": "DAGM", "synthetic": "Synthetic", "generality": "Generality", "folder": "Folder"}
HEADLINE = {"det": metric_name("test", "image_auroc"), "loc": metric_name("test", "aupro")}


class MetricSpec(NamedTuple):
    column: str  # MLflow metric name
    short: str  # table header
    title: str  # long name
    scale: float  # ×100 for the [0, 1] metrics
    per_category: bool  # logged per category (metric/<category>)
    accuracy: bool  # Δ to the default row makes sense (not for throughput)


# The keys a search space's ``paper:`` block may use, in display order.
PAPER_METRICS: dict[str, MetricSpec] = {
    "det": MetricSpec(HEADLINE["det"], "Det.", "image AUROC", 100.0, True, True),
    "loc": MetricSpec(HEADLINE["loc"], "Loc.", "AUPRO (FPR ≤ 0.3)", 100.0, True, True),
    "pixel_auroc": MetricSpec(metric_name("test", "pixel_auroc"), "pix. AUROC", "pixel AUROC", 100.0, True, True),
    "pixel_ap": MetricSpec(metric_name("test", "pixel_ap"), "pix. AP", "pixel AP", 100.0, True, True),
    "fps": MetricSpec("images_per_second", "img/s", "inference images/s (papers: FPS on their GPU)", 1.0, False, False),
}
SETTINGS_NOT_IN_COMMAND = {"tracking_uri", "storage_path", "data.cache_dir", "resume", "retrain", "help", "ablation", "method"}
# Settings a search space supplies (plan.settings_for): always spelled out, so the command
# reruns the same data and resources even if the space's defaults change.
SETTINGS_ALWAYS_IN_COMMAND = {"dataset", "scale", "trial.cpus", "trial.gpus", "trial.workers"}
MAPS_PER_ROW = 4  # sample anomaly maps shown per table row on the site
MAPS_PER_TRIAL = 2


def dataset_title(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


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


# ------------------------------------------------------------------------------ sweeps


class Identity(NamedTuple):
    """What makes two sweeps comparable: same ablation, data, scale, categories, overrides."""

    ablation: str
    dataset: str
    scale: str
    categories: str  # comma-separated, as logged
    overrides: str  # "none" or "method.a=1 method.b=2"


def _text(value: Any, default: str = "") -> str:
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


@dataclass
class Sweep:
    """One sweep's parent run and its trials (child runs), read back from MLflow."""

    dataset: str
    run: pd.Series  # the parent run
    trials: pd.DataFrame  # child runs

    @property
    def name(self) -> str:
        return _text(self.run.get("tags.sweep"), _text(self.run.get("tags.mlflow.runName"), self.run["run_id"]))

    @property
    def identity(self) -> Identity:
        return Identity(_text(self.run.get("tags.ablation")), self.dataset, _text(self.run.get("tags.scale")),
                        _text(self.run.get("params.categories")), _text(self.run.get("tags.method_overrides"), "none"))

    @property
    def categories(self) -> list[str]:
        return [c for c in self.identity.categories.split(",") if c]

    @property
    def seed(self) -> str:
        return _text(self.run.get("params.settings.seed"), "?")

    @property
    def started(self) -> pd.Timestamp:
        return self.run["start_time"]

    @property
    def status(self) -> str:
        return _text(self.run.get("status"))

    @property
    def experiment(self) -> str:
        return _text(self.run.get("experiment_id"))

    @property
    def finished_trials(self) -> int:
        return int((self.trials["status"] == "FINISHED").sum()) if not self.trials.empty else 0

    @property
    def failed_trials(self) -> int:
        return int((self.trials["status"] == "FAILED").sum()) if not self.trials.empty else 0


def all_sweeps(ablation: str, uri: str) -> list[Sweep]:
    """Every sweep (parent run) of an ablation with its trials, newest first."""
    runs = with_current_names(tracking.search_runs(uri, ablation))
    if runs.empty or "tags.kind" not in runs:
        return []
    parents = runs[runs["tags.kind"] == "sweep"].sort_values("start_time", ascending=False)
    trials = runs[runs["tags.kind"] == "trial"]
    parent_of = trials["tags.mlflow.parentRunId"] if "tags.mlflow.parentRunId" in trials else pd.Series(index=trials.index, dtype=object)
    return [Sweep(_text(p.get("tags.dataset"), "unknown"), p, trials[parent_of == p["run_id"]]) for _, p in parents.iterrows()]


@dataclass
class Selection:
    """The sweeps one dataset's table is built from: one identity, its latest sweep per seed."""

    identity: Identity
    sweeps: list[Sweep]  # newest first
    reason: str

    @property
    def dataset(self) -> str:
        return self.identity.dataset

    @property
    def newest(self) -> Sweep:
        return self.sweeps[0]


def select(sweeps: list[Sweep], pinned: str | None = None) -> list[Selection]:
    """Per dataset, the sweeps its table shows (see the module docstring); ``pinned``: that sweep only."""
    if pinned:
        chosen = [s for s in sweeps if s.name == pinned]
        if not chosen:
            raise ConfigError(f"no sweep named {pinned!r} in this ablation; sweeps: {', '.join(s.name for s in sweeps) or 'none'}")
        return [Selection(chosen[0].identity, chosen[:1], f"chosen with sweep={pinned}")]
    selections = []
    for dataset in sorted({s.dataset for s in sweeps}):
        group = [s for s in sweeps if s.dataset == dataset]  # newest first
        usable = [s for s in group if s.finished_trials] or group
        defaults = [s for s in usable if s.identity.overrides == "none"]
        pick = (defaults or usable)[0]
        reason = ("the latest sweep that ran the space's own defaults (no method overrides)" if defaults
                  else "the latest sweep (every sweep of this dataset ran with method overrides)")
        per_seed: dict[str, Sweep] = {}
        for s in usable:
            if s.identity == pick.identity and s.seed not in per_seed:
                per_seed[s.seed] = s
        chosen = list(per_seed.values())
        if len(chosen) > 1:
            reason += f"; its latest sweep for each of {len(chosen)} seeds (mean ± std)"
        selections.append(Selection(pick.identity, chosen, reason))
    return selections


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
    :func:`orchestrator.selection.noise_verdict`); "" for the default row itself."""
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


# ------------------------------------------------------------------------------ paper


def paper_datasets(space: spaces.SearchSpace) -> list[str]:
    paper = space.paper or {}
    found = set((paper.get("default") or {}))
    for block in (paper.get("rows") or {}).values():
        found.update(block or {})
    return sorted(found)


def paper_value(space: spaces.SearchSpace, dataset: str, row: str, key: str, default: str | None, absolute: bool) -> float | None:
    """The paper's number for a row: as printed (``absolute=False``: a Δ where the paper
    gives Δs), or absolute (a Δ added to the paper's default row)."""
    paper = space.paper or {}
    reported = ((paper.get("rows") or {}).get(row) or {}).get(dataset, {}) or {}
    base = ((paper.get("default") or {}).get(dataset) or {}).get(key)
    value = reported.get(key)
    if row == default or space.is_benchmark:
        return value if value is not None else base if row == default else None
    if value is None or not paper.get("delta") or not absolute:
        return value
    return None if base is None else base + value


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


def _plot(space: spaces.SearchSpace, selections: list[Selection], path: Path, default: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_axis, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    for sel in selections:
        comb = combine(space, sel, default)
        rows = [r for r in comb.rows if comb.finished[r]]
        if not rows:
            continue
        name = dataset_title(sel.dataset)
        numeric = len(space.axes) == 1 and all(isinstance(v, (int, float)) for v in _axis_values(rows))
        x = _axis_values(rows) if numeric else np.arange(len(rows))
        order = np.argsort(x) if numeric else np.arange(len(rows))
        for col, title, marker in (("det", "Det. (image AUROC)", "o"), ("loc", "Loc. (AUPRO)", "s"), ("val", f"val ({space.metric})", "^")):
            y = np.array([comb.mean(r, col) for r in rows])
            err = np.array([comb.std(r, col) or 0.0 for r in rows])
            ax_axis.errorbar(np.asarray(x)[order], y[order], yerr=err[order] if err.any() else None, marker=marker, capsize=3,
                             label=f"{name} {title}")
        if not numeric:
            ax_axis.set_xticks(x, rows, rotation=30, ha="right", fontsize=8)
        speed = [comb.mean(r, "fps") for r in rows]
        det = [comb.mean(r, "det") for r in rows]
        ax_speed.scatter(speed, det, label=name)
        for r, sx, sy in zip(rows, speed, det):
            ax_speed.annotate(r, (sx, sy), fontsize=7)
    ax_axis.set_xlabel(", ".join(space.axis_names) if space.axes or space.is_benchmark else "condition")
    ax_axis.set_ylabel("×100")
    ax_axis.set_title(space.name)
    if ax_axis.get_legend_handles_labels()[0]:
        ax_axis.legend(fontsize=7)
    ax_speed.set_xlabel("inference images/s")
    ax_speed.set_ylabel("Det. (image AUROC ×100)")
    ax_speed.set_title("detection vs throughput")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
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


# ------------------------------------------------------------------------------ leaderboard


@dataclass
class BoardRow:
    """A method's default configuration as one sweep measured it."""

    method: str
    sweep: Sweep
    ablation: str
    label: str  # the row of the ablation it came from
    values: dict[str, float]  # metric key -> mean over the categories with a result
    finished: int
    failed: int
    missing: list[str]
    paper: dict[str, float]  # the paper's default-row numbers on this dataset
    paper_source: str
    rank: int | None = None
    unranked: list[str] = field(default_factory=list)  # why the row is not ranked

    @property
    def identity(self) -> Identity:
        return self.sweep.identity


@dataclass
class Board:
    """One leaderboard table: a dataset, a scale and one category set."""

    dataset: str
    scale: str
    categories: str
    rows: list[BoardRow]

    @property
    def anchor(self) -> str:
        return "board-" + "-".join(part.replace(",", "_") for part in (self.dataset, self.scale, self.categories or "all"))


def board_rows(uri: str) -> list[BoardRow]:
    """Every sweep's default row(s); per (dataset, scale, categories, method, overrides) the newest."""
    found: dict[tuple, BoardRow] = {}
    for name in ablations_in_store(uri):
        space = spaces.load(name)
        for sweep in all_sweeps(name, uri):
            stats = row_stats(space, sweep)
            for label in default_rows(space, sweep):
                if label not in stats.rows:
                    continue
                method = label if space.is_benchmark else _text(sweep.run.get("tags.method"), space.method)
                paper = {k: v for k in PAPER_METRICS
                         if (v := paper_value(space, sweep.dataset, label, k, label, absolute=True)) is not None}
                row = BoardRow(method, sweep, name, label, {k: float(stats.values.at[label, k]) for k in PAPER_METRICS},
                               stats.finished[label], stats.failed[label], stats.missing[label], paper,
                               str((space.paper or {}).get("source", "")) if paper else "")
                key = (*sweep.identity[1:4], method, sweep.identity.overrides)
                if key not in found or found[key].sweep.started < sweep.started:
                    found[key] = row
    return list(found.values())


def leaderboards(uri: str) -> list[Board]:
    """One table per (dataset, scale, category set), rows ranked by Det. within it."""
    groups: dict[tuple[str, str, str], list[BoardRow]] = {}
    for row in board_rows(uri):
        groups.setdefault((row.identity.dataset, row.identity.scale, row.identity.categories), []).append(row)
    boards = []
    for (dataset, scale, categories), rows in sorted(groups.items()):
        for row in rows:
            row.unranked = []
            if row.identity.overrides != "none":
                row.unranked.append("method overrides")
            if row.missing:
                row.unranked.append(f"no finished result for {', '.join(row.missing)}")
            if math.isnan(row.values["det"]):
                row.unranked.append("no Det. result")
        ranked = sorted((r for r in rows if not r.unranked), key=lambda r: -r.values["det"])
        for i, row in enumerate(ranked, 1):
            row.rank = i
        rest = sorted((r for r in rows if r.unranked), key=lambda r: (r.method, -r.sweep.started.value))
        boards.append(Board(dataset, scale, categories, ranked + rest))
    return boards


def _board_frame(board: Board) -> pd.DataFrame:
    records = []
    for r in board.rows:
        record = {"Method": r.method, "Dataset": dataset_title(board.dataset), "Scale": board.scale,
                  "Rank": str(r.rank) if r.rank else "–"}
        for key, spec in PAPER_METRICS.items():
            record[spec.short] = _fmt(r.values[key], 2 if key == "fps" else 1)
        for key in ("det", "loc", "pixel_auroc"):
            record[f"paper {PAPER_METRICS[key].short}"] = _fmt_paper(r.paper.get(key))
        record.update({"Failed trials": str(r.failed), "Missing categories": ",".join(r.missing) or "none",
                       "Overrides": r.identity.overrides, "Not ranked because": "; ".join(r.unranked),
                       "Categories": board.categories, "Sweep": r.sweep.name, "Ablation": r.ablation})
        records.append(record)
    return pd.DataFrame(records).set_index("Method")


def leaderboard(uri: str) -> pd.DataFrame:
    """Every leaderboard's rows in one frame (column Categories tells the tables apart)."""
    frames = [_board_frame(b) for b in leaderboards(uri)]
    return pd.concat(frames) if frames else pd.DataFrame()


LEADERBOARD_RULES = [
    "One leaderboard per dataset and scale, a separate table per category set: rows are ranked only against rows that "
    "ran the same categories.",
    "A row is a method's default configuration (the papers' defaults at that scale, plus the sweep's command-line method "
    "overrides) from the newest sweep that ran it, in any ablation or benchmark space.",
    "Ranked by Det. only when complete and without method overrides; other rows are listed unranked with the reason. "
    "Failed trials and categories without a finished result are flagged in the row, never averaged away.",
    "Det. = image AUROC, Loc. = AUPRO (FPR ≤ 0.3), pix. = pixel-level, ×100, mean over the categories with a result, "
    "test split; img/s = batched inference throughput. paper = the paper's default-row number on this dataset.",
    "Smoke-scale rows are CPU smoke runs on small images, not comparable with the papers' numbers.",
    "Selection: none here — every row is a default configuration, nothing on this page was chosen by a metric. Where an "
    "ablation selects (Optuna, 'best' rows), it selects on the validation split (held-out normals plus defects from "
    "orchestrator/data/validation_defects.py, a family no method trains on), and its page reports Kendall's τ between "
    "the selection metric and the test, the test regret of its choice and whether the selection metric is saturated.",
]


def write_leaderboard(uri: str, out_root: Path, site: bool = True, mlflow_ui_url: str | None = None) -> list[Path]:
    """``leaderboard.{md,csv}`` (returned) and, with ``site``, the whole HTML site under
    ``out_root/site`` (see :func:`write_site`; not returned: it is a folder, not a file)."""
    boards = leaderboards(uri)
    written: list[Path] = []
    if boards:
        out_root.mkdir(parents=True, exist_ok=True)
        md, csv = out_root / "leaderboard.md", out_root / "leaderboard.csv"
        parts = ["# Leaderboard\n", "\n".join(f"- {rule}" for rule in LEADERBOARD_RULES) + "\n"]
        heading = None
        for board in boards:
            if (board.dataset, board.scale) != heading:
                heading = (board.dataset, board.scale)
                parts.append(f"## {dataset_title(board.dataset)} · {board.scale}\n")
            parts.append(f"### categories {board.categories or 'all'}\n")
            parts.append(_markdown(_board_frame(board).drop(columns=["Categories"])) + "\n")
        md.write_text("\n".join(parts))
        leaderboard(uri).to_csv(csv)
        written = [md, csv]
    if site:
        index = write_site(uri, out_root / "site", mlflow_ui_url=mlflow_ui_url)
        log.info("report site: %s", index)
    return written


def ablations_in_store(uri: str) -> list[str]:
    names = tracking.experiment_names(uri)
    return [n for n in spaces.available() if n in names]


# ------------------------------------------------------------------------------ the site


def reproduce_command(sweep: Sweep) -> str:
    """The sweep command that reruns this sweep: every setting that differs from the
    defaults (except where things are stored), plus its method overrides."""
    defaults = {k: param_text(v) for k, v in flatten(config_to_dict(Settings())).items()}
    parts = [f"ablation={sweep.identity.ablation}"]
    for key, default in defaults.items():
        if key in SETTINGS_NOT_IN_COMMAND:
            continue
        value = sweep.run.get(f"params.settings.{key}")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if str(value) == default and key not in SETTINGS_ALWAYS_IN_COMMAND:
            continue
        text = str(value)
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            text = "[" + ",".join(str(x) for x in parsed) + "]"
        elif text == "None":
            text = "null"
        parts.append(f"{key}={text}")
    if sweep.identity.overrides != "none":
        parts += sweep.identity.overrides.split()
    return "python -m orchestrator.sweep " + " ".join(parts)


def _commit(sweep: Sweep) -> dict[str, Any]:
    text = _text(sweep.run.get("tags.git_commit"), "unknown")
    sha = text.removesuffix("-dirty")
    return {"text": text, "sha": sha, "dirty": text.endswith("-dirty"), "known": sha not in ("", "unknown")}


def _sweep_view(sweep: Sweep, ui_url: str | None, used: bool) -> dict[str, Any]:
    return {"name": sweep.name, "dataset": dataset_title(sweep.dataset), "scale": sweep.identity.scale,
            "categories": sweep.identity.categories, "overrides": sweep.identity.overrides, "seed": sweep.seed,
            "status": sweep.status, "started": sweep.started.strftime("%Y-%m-%d %H:%M"), "finished": sweep.finished_trials,
            "failed": sweep.failed_trials, "trials": len(sweep.trials), "used": used, "commit": _commit(sweep),
            "url": tracking.run_url(ui_url, sweep.experiment, sweep.run["run_id"]), "command": reproduce_command(sweep)}


def _cell(text: str, kind: str = "") -> dict[str, str]:
    return {"text": text, "kind": kind}


def _comparison_table(space: spaces.SearchSpace, sel: Selection, comb: Combined, default: str | None, ui_url: str | None) -> dict[str, Any]:
    """Paper vs reproduced for one selection: per metric ours (mean ± std), paper, Δ."""
    keys = shown_metrics(space)
    paper_here = sel.dataset in paper_datasets(space)
    groups = []
    for key in keys:
        spec = PAPER_METRICS[key]
        has_paper = paper_here and any(paper_value(space, sel.dataset, r, key, default, True) is not None for r in comb.rows)
        columns = ["ours"] + (["paper", "Δ"] if has_paper and spec.accuracy else ["paper"] if has_paper else [])
        groups.append({"title": spec.short, "long": spec.title, "key": key, "columns": columns})
    rows = []
    for r in comb.rows:
        cells = []
        for group in groups:
            key = group["key"]
            digits = 2 if key == "fps" else 1
            ours = comb.mean(r, key)
            cells.append(_cell(_fmt_pm(ours, comb.std(r, key), digits), "num"))
            if "paper" in group["columns"]:
                theirs = paper_value(space, sel.dataset, r, key, default, True)
                cells.append(_cell(_fmt_paper(theirs), "num paper"))
                if "Δ" in group["columns"]:
                    delta = None if theirs is None or math.isnan(ours) else ours - theirs
                    cells.append(_cell(_fmt(delta, 1, sign=True), "num " + ("neg" if delta is not None and delta < 0 else "pos")))
        val = comb.mean(r, "val")
        rows.append({"label": r, "default": r == default or space.is_benchmark, "cells": cells,
                     "val": _fmt_pm(val, comb.std(r, "val")), "trials": comb.finished[r], "flags": _flags(comb, r),
                     "noise": noise_mark(comb, r, default)})
    return {"groups": groups, "rows": rows, "paper_here": paper_here}


def _paper_table(space: spaces.SearchSpace, default: str | None) -> dict[str, Any] | None:
    """Every number the paper block holds, absolute, per dataset and metric."""
    datasets = paper_datasets(space)
    if not datasets:
        return None
    labels = list(dict.fromkeys(([default] if default else []) + list((space.paper or {}).get("rows") or {})))
    labels = order_rows(space, labels, default)
    columns = [(d, k) for d in datasets for k in PAPER_METRICS
               if any(paper_value(space, d, r, k, default, True) is not None for r in labels)]
    rows = [{"label": r, "cells": [_fmt_paper(paper_value(space, d, r, k, default, True)) for d, k in columns]} for r in labels]
    return {"columns": [f"{dataset_title(d)} {PAPER_METRICS[k].short}" for d, k in columns], "rows": rows,
            "source": str((space.paper or {}).get("source", "")), "delta": bool((space.paper or {}).get("delta"))}


def _category_tables(space: spaces.SearchSpace, comb: Combined, categories: list[str]) -> list[dict[str, Any]]:
    tables = []
    for key in [k for k in shown_metrics(space) if PAPER_METRICS[k].per_category]:
        frame = comb.categories.get(key)
        if frame is None or frame.empty:
            continue
        rows = [{"label": r, "cells": [_fmt(frame.at[r, c]) if c in frame.columns else "" for c in categories]} for r in comb.rows]
        tables.append({"title": f"{PAPER_METRICS[key].short} ({PAPER_METRICS[key].title}) per category", "categories": categories, "rows": rows})
    return tables


def _sample_maps(space: spaces.SearchSpace, sweep: Sweep, uri: str, folder: Path, rel: str, rows: list[str],
                 ui_url: str | None) -> list[dict[str, Any]]:
    """Per row, up to MAPS_PER_ROW input | map | ground-truth PNGs of its finished trials,
    copied from the child runs' ``anomaly_maps`` artifacts into the site."""
    trials = sweep.trials[sweep.trials["status"] == "FINISHED"].copy() if not sweep.trials.empty else sweep.trials
    if trials.empty:
        return []
    trials["row"] = row_labels(space, trials)
    out = []
    for r in rows:
        images = []
        for _, trial in trials[trials["row"] == r].iterrows():
            if len(images) >= MAPS_PER_ROW:
                break
            run_id = trial["run_id"]
            try:
                paths = tracking.artifact_paths(uri, run_id, "anomaly_maps")
            except Exception as exc:  # a store without the artifacts (moved, deleted) must not stop the report
                log.warning("no anomaly maps for run %s: %s", run_id, exc)
                continue
            paths = sorted(paths, key=lambda p: ("normal" in Path(p).stem, p))[:MAPS_PER_TRIAL]
            for path in paths[: MAPS_PER_ROW - len(images)]:
                target = folder / run_id / Path(path).name
                if not target.exists():
                    try:
                        tracking.download_artifact(uri, run_id, path, target)
                    except Exception as exc:
                        log.warning("could not fetch %s of run %s: %s", path, run_id, exc)
                        continue
                images.append({"src": f"{rel}/{run_id}/{Path(path).name}", "caption": f"{_text(trial.get('tags.mlflow.runName'))} — {Path(path).stem}",
                               "url": tracking.run_url(ui_url, sweep.experiment, run_id, artifact=path)})
        if images:
            out.append({"label": r, "images": images})
    return out


def _ablation_page(name: str, uri: str, site: Path, ui_url: str | None, pinned: str | None) -> dict[str, Any] | None:
    space = spaces.load(name)
    sweeps = all_sweeps(name, uri)
    if not sweeps:
        return None
    selections = select(sweeps, pinned)
    default = default_label(space, selections[0].newest)
    asset_dir = site / "ablations" / name
    plot = asset_dir / "plot.png"
    _plot(space, selections, plot, default)
    used = {s.name for sel in selections for s in sel.sweeps}
    sections = []
    for sel in selections:
        comb = combine(space, sel, default)
        sections.append({
            "dataset": dataset_title(sel.dataset), "identity": sel.identity._asdict(), "reason": sel.reason,
            "sweeps": [_sweep_view(s, ui_url, True) for s in sel.sweeps],
            "comparison": _comparison_table(space, sel, comb, default, ui_url),
            "categories": _category_tables(space, comb, sel.newest.categories),
            "maps": _sample_maps(space, sel.newest, uri, asset_dir / "maps", f"{name}/maps", comb.rows, ui_url),
            "warnings": [f"{r}: {_flags(comb, r)}" for r in comb.rows if _flags(comb, r)],
            "agreement": agreement(space, comb),
            "pareto": pareto(space, sel.newest),
            "seeds": max([seeds_of(comb, r) for r in comb.rows] or [1]),
        })
    _, _, notes, _ = build_table(space, selections)
    experiment = sweeps[0].experiment
    return {
        "name": name, "description": space.description, "space": space,
        "methods": ", ".join(space.methods) if space.is_benchmark else space.method,
        "default": default, "delta_layout": default is not None, "sections": sections,
        "paper": _paper_table(space, default), "plot": f"{name}/plot.png", "notes": notes,
        "others": [_sweep_view(s, ui_url, s.name in used) for s in sweeps],
        "experiment_url": tracking.experiment_url(ui_url, experiment), "pinned": pinned,
        "summary": {"datasets": ", ".join(sec["dataset"] for sec in sections),
                    "sweeps": len(sweeps), "latest": sweeps[0].started.strftime("%Y-%m-%d %H:%M"),
                    "status": ", ".join(f"{s['name']} ({s['status']})" for sec in sections for s in sec["sweeps"])},
    }


def _board_view(board: Board, ui_url: str | None) -> dict[str, Any]:
    rows = []
    for r in board.rows:
        rows.append({
            "rank": r.rank, "method": r.method, "ablation": r.ablation, "label": r.label,
            "values": [_fmt(r.values[k], 2 if k == "fps" else 1) for k in PAPER_METRICS],
            "paper": [_fmt_paper(r.paper.get(k)) for k in PAPER_METRICS],
            "failed": r.failed, "missing": r.missing, "finished": r.finished, "overrides": r.identity.overrides,
            "unranked": r.unranked, "sweep": r.sweep.name, "sweep_url": tracking.run_url(ui_url, r.sweep.experiment, r.sweep.run["run_id"]),
            "status": r.sweep.status, "paper_source": r.paper_source,
        })
    return {"dataset": dataset_title(board.dataset), "scale": board.scale, "categories": board.categories or "all",
            "anchor": board.anchor, "rows": rows, "metrics": [spec.short for spec in PAPER_METRICS.values()]}


def write_site(uri: str, out: Path, mlflow_ui_url: str | None = None, pinned: dict[str, str] | None = None,
               ablations: list[str] | None = None) -> Path:
    """(Re)write the static HTML site under ``out``; returns ``out/index.html``.

    Every ablation found in the store gets a page (``pinned`` maps an ablation to the
    sweep its page shows); leaderboards on ``leaderboard.html``. Sample anomaly maps are
    copied from MLflow into ``out/ablations/<name>/maps`` (kept between runs: artifacts of
    a run never change). Run links point at the MLflow UI at ``mlflow_ui_url``.
    """
    from orchestrator import site as templates

    out = Path(out)
    pinned = pinned or {}
    names = ablations if ablations is not None else ablations_in_store(uri)
    (out / "ablations").mkdir(parents=True, exist_ok=True)
    templates.copy_static(out / "static")
    ui = mlflow_ui_url or tracking.DEFAULT_UI_URL
    common = {"ui_url": ui, "ui_command": tracking.ui_command(uri), "tracking_uri": uri,
              "generated": pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M UTC")}
    pages = []
    for name in names:
        page = _ablation_page(name, uri, out, mlflow_ui_url, pinned.get(name))
        if page is None:
            continue
        templates.render("ablation.html", out / "ablations" / f"{name}.html", root="..", page=page, **common)
        pages.append(page)
    for stale in (out / "ablations").glob("*.html"):  # pages of ablations no longer in the store
        if stale.stem not in {p["name"] for p in pages}:
            stale.unlink()
            shutil.rmtree(out / "ablations" / stale.stem, ignore_errors=True)
    boards = [_board_view(b, mlflow_ui_url) for b in leaderboards(uri)]
    groups: list[dict[str, Any]] = []  # one leaderboard per (dataset, scale), a table per category set
    for b in boards:
        if not groups or (groups[-1]["dataset"], groups[-1]["scale"]) != (b["dataset"], b["scale"]):
            groups.append({"dataset": b["dataset"], "scale": b["scale"], "anchor": f"board-{b['dataset']}-{b['scale']}".replace(" ", "_"), "boards": []})
        groups[-1]["boards"].append(b)
    templates.render("leaderboard.html", out / "leaderboard.html", root=".", groups=groups, rules=LEADERBOARD_RULES, **common)
    index = out / "index.html"
    templates.render("index.html", index, root=".", pages=pages, boards=boards, **common)
    return index


# ------------------------------------------------------------------------------ the CLI

KEYS = ("ablation", "sweep", "tracking_uri", "out", "mlflow_ui_url")


def main(argv: list[str] | None = None) -> int:
    from orchestrator.config import parse_overrides
    from orchestrator.plan import check_tracking_uri, check_ui_url

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        values, method = parse_overrides(sys.argv[1:] if argv is None else argv)
        unknown = (set(values) | {f"method.{k}" for k in method}) - {*KEYS, "help"}
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(KEYS)}")
        if values.get("help"):
            print(__doc__)
            return 0
        check_tracking_uri(values.get("tracking_uri"), must_exist=True)  # a report never creates an empty store
        check_ui_url(values.get("mlflow_ui_url"))
        uri = tracking.resolve_uri(values.get("tracking_uri"))
        ablation = values.get("ablation")
        if ablation:
            spaces.load(ablation)  # unknown ablation -> ConfigError listing the valid ones
        pinned: dict[str, str] = {}
        if values.get("sweep"):
            sweep = str(values["sweep"])
            owner = tracking.sweep_experiment(uri, sweep)
            if owner is None:
                known = tracking.sweep_names(uri)
                raise ConfigError(f"no sweep named {sweep!r} in {uri}; sweeps: {', '.join(known[:20]) or 'none'}")
            if ablation and owner != ablation:
                raise ConfigError(f"sweep {sweep} belongs to ablation {owner}, not {ablation}; drop ablation= or pick another sweep")
            ablation, pinned = owner, {owner: sweep}
        names = [ablation] if ablation else ablations_in_store(uri)
        if not names:
            print(f"no ablation runs found in {uri}")
            return 0
        out = Path(values.get("out", "reports"))
        ui_url = values.get("mlflow_ui_url")
        for name in names:
            for path in write_reports(name, uri, out, sweep=pinned.get(name)):
                print(path)
        for path in write_leaderboard(uri, out, site=False):
            print(path)
        index = write_site(uri, out / "site", mlflow_ui_url=ui_url, pinned=pinned)
        print(f"site: {index}")
        print(f"review the runs: {tracking.ui_command(uri)}" + ("" if ui_url else "  (the site's links assume its default address)"))
        ids = tracking.experiment_ids(uri)
        for name in names:
            print(f"  {name}: {tracking.experiment_url(ui_url, ids[name])}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
