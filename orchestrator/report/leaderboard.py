"""Leaderboards: per dataset, scale and category set, each method's default configuration
from the newest sweep that ran it, ranked by Det. when complete and without overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from orchestrator import search_space as spaces
from orchestrator import tracking
from orchestrator.report.paper import paper_value
from orchestrator.report.rows import default_rows, row_stats
from orchestrator.report.sweeps import PAPER_METRICS, Identity, Sweep, _text, all_sweeps, dataset_title
from orchestrator.report.tables import _fmt, _fmt_paper


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


def ablations_in_store(uri: str) -> list[str]:
    names = tracking.experiment_names(uri)
    return [n for n in spaces.available() if n in names]
