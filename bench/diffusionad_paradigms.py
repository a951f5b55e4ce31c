"""Inference cost of DiffusionAD's denoising paradigms (Table VII's FPS column, §IV-B).

    python -m bench.diffusionad_paradigms                      # 128 px mid-size UNet, ~2-4 min on 2 CPUs
    python -m bench.diffusionad_paradigms --size 64 --smoke    # the smoke-scale networks, seconds
    python -m bench.diffusionad_paradigms --paper              # paper networks at 256 px (GPU-sized: hours on a CPU)

Times ``DiffusionAD.predict`` on one image at a time (batch 1, as FPS is usually
reported) for one-step (Eq. 6), norm-guided (Eqs. 6-8), DDIM-k and iterative-k
(Eq. 3 at every timestep from t_single, k = t_single + 1), segmentation network
included. Every paradigm is measured in full, nothing is extrapolated. Rounds are
interleaved (each round times every paradigm once) and the median per paradigm is
reported, which keeps a shared machine's load spikes from favouring one paradigm.
Weights are random: cost does not depend on them. The paper's claim to compare with:
one-step denoising is about t times faster than iterative denoising from t
(Table VII: 26.7 FPS vs 0.09 FPS, ~300x, for t = 400).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from methods.diffusionad import DiffusionAD, DiffusionADConfig, Paradigm, network_evaluations

# A mid-size stand-in for the paper's 120 M-parameter UNet (base 128, six levels, 256 px),
# whose single forward pass takes seconds on a CPU.
MID_SIZE = dict(
    base_channels=32,
    channel_mult=(1, 2, 2, 4),
    layers_per_block=2,
    attention_resolutions=(16,),
    head_channels=32,
    seg_base_channels=32,
    seg_channel_mult=(1, 2, 4, 8, 8),
)


@dataclass
class Row:
    name: str
    paradigm: Paradigm
    steps: int
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def build(args: argparse.Namespace) -> DiffusionAD:
    if args.paper:
        overrides: dict = {}
    elif args.smoke:
        overrides = dict(DiffusionAD.PRESETS["smoke"])
    else:
        overrides = dict(MID_SIZE)
    overrides["image_size"] = 256 if args.paper else args.size
    overrides["t_single"] = args.t_single
    config = DiffusionADConfig(**overrides)
    torch.manual_seed(0)
    return DiffusionAD(config).eval()


def time_predict(model: DiffusionAD, image: torch.Tensor, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.predict(image, generator=generator)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (ignored with --paper)")
    parser.add_argument("--smoke", action="store_true", help="use the smoke preset's networks")
    parser.add_argument("--paper", action="store_true", help="use the paper's networks at 256 px")
    parser.add_argument("--t-single", type=int, default=400, help="start of one-step / DDIM / iterative (paper: 400)")
    parser.add_argument("--ddim-steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args)
    c = model.config
    n_unet = sum(p.numel() for p in model.unet.parameters()) / 1e6
    n_seg = sum(p.numel() for p in model.segmentation.parameters()) / 1e6
    arch = "paper" if args.paper else "smoke preset" if args.smoke else "mid-size (not the paper's)"
    print(f"DiffusionAD paradigm cost on {torch.get_num_threads()} CPU threads, batch 1, {c.image_size} px")
    print(f"networks: {arch}: UNet {n_unet:.1f} M params (base {c.base_channels}, mult {c.channel_mult}), segmentation {n_seg:.1f} M")
    print(f"norm-guided t_s={c.t_s}, t_b={c.t_b}; single-scale paradigms start at t={c.t_single}; "
          f"{args.rounds} interleaved rounds, median reported, nothing extrapolated\n")

    iterative_steps = c.t_single + 1
    rows = [
        Row("one-step", Paradigm.ONE_STEP, 1, []),
        Row("norm-guided", Paradigm.NORM_GUIDED, 1, []),
        Row(f"DDIM-{args.ddim_steps}", Paradigm.DDIM, args.ddim_steps, []),
        Row(f"iterative-{iterative_steps}", Paradigm.ITERATIVE, iterative_steps, []),
    ]
    image = torch.rand(1, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for row in rows:  # warm-up: allocator, kernels
        model.reconfigure_inference(paradigm=row.paradigm, paradigm_steps=min(row.steps, 2) if row.steps > 1 else row.steps)
        time_predict(model, image, 0)
    for r in range(args.rounds):
        for row in rows:
            model.reconfigure_inference(paradigm=row.paradigm, paradigm_steps=row.steps)
            row.seconds.append(time_predict(model, image, r))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{row.name} {row.seconds[-1] * 1e3:.0f} ms" for row in rows), flush=True)

    one_step = rows[0].median
    norm_guided = rows[1].median
    print()
    print(f"{'paradigm':<16}{'UNet evals':>11}{'ms / image':>12}{'images/s':>10}{'ms / eval':>11}{'x one-step':>12}{'x norm-guided':>15}")
    for row in rows:
        evals = network_evaluations(row.paradigm, row.steps)
        print(
            f"{row.name:<16}{evals:>11}{row.median * 1e3:>12.1f}{1 / row.median:>10.2f}{row.median * 1e3 / evals:>11.1f}"
            f"{row.median / one_step:>12.1f}{row.median / norm_guided:>15.2f}"
        )
    iterative = rows[-1].median
    print()
    print(f"iterative-{iterative_steps} / one-step = {iterative / one_step:.0f}x slower "
          f"(paper: one-step is ~t = {c.t_single} times faster; Table VII 26.7 / 0.09 FPS = {26.7 / 0.09:.0f}x)")
    print(f"norm-guided / one-step = {norm_guided / one_step:.2f}x (paper Table VII: 26.7 / 23.5 FPS = {26.7 / 23.5:.2f}x; "
          "here the two UNet passes run as one batch of 2)")
    print(f"DDIM-{args.ddim_steps} / one-step = {rows[2].median / one_step:.1f}x (paper: 26.7 / 0.92 FPS = {26.7 / 0.92:.0f}x)")


if __name__ == "__main__":
    main()
