"""Does validation rank configurations as the test does? Kendall's τ before and after the
validation split's own defect family.

    python -m bench.selection            # λ grid (one training) and steps x 3 seeds (12 trainings)
    python -m bench.selection --quick    # the λ grid only
    python -m bench.selection --steps    # the steps x 3 seeds part only

On the embedded synthetic data (washer, smoke scale), TransFusion:

* a fixed 12-point grid of ``transfusion_lambda``'s λ (``disc_weight``, inference-only:
  one model, twelve evaluations);
* ``transfusion_steps``' four rows under 3 training seeds (τ over the seed means).

Each configuration is scored on three splits: the test split, the shipped validation split
(held-out normals + ``orchestrator/data/validation_defects.py``) and the validation split
as it was before (the same held-out normals + TransFusion's own training synthesis,
``methods/anomaly_synthesis.py``), for each metric a space may select on (image AUROC,
pixel AUROC, AUPRO, pixel AP). Prints τ-b with its bootstrap interval, the test regret of
the validation-best row, the validation spread across rows and whether it is saturated
(below the seed noise with seeds, else below 0.5 point). Measures; tunes nothing.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from methods.anomaly_synthesis import synthesize_nonempty_anomalies
from orchestrator import selection as stats
from orchestrator.config import resolve_method_config
from orchestrator.data import CategoryData, DataSpec
from orchestrator.data.images import to_unit_range
from orchestrator.training import (build_model, calibrate_on_validation_normals, evaluate_split, fit, load_datas,
                                   training_data)

CATEGORY = "washer"
LAMBDAS = tuple(np.round(np.linspace(0.0, 1.0, 12), 3))
STEPS = (5, 10, 20, 50)
SEEDS = (0, 1, 2)
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")
DEVICE = torch.device("cpu")


def training_family_split(data: CategoryData, textures: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The validation split as it was built before: each held-out normal and a copy with an
    anomaly drawn by the training synthesis (texture pool, whole image as foreground)."""
    normals = data.val_images[data.val_labels == 0]
    images = to_unit_range(np.ascontiguousarray(normals))
    generator = torch.Generator().manual_seed(seed)
    made = synthesize_nonempty_anomalies(images, textures, torch.ones_like(images[:, :1]), generator,
                                         min_pixels=16, max_rounds=100, texture_pool=True)
    anomalous = ((made.images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    masks = made.masks[:, 0].numpy().astype(np.uint8)
    n = len(normals)
    return (np.concatenate([normals, anomalous]), np.concatenate([np.zeros_like(masks), masks]),
            np.array([0] * n + [1] * n, np.int64))


def train(config, data: CategoryData, textures: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    model = build_model("transfusion", config).to(DEVICE)
    fit(model, model.configure_optimizers(), training_data([data], textures), config, seed, DEVICE)
    return model


def scores(model, data: CategoryData, before: tuple, seed: int) -> dict[str, dict[str, float]]:
    """split -> metric -> value for one configuration."""
    calibrate_on_validation_normals(model, data, 0, DEVICE)
    splits = {"test": (data.test_images, data.test_masks, data.test_labels),
              "val (new family)": (data.val_images, data.val_masks, data.val_labels), "val (training family)": before}
    out = {}
    for name, (images, masks, labels) in splits.items():
        metrics = evaluate_split(model, images, masks, labels, 0, 16, seed, DEVICE).metrics
        out[name] = {m: float(getattr(metrics, m)) for m in METRICS}
    return out


def report(title: str, rows: list[str], results: list[dict[str, dict[str, float]]],
           seed_stds: list[dict[str, dict[str, float]]] | None = None) -> None:
    """``seed_stds``: per row, split -> metric -> std over training seeds (saturation is then
    judged against the seed noise)."""
    print(f"\n{title}")
    for metric in METRICS:
        test = [r["test"][metric] for r in results]
        for split in ("val (training family)", "val (new family)"):
            val = [r[split][metric] for r in results]
            tau = stats.kendall_tau_b(val, test)
            interval = stats.bootstrap_tau_interval(val, test, seed=0)
            ci = f"[{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else "n/a"
            noise = [sd[split][metric] for sd in seed_stds] if seed_stds else None
            saturated = " SATURATED" if stats.is_saturated(val, noise) else ""
            if noise:
                saturated += f" (seed noise {100 * float(np.mean(noise)):.1f} pt)"
            print(f"  {metric:12s} {split:22s} τ = {tau:+.2f} {ci:16s} regret {100 * stats.regret_on_test(val, test, 'max'):.1f} pt "
                  f"(val spread {100 * (max(val) - min(val)):.1f} pt){saturated}")
    print("  rows: " + "; ".join(f"{row}: test {r['test']['image_auroc']:.3f} / val {r['val (new family)']['image_auroc']:.3f}"
                                 f" / old val {r['val (training family)']['image_auroc']:.3f}" for row, r in zip(rows, results)))


def mean_results(runs: list[dict[str, dict[str, float]]], reduce=np.mean) -> dict[str, dict[str, float]]:
    return {split: {m: float(reduce([r[split][m] for r in runs])) for m in METRICS} for split in runs[0]}


def std_results(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return mean_results(runs, lambda values: np.std(values, ddof=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the λ grid only (one training)")
    parser.add_argument("--steps", action="store_true", help="the steps x seeds part only")
    parser.add_argument("--cache-dir", default=".cache")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    default = resolve_method_config("transfusion", "smoke")
    spec = DataSpec("synthetic", None, args.cache_dir, 0.2, 0)
    (data,) = load_datas(spec, [CATEGORY], default)
    textures = spec.texture_bank(data.train_images.shape[-1])
    before = training_family_split(data, textures, seed=0)

    if not args.steps:
        model = train(default, data, textures, seed=0)
        state = model.state_dict()
        results = []
        for lam in LAMBDAS:
            variant = build_model("transfusion", replace(default, disc_weight=float(lam))).to(DEVICE)
            variant.load_state_dict(state)
            results.append(scores(variant, data, before, seed=0))
        report(f"transfusion_lambda: {len(LAMBDAS)}-point grid of λ (disc_weight), one model, {CATEGORY}", [f"λ={x}" for x in LAMBDAS], results)

    if not args.quick:
        rows, noise = [], []
        for steps in STEPS:
            config = resolve_method_config("transfusion", "smoke", {"steps": steps})
            runs = []
            for seed in SEEDS:
                runs.append(scores(train(config, data, textures, seed), data, before, seed))
                print(f"  steps={steps} seed {seed}: " + "; ".join(f"{split} " + " ".join(f"{m} {v:.4f}" for m, v in values.items())
                                                            for split, values in runs[-1].items()), flush=True)
            rows.append(mean_results(runs))
            noise.append(std_results(runs))
        report(f"transfusion_steps: {len(STEPS)} rows x {len(SEEDS)} training seeds (seed means), {CATEGORY}",
               [f"steps={s}" for s in STEPS], rows, noise)
    print(f"\n{time.perf_counter() - start:.0f} s on this machine")


if __name__ == "__main__":
    main()
