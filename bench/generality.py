"""Generality beyond a method's own augmentation: image AUROC on the frozen ``generality`` set.

    python -m bench.generality                       # every method, 3 training seeds, smoke
    python -m bench.generality --methods mdps --seeds 1

The ``generality`` dataset (orchestrator/data/generality.py) cuts brick, grass and gravel
crops from scikit-image's real photographs and draws glare, dent and mosaic defects: a
family no method trains on and the validation split does not use. Every method runs at its
``scale`` preset, unchanged (nothing here is tuned; presets are never adjusted to this
set), one model per category (one over all three for multi-class methods), under training
seeds 0..N-1 with the data split fixed (seed 0). Prints, per method, the test image AUROC
per category and its mean over categories as mean ± std over the training seeds, the
validation image AUROC beside it, and whether the mean clears the bound (0.75).

Refuses to run unless the generated set matches ``FROZEN_DIGEST``. Results are appended to
``--results`` (JSON) as each (method, seed) finishes, and finished ones are not re-run, so
an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from methods import METHODS
from orchestrator.data import generality
from orchestrator.data.registry import get_adapter
from orchestrator.training import run_local

BOUND = 0.75


def measure(method: str, train_seed: int, scale: str, cache_dir: str) -> dict:
    result = run_local(method, list(generality.CATEGORIES), scale=scale, dataset="generality", cache_dir=cache_dir,
                       seed=0, train_seed=train_seed)
    return {"method": method, "train_seed": train_seed, "scale": scale, "digest": generality.FROZEN_DIGEST,
            "test_image_auroc": {c: float(m.image_auroc) for c, m in result.test.items()},
            "val_image_auroc": {c: float(m.image_auroc) for c, m in result.val.items()},
            "test_aupro": {c: float(m.aupro) for c, m in result.test.items()},
            "train_seconds": result.train_seconds, "predict_seconds": result.predict_seconds}


def summary(runs: list[dict], methods: list[str]) -> list[str]:
    categories = list(generality.CATEGORIES)
    head = ["method", "seeds", *categories, "mean (test)", "mean (val)", f">= {BOUND}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        cells = []
        for c in categories:
            values = [r["test_image_auroc"][c] for r in mine]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}")
        means = [np.mean(list(r["test_image_auroc"].values())) for r in mine]
        val = [np.mean(list(r["val_image_auroc"].values())) for r in mine]
        spread = np.std(means, ddof=1) if len(means) > 1 else float("nan")
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells)
                     + f" | {np.mean(means):.3f} ± {spread:.3f} | {np.mean(val):.3f} | {'yes' if np.mean(means) >= BOUND else 'NO'} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1")
    parser.add_argument("--scale", default="smoke")
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--results", default=".cache/bench_generality.json", help="JSON file of finished runs (resumed)")
    args = parser.parse_args(argv)

    root = get_adapter("generality").resolve_root(None, args.cache_dir)
    found = generality.digest(root)
    if found != generality.FROZEN_DIGEST:
        sys.exit(f"the generality set in {root} is not the frozen one (digest {found[:12]}..., frozen {generality.FROZEN_DIGEST[:12]}...): "
                 "delete that folder to regenerate it, or bump VERSION and re-freeze after a deliberate change")
    path = Path(args.results)
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs = [r for r in runs if r["digest"] == generality.FROZEN_DIGEST and r["scale"] == args.scale]
    start = time.perf_counter()
    for method in args.methods:
        for seed in range(args.seeds):
            if any(r["method"] == method and r["train_seed"] == seed for r in runs):
                continue
            began = time.perf_counter()
            run = measure(method, seed, args.scale, args.cache_dir)
            runs.append(run)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(runs, indent=1))
            print(f"{method} seed {seed}: test image AUROC "
                  + ", ".join(f"{c} {v:.3f}" for c, v in run["test_image_auroc"].items())
                  + f" ({time.perf_counter() - began:.0f} s)", flush=True)
    chosen = [r for r in runs if r["method"] in args.methods and r["train_seed"] < args.seeds]
    print(f"\ngenerality set {generality.VERSION} ({', '.join(generality.CATEGORIES)}; defects {', '.join(generality.GENERALITY_DEFECTS)}), "
          f"scale={args.scale}, test image AUROC, mean ± std over training seeds:")
    print("\n".join(summary(chosen, args.methods)))
    print(f"\n{time.perf_counter() - start:.0f} s on this machine")


if __name__ == "__main__":
    main()
