"""What every registered method costs at ``scale=paper`` on this machine's CPU.

    python -m bench.paper_scale                          # every method in methods.METHODS
    python -m bench.paper_scale --methods patchcore,mdps

Per method, one row: the backbone it uses (and what it stands in for), its parameter count
(total, and trainable) beside the paper's, and the seconds and peak memory of

* one training step at batch 1 on one paper-resolution image: ``orchestrator.training.
  train_epoch`` over a one-image training set (forward, backward, optimiser step; for a
  training-free method the gradient-free forward the training loop runs), after one
  untimed warm-up step (so the optimiser state already exists);
* one inference on one paper-resolution image with the fewest sampling steps/samples the
  config allows (the method's ``minimal_sampling(config)``, methods/base.py; bench.gpu
  ``--fast`` uses the same): ``orchestrator.training.predict_split`` at batch 1,
  the model's first call (as in an evaluation; a sampler's second call would double the
  run time, and one-time costs are small against its forward passes on CPU).

Configs are resolved as a sweep resolves them (``orchestrator.config.resolve_method_config``
with the method's ``category_overrides``), models built by ``orchestrator.training.
build_model`` with the orchestrator's backbone loader; images are random (cost does not
depend on them). Each measurement runs in a fresh subprocess, so one method's allocations
do not shape the next one's numbers.

Peak memory: the growth of the process's resident set during the timed call, i.e. the
peak RSS over the call (``VmHWM`` in /proc/self/status, reset just before the call by
writing 5 to /proc/self/clear_refs) minus the RSS just before it. Weights, backbone and
optimiser state are already resident and not counted; activations, gradients and the
allocator's new pages are. Where /proc cannot be reset it falls back to
``resource.getrusage`` maxrss minus the RSS before (an upper bound) and says so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from methods import METHODS, get_method
from methods.backbones import BACKBONES
from orchestrator.config import resolve_method_config
from orchestrator.errors import UserError
from orchestrator.training import TrainingData, build_model, default_backbone_factory, predict_split, train_epoch

OFFLINE_BACKBONE = "efficientnet_lite0"

# Per-method facts are read from the method class (methods/base.py): ``paper_backbone``,
# ``paper_parameters`` and ``minimal_sampling``.


# ----------------------------------------------------------------------------- building


@dataclass
class Built:
    model: nn.Module
    config: Any
    backbone: str  # the backbone column's text
    inference: str  # the inference settings used
    backbones: list[nn.Module]  # what the factory built (some methods keep it out of the module tree)


def backbone_choice(method: str, config: Any) -> tuple[dict[str, Any], str]:
    """(config override, column text): the paper's backbone (the method's
    ``paper_backbone``, else the config's) where it can be loaded here, else the offline
    EfficientNet-Lite0 with the reason."""
    if not hasattr(config, "backbone"):
        return {}, "none"
    wanted = get_method(method).paper_backbone or config.backbone
    if wanted == OFFLINE_BACKBONE:
        return {"backbone": wanted}, wanted
    reasons = []
    if importlib.util.find_spec("torchvision") is None:
        reasons.append("torchvision not installed")
    if wanted not in BACKBONES:
        reasons.append("no such extractor in methods/backbones.py")
    if not reasons:
        try:
            from orchestrator.pretrained import backbone_file

            backbone_file(wanted)
        except UserError as exc:
            reasons.append(str(exc))
    if reasons:
        return {"backbone": OFFLINE_BACKBONE}, f"{OFFLINE_BACKBONE}, stands in for {wanted}: {'; '.join(reasons)}"
    return {"backbone": wanted}, wanted


def build(method: str) -> Built:
    """The method at ``scale=paper`` as a one-category sweep resolves it, with the backbone
    of :func:`backbone_choice` and the minimal sampling settings."""
    category = get_method(method).category_overrides(["bench"])
    paper = resolve_method_config(method, "paper", category)
    backbone, backbone_text = backbone_choice(method, paper)
    sampling = get_method(method).minimal_sampling(paper)
    config = resolve_method_config(method, "paper", category, backbone, sampling)
    built: list[nn.Module] = []

    def factory(name: str) -> nn.Module:
        extractor = default_backbone_factory(name)
        built.append(extractor)
        return extractor

    torch.manual_seed(0)
    model = build_model(method, config, factory)
    inference = ", ".join(f"{k}={v}" for k, v in sampling.items()) or "defaults (nothing to reduce)"
    return Built(model, config, backbone_text, inference, built)


def parameter_counts(built: Built) -> tuple[int, int]:
    """(total, trainable): the model's parameters and those of any backbone it holds
    outside its module tree, each counted once."""
    seen: dict[int, nn.Parameter] = {}
    for module in [built.model, *built.backbones]:
        for p in module.parameters():
            seen[id(p)] = p
    return sum(p.numel() for p in seen.values()), sum(p.numel() for p in seen.values() if p.requires_grad)


def one_image(config: Any, seed: int) -> np.ndarray:
    """A random uint8 image at the config's input size, [1, 3, S, S] (what the cache holds)."""
    size = config.input_size
    return np.random.default_rng(seed).integers(0, 256, (1, 3, size, size), dtype=np.uint8)


def one_image_training_set(config: Any) -> TrainingData:
    image = torch.from_numpy(one_image(config, seed=1))
    size = config.input_size
    return TrainingData(images=image, foreground=torch.ones(1, 1, size, size, dtype=torch.uint8), category=torch.zeros(1, dtype=torch.long),
                        textures=torch.from_numpy(one_image(config, seed=2)).float() / 127.5 - 1)


