"""The report's vocabulary (the metrics a table shows, dataset titles, renamed params) and
the sweeps read back from MLflow (through orchestrator/tracking.py): every sweep of an
ablation with its trials, and per dataset the sweeps its table is built from (:func:`select`;
which ones: see the "Which sweeps a table shows" paragraph of orchestrator/report/cli.py,
the text ``python -m orchestrator.report help=true`` prints)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import pandas as pd

from methods import METHODS, get_method
from orchestrator import tracking
from orchestrator.errors import ConfigError
from orchestrator.results import metric_name

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
    """``runs`` with old param columns folded into today's names: PARAM_ALIASES for every
    method, then each method's own ``renamed_fields`` on its rows only (a name one method
    retired may be current in another: DRDC's num_heads, DiffusionAD's num_heads)."""
    for old, new in PARAM_ALIASES.items():
        if old in runs:
            runs[new] = runs[new].fillna(runs[old]) if new in runs else runs[old]
            runs = runs.drop(columns=old)
    for method in runs["params.method"].dropna().unique() if "params.method" in runs else ():
        rows = runs["params.method"] == method
        for old, new in (get_method(method).renamed_fields.items() if method in METHODS else ()):
            old, new = f"params.method.{old}", f"params.method.{new}"
            if old in runs:
                current = runs[new] if new in runs else pd.Series(None, index=runs.index, dtype=object)
                runs[new] = current.where(~rows | current.notna(), runs[old])
                runs[old] = runs[old].where(~rows)
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
