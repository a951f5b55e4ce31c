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

import logging
import sys
from pathlib import Path

from orchestrator import search_space as spaces
from orchestrator import tracking
from orchestrator.config import parse_overrides
from orchestrator.errors import ConfigError, UserError
from orchestrator.report.leaderboard import ablations_in_store
from orchestrator.report.site import write_leaderboard, write_site
from orchestrator.report.tables import write_reports


# ------------------------------------------------------------------------------ the CLI

KEYS = ("ablation", "sweep", "tracking_uri", "out", "mlflow_ui_url")


def main(argv: list[str] | None = None) -> int:
    from orchestrator.plan import check_tracking_uri, check_ui_url  # lazy: plan imports the methods and torch

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
