"""Ablation tables, leaderboards and the HTML report site, regenerated from MLflow
(``python -m orchestrator.report``; usage and what a table shows: cli.py's docstring).
One module per layer, each importing only the ones before it: sweeps.py (the metrics a
table shows and the sweeps read back from MLflow), rows.py (a sweep's table rows combined
over seeds, seed noise, selection-vs-test agreement, Pareto fronts), paper.py (the paper's
numbers), plots.py (the ablation plot), tables.py (the Table-4-style tables and the report
files), leaderboard.py (the leaderboards), site.py (the static HTML site and
:func:`write_leaderboard`, run at the end of every sweep), cli.py (the command line;
__main__.py runs it). Below: the names the sweep and the tests use."""

from orchestrator.report.cli import main
from orchestrator.report.leaderboard import leaderboards
from orchestrator.report.paper import paper_value
from orchestrator.report.rows import agreement, agreement_lines, combine, shown_metrics
from orchestrator.report.site import _comparison_table, reproduce_command, write_leaderboard, write_site
from orchestrator.report.sweeps import all_sweeps, select
from orchestrator.report.tables import _flags, build_table, write_reports

__all__ = ["main", "leaderboards", "paper_value", "agreement", "agreement_lines", "combine", "shown_metrics",
           "_comparison_table", "reproduce_command", "write_leaderboard", "write_site", "all_sweeps", "select",
           "_flags", "build_table", "write_reports"]
