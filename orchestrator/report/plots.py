"""The ablation plot: each metric along the axis, and detection vs throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from orchestrator import search_space as spaces
from orchestrator.report.rows import combine
from orchestrator.report.sweeps import Selection, dataset_title


def _plot(space: spaces.SearchSpace, selections: list[Selection], path: Path, default: str | None) -> None:
    import matplotlib  # lazy: only drawing a plot needs it (heavy to import)

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
