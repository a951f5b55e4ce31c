"""Generality beyond a method's own augmentation: image AUROC on the frozen ``generality`` set.

    python -m bench.generality                       # every method, 3 training seeds, smoke
    python -m bench.generality --methods mdps --seeds 1
    python -m bench.generality --select              # settings chosen on validation (GRIDS)

The ``generality`` dataset (orchestrator/data/generality.py) cuts brick, grass and gravel
crops from scikit-image's real photographs and draws glare, dent and mosaic defects: a
family no method trains on and the validation split does not use. Without ``--select``
every method runs at its ``scale`` preset, unchanged (presets are never adjusted to this
set), one model per category (one over all three for multi-class methods), under training
seeds 0..N-1 with the data split fixed (seed 0). Prints, per method, the test image AUROC
per category and its mean over categories as mean ± std over the training seeds, the
validation image AUROC beside it, and whether the mean clears the bound (0.75).

``--select`` tunes on validation only: each method's candidates in ``GRIDS`` (its preset
first, then settings along its paper's ablation axes; declared before any selection ran)
are scored by validation image AUROC, mean over categories and training seeds, on the
same trained models where a candidate changes only inference fields; the best one (the
preset on a tie) is the only one evaluated on the test split.

Refuses to run unless the generated set matches ``FROZEN_DIGEST``. Results are appended to
``--results`` (JSON) as each (method, seed) finishes (with ``--select``: each method), and
finished ones are not re-run, so an interrupted run resumes.
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
from orchestrator.data import DataSpec, generality
from orchestrator.data.registry import get_adapter
from orchestrator.training import build_model, calibrate_on_validation_normals, evaluate_split, model_groups, run_local, train_local

BOUND = 0.75

# Candidates of --select, the preset ({}) first. Inference fields along each paper's own
# ablation axes (their models are trained once per seed); PatchCore's feature choices too,
# since its "training" is one forward pass. Declared before any selection was run.
GRIDS: dict[str, list[dict]] = {
    "transfusion": [{}, {"final_mask": "disc"}, {"final_mask": "recon"}, {"disc_weight": 0.5}, {"filter_size": 7}],
    "diffusionad": [{}, {"paradigm": "one_step"}, {"top_k": 10}, {"top_k": 200}, {"t_s": 100, "t_b": 200}],
    "mdps": [{}, {"metric": "perceptual"}, {"metric": "pixel"}, {"use_mask": False}, {"blur_sigma": 4.0}],
    "drdc": [{}, {"gamma": 0.9}, {"gamma": 1.0}, {"fusion": "temporal"}, {"score_pool_size": 9}],
    "patchcore": [{}, {"feature_strides": [4, 8]}, {"patch_size": 5}, {"image_score": "reweighted"}, {"blur_sigma": 4.0},
                  {"image_size": 256}],
}


def measure(method: str, train_seed: int, scale: str, cache_dir: str) -> dict:
    result = run_local(method, list(generality.CATEGORIES), scale=scale, dataset="generality", cache_dir=cache_dir,
                       seed=0, train_seed=train_seed)
    return {"method": method, "train_seed": train_seed, "scale": scale, "digest": generality.FROZEN_DIGEST,
            "test_image_auroc": {c: float(m.image_auroc) for c, m in result.test.items()},
            "val_image_auroc": {c: float(m.image_auroc) for c, m in result.val.items()},
            "test_aupro": {c: float(m.aupro) for c, m in result.test.items()},
            "train_seconds": result.train_seconds, "predict_seconds": result.predict_seconds}


def select(method: str, seeds: int, scale: str, cache_dir: str) -> dict:
    """Score every candidate of ``GRIDS[method]`` on the validation split under training
    seeds 0..seeds-1, then evaluate only the best one (mean validation image AUROC over
    categories and seeds; the earlier candidate on a tie) on the test split."""
    cls = get_method(method)
    groups = model_groups(cls, generality.CATEGORIES)
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

    val: list[dict[str, list[float]]] = []
    means: list[float] = []
    for index, candidate in enumerate(GRIDS[method]):
        scores: dict[str, list[float]] = {c: [] for c in generality.CATEGORIES}
        for seed in range(seeds):
            for category, position, model, d in models(candidate, seed):
                result = evaluate_split(model, d.val_images, d.val_masks, d.val_labels, position, 16, seed, device)
                scores[category].append(float(result.metrics.image_auroc))
        val.append(scores)
        means.append(float(np.mean([np.mean(v) for v in scores.values()])))
        print(f"{method} candidate {index} {candidate or 'preset'}: validation image AUROC {means[-1]:.3f}", flush=True)
    best = int(np.argmax(means))  # argmax takes the first of equal values: the preset wins ties
    test: dict[str, dict[str, float]] = {}
    for seed in range(seeds):
        test[str(seed)] = {}
        for category, position, model, d in models(GRIDS[method][best], seed):
            result = evaluate_split(model, d.test_images, d.test_masks, d.test_labels, position, 16, seed, device)
            test[str(seed)][category] = float(result.metrics.image_auroc)
    return {"method": method, "scale": scale, "digest": generality.FROZEN_DIGEST, "seeds": seeds, "candidates": GRIDS[method],
            "val_image_auroc": val, "val_means": means, "selected": best, "test_image_auroc": test}


def selected_runs(record: dict) -> list[dict]:
    """The selected candidate's results in the shape ``summary`` reads (one run per seed)."""
    best = record["selected"]
    return [{"method": record["method"], "test_image_auroc": categories,
             "val_image_auroc": {c: v[int(seed)] for c, v in record["val_image_auroc"][best].items()}}
            for seed, categories in record["test_image_auroc"].items()]


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
    parser.add_argument("--results", default=None, help="JSON file of finished runs, resumed (default .cache/bench_generality[_select].json)")
    parser.add_argument("--select", action="store_true", help="choose each method's setting among GRIDS on validation, then test it")
    args = parser.parse_args(argv)
    args.results = args.results or f".cache/bench_generality{'_select' if args.select else ''}.json"

    root = get_adapter("generality").resolve_root(None, args.cache_dir)
    found = generality.digest(root)
    if found != generality.FROZEN_DIGEST:
        sys.exit(f"the generality set in {root} is not the frozen one (digest {found[:12]}..., frozen {generality.FROZEN_DIGEST[:12]}...): "
                 "delete that folder to regenerate it, or bump VERSION and re-freeze after a deliberate change")
    path = Path(args.results)
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs = [r for r in runs if r["digest"] == generality.FROZEN_DIGEST and r["scale"] == args.scale]
    start = time.perf_counter()
    if args.select:
        select_all(args, runs, path)
        print(f"\n{time.perf_counter() - start:.0f} s on this machine")
        return
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


def select_all(args: argparse.Namespace, records: list[dict], path: Path) -> None:
    def current(r: dict) -> bool:  # a record of this seed count and of today's grid
        return r["seeds"] == args.seeds and r["candidates"] == GRIDS[r["method"]]

    for method in args.methods:
        if any(r["method"] == method and current(r) for r in records):
            continue
        records.append(select(method, args.seeds, args.scale, args.cache_dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1))
    chosen = [r for r in records if r["method"] in args.methods and current(r)]
    print(f"\ngenerality set {generality.VERSION}, scale={args.scale}, settings chosen on validation (GRIDS), test image AUROC of the chosen one:")
    print("| method | chosen on validation | validation: preset -> chosen |")
    print("|---|---|---|")
    for r in chosen:
        best = r["selected"]
        print(f"| {r['method']} | {r['candidates'][best] or 'preset'} | {r['val_means'][0]:.3f} -> {r['val_means'][best]:.3f} |")
    print()
    print("\n".join(summary([run for r in chosen for run in selected_runs(r)], args.methods)))


if __name__ == "__main__":
    main()