def training_step(built: Built) -> Callable[[], None]:
    """One step of the orchestrator's training loop at batch 1 on one image."""
    data = one_image_training_set(built.config)
    optimizers = built.model.configure_optimizers()
    device = torch.device("cpu")
    return lambda: train_epoch(built.model, optimizers, data, 1, 0, 0, device)


def inference_call(built: Built) -> Callable[[], None]:
    """One batch-1 ``predict`` through the orchestrator's evaluation path. Untimed set-up:
    a training-free method first runs its training step once (its memory bank needs an
    image); every method is calibrated on one normal image, as evaluations calibrate on
    the validation normals before predicting."""
    if built.model.configure_optimizers() is None:
        with torch.no_grad():
            training_step(built)()
    normals = torch.from_numpy(one_image(built.config, seed=4)).float() / 127.5 - 1
    built.model.calibrate(normals, torch.zeros(1, dtype=torch.long))
    image = one_image(built.config, seed=3)
    return lambda: predict_split(built.model, image, 0, 1, 0, torch.device("cpu"))


# ---------------------------------------------------------------------------- measuring


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def measure_call(call: Callable[[], None], warmup: bool) -> dict[str, Any]:
    """Seconds and peak RSS growth (MiB) of one call, after one untimed warm-up call if asked."""
    if warmup:
        call()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        how = "VmHWM"
    except OSError:
        how = "ru_maxrss (upper bound)"
    # Read after the reset: memory freed in between would otherwise count against the call.
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    if how == "VmHWM":
        peak = _status_kib("VmHWM")
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "rss_before_mib": before / 1024, "peak_increase_mib": max(0, peak - before) / 1024, "memory_measure": how}


def measure(method: str, phase: str) -> dict[str, Any]:
    """One measurement in this process: ``phase`` is train or infer."""
    built = build(method)
    total, trainable = parameter_counts(built)
    row: dict[str, Any] = {"method": method, "backbone": built.backbone, "size": built.config.input_size, "parameters": total,
                           "trainable": trainable, "inference": built.inference}
    # Training: after a warm-up step, so the optimiser state exists (a long training's
    # steady state). Inference: the first call, as an evaluation makes it; on CPU the
    # one-time costs are small against a forward pass, and a sampler's second call would
    # double the bench's run time.
    if phase == "train":
        result = measure_call(training_step(built), warmup=True)
    else:
        result = measure_call(inference_call(built), warmup=False)
    row.update({f"{phase}_{k}": v for k, v in result.items()})
    return row


def measure_in_subprocess(method: str, phase: str, timeout_s: float) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter (its own peak RSS), as a dict; an error or a
    timeout becomes ``{"error": ...}``."""
    command = [sys.executable, "-m", "bench.paper_scale", "--measure", method, "--phase", phase]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"{phase}: over {timeout_s:.0f} s"}
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": method, "error": f"{phase}: {tail[:200]}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- reporting

COLUMNS = ("method", "backbone", "input", "parameters (trainable)", "paper states", "train step s", "train peak +MiB",
           "inference settings", "inference s", "inference peak +MiB")


def _millions(n: int | None) -> str:
    return "?" if n is None else "0" if n == 0 else f"{n / 1e6:.1f} M"


def table_row(method: str, train: dict[str, Any], infer: dict[str, Any]) -> list[str]:
    any_row = train if "parameters" in train else infer

    def number(row: dict[str, Any], key: str, digits: int) -> str:
        return f"{row[key]:.{digits}f}" if key in row else "error"

    return [
        method,
        any_row.get("backbone", "?"),
        f"{any_row['size']}²" if "size" in any_row else "?",
        f"{_millions(any_row.get('parameters'))} ({_millions(any_row.get('trainable'))})",
        get_method(method).paper_parameters,
        number(train, "train_seconds", 2),
        number(train, "train_peak_increase_mib", 0),
        any_row.get("inference", "?"),
        number(infer, "infer_seconds", 2),
        number(infer, "infer_peak_increase_mib", 0),
    ]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names (default: every registered method)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement subprocess")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, printed as JSON
    parser.add_argument("--phase", choices=("train", "infer"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.phase)))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    print(f"# paper scale on CPU — {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f} at the start")
    print("# peak +MiB: growth of the resident set over the timed call (VmHWM reset before it, minus the RSS before):")
    print("#   weights, backbone and optimiser state are already resident. Batch 1; a training step after one untimed")
    print("#   warm-up step, an inference as the first call (one-time costs included).")
    rows = []
    for method in methods:
        train = measure_in_subprocess(method, "train", args.timeout)
        print(f"# {method} train: {json.dumps(train)}", flush=True)  # kept if a later measurement is cut short
        infer = measure_in_subprocess(method, "infer", args.timeout)
        print(f"# {method} infer: {json.dumps(infer)}", flush=True)
        rows.append(table_row(method, train, infer))
        for phase, result in (("train", train), ("infer", infer)):
            if "error" in result:
                print(f"# {method}: {result['error']}")
            elif result[f"{phase}_memory_measure"] != "VmHWM":
                print(f"# {method} {phase}: memory from {result[f'{phase}_memory_measure']}")
        print(markdown([rows[-1]]).splitlines()[-1], flush=True)  # progress: each row as it is measured
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
