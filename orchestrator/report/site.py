"""The static HTML site (:func:`write_site`; templates in orchestrator/site): an index, a
page per ablation, the leaderboards; and :func:`write_leaderboard`, which a sweep runs at its
end (``leaderboard.{md,csv}`` plus the site)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import search_space as spaces
from orchestrator import tracking
from orchestrator.config import Settings, config_to_dict, flatten, param_text
from orchestrator.report.leaderboard import LEADERBOARD_RULES, Board, _board_frame, ablations_in_store, leaderboard, leaderboards
from orchestrator.report.paper import paper_datasets, paper_value
from orchestrator.report.plots import _plot
from orchestrator.report.rows import (Combined, agreement, combine, default_label, noise_mark, order_rows, pareto, row_labels,
                                      seeds_of, shown_metrics)
from orchestrator.report.sweeps import PAPER_METRICS, Selection, Sweep, _text, all_sweeps, dataset_title, select
from orchestrator.report.tables import _flags, _fmt, _fmt_paper, _fmt_pm, _markdown, build_table

log = logging.getLogger(__package__)  # the report's one logger, as before the split into modules

SETTINGS_NOT_IN_COMMAND = {"tracking_uri", "storage_path", "data.cache_dir", "resume", "retrain", "help", "ablation", "method"}
# Settings a search space supplies (plan.settings_for): always spelled out, so the command
# reruns the same data and resources even if the space's defaults change.
SETTINGS_ALWAYS_IN_COMMAND = {"dataset", "scale", "trial.cpus", "trial.gpus", "trial.workers"}
MAPS_PER_ROW = 4  # sample anomaly maps shown per table row on the site
MAPS_PER_TRIAL = 2


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
    from orchestrator import site as templates  # lazy: jinja2, only writing the site needs it

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
