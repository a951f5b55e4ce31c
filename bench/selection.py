"""Does validation rank configurations as the test does? Measured so that it can fail.

    python -m bench.selection              # both axes, 5 training seeds (~1.5 h on 2 cores)
    python -m bench.selection --axis lambda

TransFusion at smoke scale on the embedded synthetic data (washer), two axes:

* ``lambda``: the inference-only λ (``disc_weight``) at 8 values, on one model per seed;
* ``steps``: the training axis T (``steps``) at 6 values, one model per (value, seed).

Each (configuration, training seed) is scored on the validation split (held-out normals +
the validation defect family no method trains on) and on the test split, for the four
metrics a space may select on. Training seeds 0-4; the data split is fixed (seed 0).

**The rule, written before any measurement**: a space selects on the validation metric
that best tells its configurations apart, judged on the two *development* seeds (0 and 1)
and validation only: for each metric, the spread of its development-seed means across
configurations (their standard deviation) divided by its seed noise (the mean over
configurations of the standard deviation over the two seeds); the largest ratio wins,
ties go to pixel AP. The test split is not looked at to choose.

**What is reported**, on the three *held-out* seeds (2, 3, 4) only, for the chosen metric
and, for reading, the three others: Kendall's τ-b between validation and test per seed,
τ pooled over (configuration, seed) pairs (pairs within a seed:
:func:`orchestrator.selection_stats.stratified_tau`), its one-sided permutation p-value (test
values shuffled within seeds, 10,000 times) and a 95 % interval from resampling
configurations within seeds, and the test regret of the validation-best configuration per
seed. Every configuration's validation and test values are written to
``bench/results/selection.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from orchestrator import selection_stats as stats
from orchestrator.config import resolve_method_config
from orchestrator.data import DataSpec
from orchestrator.training import build_model, calibrate_on_validation_normals, evaluate_split, fit, load_datas, training_data

RESULTS = Path(__file__).resolve().parent / "results" / "selection.json"
CATEGORY = "washer"
AXES = {"lambda": ("disc_weight", (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95)),  # 0.95: the paper's default
        "steps": ("steps", (2, 5, 10, 20, 35, 50))}  # 20: the paper's default
SEEDS = (0, 1, 2, 3, 4)
DEVELOPMENT, HELD_OUT = (0, 1), (2, 3, 4)
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")
DEVICE = torch.device("cpu")


def choose_metric(values: dict[str, dict[int, list[float]]]) -> tuple[str, dict[str, float]]:
    """The rule of the module docstring: ``values[metric][seed]`` = validation values over
    the configurations; returns the chosen metric and every metric's signal/noise ratio."""
    ratios = {}
    for metric in METRICS:
        dev = np.array([values[metric][seed] for seed in DEVELOPMENT])  # [seeds, configurations]
        signal = float(np.std(dev.mean(axis=0), ddof=1))
        noise = float(np.mean(np.std(dev, axis=0, ddof=1)))
        ratios[metric] = signal / noise if noise > 0 else (float("inf") if signal > 0 else 0.0)
    best = max(ratios.values())
    chosen = "pixel_ap" if ratios["pixel_ap"] == best else next(m for m in METRICS if ratios[m] == best)
    return chosen, ratios


def agreement(val: dict[int, list[float]], test: dict[int, list[float]]) -> dict:
    """τ per held-out seed, pooled τ with its p-value and interval, regret per seed."""
    v, t = [val[s] for s in HELD_OUT], [test[s] for s in HELD_OUT]
    interval = stats.stratified_tau_interval(v, t, seed=0)
    return {"tau_per_seed": {str(s): stats.kendall_tau_b(val[s], test[s]) for s in HELD_OUT},
            "tau_pooled": stats.stratified_tau(v, t),
            "p_value": stats.permutation_p_value(v, t, seed=0),
            "interval": list(interval) if interval else None,
            "regret_per_seed": {str(s): stats.regret_on_test(val[s], test[s], "max") for s in HELD_OUT}}


def score(model, data, seed: int) -> dict[str, dict[str, float]]:
    calibrate_on_validation_normals(model, data, 0, DEVICE)
    out = {}
    for split, (images, masks, labels) in {"val": (data.val_images, data.val_masks, data.val_labels),
                                           "test": (data.test_images, data.test_masks, data.test_labels)}.items():
        metrics = evaluate_split(model, images, masks, labels, 0, 16, seed, DEVICE).metrics
        out[split] = {m: float(getattr(metrics, m)) for m in METRICS}
    return out


def train(config, data, textures, seed: int):
    torch.manual_seed(seed)
    model = build_model("transfusion", config).to(DEVICE)
    fit(model, model.configure_optimizers(), training_data([data], textures), config, seed, DEVICE)
    return model


def measure(axis: str, data, textures) -> dict:
    field, values = AXES[axis]
    default = resolve_method_config("transfusion", "smoke")
    rows = []  # one per (configuration, seed)
    for seed in SEEDS:
        model = train(default, data, textures, seed) if axis == "lambda" else None
        for value in values:
            if axis == "lambda":
                variant = build_model("transfusion", replace(default, disc_weight=float(value))).to(DEVICE)
                variant.load_state_dict(model.state_dict())
            else:
                variant = train(resolve_method_config("transfusion", "smoke", {field: value}), data, textures, seed)
            rows.append({"value": value, "seed": seed, **score(variant, data, seed)})
            print(f"  {axis} {field}={value} seed {seed}: val " + " ".join(f"{m} {rows[-1]['val'][m]:.4f}" for m in METRICS)
                  + " | test " + " ".join(f"{m} {rows[-1]['test'][m]:.4f}" for m in METRICS), flush=True)

    def table(split: str, metric: str) -> dict[int, list[float]]:
        return {s: [r[split][metric] for r in rows if r["seed"] == s] for s in SEEDS}

    chosen, ratios = choose_metric({m: table("val", m) for m in METRICS})
    return {"field": field, "values": list(values), "rows": rows, "chosen": chosen, "signal_to_noise": ratios,
            "agreement": {m: agreement(table("val", m), table("test", m)) for m in METRICS}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--axis", choices=sorted(AXES), action="append", help="measure this axis only (repeatable)")
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    spec = DataSpec("synthetic", None, args.cache_dir, 0.2, 0)
    (data,) = load_datas(spec, [CATEGORY], resolve_method_config("transfusion", "smoke"))
    textures = spec.texture_bank(data.train_images.shape[-1])
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out.update({"bench": "selection", "method": "transfusion", "category": CATEGORY, "scale": "smoke", "seeds": list(SEEDS),
                "development_seeds": list(DEVELOPMENT), "held_out_seeds": list(HELD_OUT), "measured_on": time.strftime("%Y-%m-%d")})
    out.setdefault("axes", {})
    for axis in args.axis or sorted(AXES):
        result = measure(axis, data, textures)
        out["axes"][axis] = result
        a = result["agreement"][result["chosen"]]
        print(f"{axis}: the rule chose val_{result['chosen']} (signal/noise "
              + ", ".join(f"{m} {r:.2f}" for m, r in result["signal_to_noise"].items()) + ")")
        print("  held-out seeds: τ per seed " + ", ".join(f"{s}: {t:+.2f}" for s, t in a["tau_per_seed"].items())
              + f"; pooled {a['tau_pooled']:+.2f}, p = {a['p_value']:.4f}, 95 % interval {a['interval']}")
    out["seconds"] = round(time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"results: {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
