"""MDPS inference cost: per-image time vs N_s and N, and peak memory of N_s samples
drawn batched vs one at a time.

    python -m bench.mdps_sampling                      # smoke model, 64 px, CPU
    python -m bench.mdps_sampling --scale paper --device cuda --batch 8

Every number comes from this run: times are the best wall-clock seconds per image of a full
``predict`` (the m ≡ 1 mask pass with ``mask_num_samples`` samples, then the masked pass
with N_s samples, N guided DDIM steps each, plus the perceptual backbone), and ratios
are to the first row. The weights are untrained: cost does not depend on them. Peak
memory is CUDA's allocator peak on a GPU; on CPU each case runs in a fresh process whose
resident set is sampled every millisecond during ``predict`` (growth over the start).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time
from typing import Any

import torch

from methods.mdps import MDPS
from orchestrator.config import resolve_method_config
from orchestrator.pretrained import load_backbone


def build(scale: str, overrides: dict[str, Any], device: torch.device) -> MDPS:
    torch.manual_seed(0)
    config = resolve_method_config("mdps", scale, overrides)
    model = MDPS(config, load_backbone).to(device).eval()
    # η and the Eq. 20 statistics (calibrated on validation normals in a sweep): random
    # images stand in, timing is what is measured here.
    size = config.input_size
    model.calibrate(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)).mul(2).sub(1).to(device), None)
    return model


def network_evaluations(config: Any) -> int:
    """Guided ε_θ evaluations (forward + input gradient) per image: N per posterior sample,
    over the mask pass and the masked pass."""
    mask_pass = (config.mask_num_samples or config.num_samples) if config.use_mask else 0
    return (mask_pass + config.num_samples) * config.steps


def images_for(model: MDPS, batch: int, device: torch.device) -> torch.Tensor:
    size = model.config.input_size
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).mul(2).sub(1).to(device)


def seconds_per_image(model: MDPS, images: torch.Tensor, repeats: int) -> float:
    generator = torch.Generator(device=images.device).manual_seed(0)
    model.predict(images[:1], generator=generator)  # warm-up (allocator, backbone)
    best = float("inf")
    for _ in range(repeats):
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        start = time.perf_counter()
        model.predict(images, generator=generator)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        best = min(best, time.perf_counter() - start)
    return best / images.shape[0]


def peak_mebibytes(scale: str, overrides: dict[str, Any], batch: int, device: str) -> float:
    """Peak memory growth of one ``predict`` call (MiB)."""
    dev = torch.device(device)
    model = build(scale, overrides, dev)
    images = images_for(model, batch, dev)
    generator = torch.Generator(device=dev).manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        model.predict(images, generator=generator)
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    before = resident_bytes()
    peak = before
    done = threading.Event()

    def poll() -> None:  # torch kernels release the GIL, so this samples during predict
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes())
            time.sleep(0.001)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        model.predict(images, generator=generator)
    finally:
        done.set()
        watcher.join()
    return (peak - before) / 2**20


def resident_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_in_child(queue: Any, *args: Any) -> None:
    queue.put(peak_mebibytes(*args))


def isolated_peak(scale: str, overrides: dict[str, Any], batch: int, device: str) -> float:
    """On CPU each case gets a fresh process: memory freed by an earlier case stays mapped."""
    if device.startswith("cuda"):
        return peak_mebibytes(scale, overrides, batch, device)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_in_child, args=(queue, scale, overrides, batch, device))
    child.start()
    value = queue.get()
    child.join()
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="smoke", choices=("smoke", "paper"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2, help="images per predict call")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="N_s values")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10], help="N values")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per cell (best is kept)")
    parser.add_argument("--memory-samples", type=int, default=16, help="N_s of the batched-vs-sequential memory comparison")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    base = resolve_method_config("mdps", args.scale, {})
    print(f"MDPS inference on {device} ({torch.get_num_threads()} threads), scale={args.scale}, "
          f"{base.input_size}px, batch {args.batch}, noise level T={base.noise_level}, mask pass N_s={base.mask_num_samples or 'N_s'}, "
          f"backbone {base.backbone}")
    print()
    print(f"{'N_s':>4} {'N':>4} {'s/image':>10} {'x first':>8} {'evals/image':>12} {'ms/eval':>8}")
    first = None
    for steps in args.steps:
        for samples in args.samples:
            model = build(args.scale, {"num_samples": samples, "steps": steps}, device)
            seconds = seconds_per_image(model, images_for(model, args.batch, device), args.repeats)
            first = first or seconds
            evals = network_evaluations(model.config)
            print(f"{samples:>4} {steps:>4} {seconds:>10.3f} {seconds / first:>8.2f} {evals:>12} {1000 * seconds / evals:>8.1f}", flush=True)

    print()
    n = args.memory_samples
    batched = isolated_peak(args.scale, {"num_samples": n, "sample_chunk": None}, args.batch, args.device)
    sequential = isolated_peak(args.scale, {"num_samples": n, "sample_chunk": 1}, args.batch, args.device)
    where = "CUDA allocator peak" if device.type == "cuda" else "resident-set growth"
    print(f"peak memory of one predict, N_s={n}, batch {args.batch} ({where}):")
    print(f"  batched    (sample_chunk=None): {batched:9.1f} MiB")
    print(f"  sequential (sample_chunk=1):    {sequential:9.1f} MiB")
    print(f"  batched / sequential: {batched / max(sequential, 1e-9):.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
