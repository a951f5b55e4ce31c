"""Generality beyond a method's own augmentation: image AUROC on the frozen ``generality`` set.

    python -m bench.generality                          # every method, 3 training seeds, smoke (hours on 2 cores)
    python -m bench.generality --methods mdps --seeds 1

The ``generality`` dataset (orchestrator/data/generality_set.py, v2) cuts brick, grass and
gravel crops from scikit-image's real photographs — training and test crops from disjoint
rows, and no photo in any bank a method trains on — and draws thread, void and tear
defects: kinds no method trains on and the validation split does not use.

Each method is measured once, under training seeds 0..N-1 with the data split fixed (seed
0), one model per category (one over all three for multi-class methods):

* **preset**: its ``scale`` preset as shipped (presets are never adjusted to this set);
* **chosen on validation**: each candidate of the method's ``selection_grid`` (methods/base.py;
  the preset first, then settings along the method's paper ablation axes; declared
  2026-12-07, before any measurement on v2) is scored by validation image AUROC (held-out normals + the validation defect family,
  never this set's test defects), mean over categories and seeds, on the same trained
  models where a candidate changes only inference fields; the best one (the preset on a
  tie) is the only other one evaluated on the test split.

Refuses to run unless the generated set matches ``FROZEN_DIGEST``. Results go to
``bench/results/generality.json`` method by method (a finished method is not run again,
so an interrupted run resumes); ``bench.tables`` renders the published table from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from methods import METHODS, get_method
from methods.base import config_fingerprint, training_fields
from orchestrator.config import resolve_method_config
from orchestrator.data import DataSpec, generality_set
from orchestrator.data.registry import get_adapter
from orchestrator.training import build_model, calibrate_on_validation_normals, evaluate_split, model_groups, train_local

BOUND = 0.75
RESULTS = Path(__file__).resolve().parent / "results" / "generality.json"


def candidates(method: str) -> list[dict]:
    """The method's ``selection_grid`` (methods/base.py), the preset ({}) first: inference
    fields along each paper's own ablation axes (their models are trained once per seed);
    PatchCore's feature choices too, since its "training" is one forward pass. The shipped
    methods' grids were declared 2026-12-07, before any measurement on the v2 set."""
    return [dict(candidate) for candidate in get_method(method).selection_grid]


def measure(method: str, seeds: int, scale: str, cache_dir: str) -> dict:
    """Train ``method``'s models per seed; score every candidate of its ``selection_grid`` on the
    validation split and the preset on the test split; then test the validation-best
    candidate (mean validation image AUROC over categories and seeds; the preset on a tie)."""
    cls = get_method(method)
    groups = model_groups(cls, generality_set.CATEGORIES)
    data = DataSpec("generality", None, cache_dir, 0.2, 0)
    device = torch.device("cpu")
    trained: dict[tuple, tuple] = {}  # (training fingerprint, seed, group) -> (state dict, datas)

    def models(candidate: dict, seed: int):
        """(category, position, calibrated model, its data) of every category under ``candidate``."""
        for group in groups:
            config = resolve_method_config(method, scale, cls.category_overrides(group), candidate)
            key = (config_fingerprint(training_fields(config)), seed, tuple(group))
            fresh = key not in trained
            if fresh:
                model, datas, _ = train_local(method, config, data, group, seed, device)
            else:
                state, datas = trained[key]
                model = build_model(method, config).to(device)
                model.load_state_dict(state)  # same training fields: only inference settings differ
            for position, d in enumerate(datas):
                calibrate_on_validation_normals(model, d, position, device)
                yield d.category, position, model, d
            if fresh:  # kept after its first evaluation, as the model store keeps it (PatchCore: with its coreset)
                trained[key] = (model.state_dict(), datas)

    def scores(candidate: dict, split: str) -> dict[str, list[float]]:
        """category -> image AUROC per seed on ``split`` (val | test)."""
        out: dict[str, list[float]] = {c: [] for c in generality_set.CATEGORIES}
        for seed in range(seeds):
            for category, position, model, d in models(candidate, seed):
                images, masks, labels = (getattr(d, f"{split}_{part}") for part in ("images", "masks", "labels"))
                out[category].append(float(evaluate_split(model, images, masks, labels, position, 16, seed, device).metrics.image_auroc))
        return out

    grid = candidates(method)
    val = []
    for index, candidate in enumerate(grid):
        val.append(scores(candidate, "val"))
        print(f"{method} candidate {index} {candidate or 'preset'}: validation image AUROC {mean_over_categories(val[-1]):.3f}", flush=True)
    means = [mean_over_categories(v) for v in val]
    best = int(np.argmax(means))  # argmax takes the first of equal values: the preset wins ties
    preset = scores(grid[0], "test")
    return {"method": method, "scale": scale, "digest": generality_set.FROZEN_DIGEST, "seeds": seeds, "candidates": grid,
            "val_image_auroc": val, "val_means": means, "selected": best, "preset_test_image_auroc": preset,
            "chosen_test_image_auroc": preset if best == 0 else scores(grid[best], "test")}


def mean_over_categories(per_category: dict[str, list[float]]) -> float:
    return float(np.mean([np.mean(v) for v in per_category.values()]))


def per_seed_means(per_category: dict[str, list[float]]) -> list[float]:
    """The mean over categories under each training seed."""
    return [float(np.mean(values)) for values in zip(*per_category.values())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1")
    parser.add_argument("--scale", default="smoke")
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    root = get_adapter("generality").resolve_root(None, args.cache_dir)
    found = generality_set.digest(root)
    if found != generality_set.FROZEN_DIGEST:
        sys.exit(f"the generality set in {root} is not the frozen one (digest {found[:12]}..., frozen {generality_set.FROZEN_DIGEST[:12]}...): "
                 "delete that folder to regenerate it, or bump VERSION and re-freeze after a deliberate change")
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if out.get("digest") != generality_set.FROZEN_DIGEST:
        out = {}
    out.update({"bench": "generality", "version": generality_set.VERSION, "digest": generality_set.FROZEN_DIGEST, "bound": BOUND,
                "categories": list(generality_set.CATEGORIES), "defects": list(generality_set.GENERALITY_DEFECTS)})
    out.setdefault("methods", {})
    for method in args.methods:
        done = out["methods"].get(method)
        if done and done["seeds"] == args.seeds and done["scale"] == args.scale and done["candidates"] == candidates(method):
            continue
        began = time.perf_counter()
        record = measure(method, args.seeds, args.scale, args.cache_dir)
        record.update(seconds=round(time.perf_counter() - began), measured_on=time.strftime("%Y-%m-%d"))
        fresh = json.loads(args.out.read_text()) if args.out.is_file() else out  # another process may have added a method
        fresh.setdefault("methods", {})[method] = record
        out = {**out, "methods": fresh["methods"]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        for which, label in (("preset", "preset"), ("chosen", f"chosen {record['candidates'][record['selected']] or 'preset'}")):
            values = per_seed_means(record[f"{which}_test_image_auroc"])
            print(f"{method} {label}: test image AUROC {np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f} "
                  f"({record['seconds']} s)", flush=True)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
