"""How well a sweep packs per-category trainings onto a cluster (issue: parallel
per-category training), measured in one run.

    python -m bench.cluster_schedule [--nodes 8] [--categories 15] [--trials 8] [--train-s 60] [--eval-s 5]

A local multi-node Ray (``ray.cluster_utils.Cluster``: ``--nodes`` nodes of one slot each,
a slot = 1 CPU standing in for the issue's 1 GPU, which a CPU machine cannot run a CUDA
device for) runs a ``--trials``-trial Optuna sweep over one inference-only axis of a
benchmark-only method, ``sleeper``, registered here (in every Ray worker through the job's
``worker_process_setup_hook``): its training sleeps ``--train-s`` seconds, its evaluation
of a category ``--eval-s`` seconds, and nothing else costs anything. The data is a tiny
``--categories``-category MVTec-layout tree written to a temporary folder.

The sweep first trains the default model of every category in parallel through the
store's leases (``SweepPlan.pretrain_models``), then each trial evaluates its categories.
Ideal = ⌈categories / nodes⌉ × train-s + trials × categories × eval-s / nodes; the
headline is makespan / ideal (goal <= 1.15). Ray start-up and the data cache are
excluded; Ray Train's per-run start-up (five processes per training) is not.

On a 2-core machine the nodes' raylets and each training's Ray Train processes compete
for the two cores, so the ratio here is an upper bound of what a real cluster sees.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from methods import METHODS
from methods.base import AnomalyMethod, Losses, MethodConfig, Prediction, TrainBatch, infer_field, train_field

SPACE = """\
description: "bench.cluster_schedule: the sleeper's inference-only axis, Optuna"
method: sleeper
dataset: mvtec_ad
scale: smoke
fixed: {{}}
default_label: "sleeper"
axes:
  score_gain: {{uniform: [0.5, 2.0]}}
search: optuna
num_samples: {trials}
metric: val_image_auroc
mode: max
asha: null
trial: {{cpus: 1, gpus: 0, workers: 1}}
"""


@dataclass(frozen=True)
class SleeperConfig(MethodConfig):
    """A method whose costs are sleeps: the scheduling benchmark's stand-in for a GPU training."""

    image_size: int = train_field(32, "resize side in pixels")
    crop_size: int | None = train_field(None, "no crop")
    epochs: int = train_field(1, "one pass")
    batch_size: int = train_field(4, "one batch per epoch on the bench's 4 training images")
    train_seconds: float = train_field(60.0, "sleep of one training")
    eval_seconds: float = infer_field(5.0, "sleep of one category's evaluation")
    score_gain: float = infer_field(1.0, "the swept inference-only axis (scales the scores)")


class Sleeper(AnomalyMethod):
    Config = SleeperConfig
    PRESETS = {"paper": {}, "smoke": {}}

    def __init__(self, config: SleeperConfig, backbone_factory=None):
        super().__init__(config, backbone_factory)
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, batch: TrainBatch) -> Losses:
        time.sleep(self.config.train_seconds)
        loss = (self.weight - 1.0) ** 2
        return Losses(loss, {"loss": loss.detach()})

    def configure_optimizers(self):
        from methods.base import Optimizers

        return Optimizers(torch.optim.SGD(self.parameters(), lr=0.1), None)

    def calibrate(self, normal_images: torch.Tensor, category: torch.Tensor | None) -> None:
        time.sleep(self.config.eval_seconds)

    def infer(self, images: torch.Tensor, category: torch.Tensor | None, generator: torch.Generator) -> Prediction:
        maps = images.mean(dim=1).abs() * self.config.score_gain
        return Prediction(maps, maps.flatten(1).amax(dim=1))


def register() -> None:
    """Make ``method=sleeper`` known (here and, as the setup hook, in every Ray worker)."""
    METHODS.setdefault("sleeper", "bench.cluster_schedule:Sleeper")


def write_dataset(root: Path, categories: int) -> list[str]:
    """A tiny MVTec-layout tree: 4 normal training images, 2 normal and 2 defective test
    images (with masks) per category."""
    rng = np.random.default_rng(0)
    names = [f"part{i:02d}" for i in range(categories)]

    def save(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for name in names:
        for i in range(4):
            save(root / name / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        for i in range(2):
            save(root / name / "test" / "good" / f"{i:03d}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            save(root / name / "test" / "scratch" / f"{i:03d}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            mask = np.zeros((32, 32), np.uint8)
            mask[8:16, 8:16] = 255
            save(root / name / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--categories", type=int, default=15)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--train-s", type=float, default=60.0)
    parser.add_argument("--eval-s", type=float, default=5.0)
    args = parser.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from orchestrator import sweep

    register()
    work = Path(tempfile.mkdtemp(prefix="cluster-schedule-"))
    names = write_dataset(work / "data", args.categories)
    (work / "sleeper_schedule.yaml").write_text(SPACE.format(trials=args.trials))
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3600")
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env={"worker_process_setup_hook": "bench.cluster_schedule.register",
                                                   "env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
    print(f"ray: {args.nodes} one-slot nodes up in {time.monotonic() - started:.1f} s")
    common = [f"tracking_uri=sqlite:///{work / 'mlflow.db'}", f"storage_path={work / 'ray'}", f"data.cache_dir={work / 'cache'}",
              "dataset=mvtec_ad", f"data.root={work / 'data'}", f"categories=[{','.join(names)}]", f"max_concurrent={args.nodes}",
              f"method.train_seconds={args.train_s}", f"method.eval_seconds={args.eval_s}", "latency_images=1", "sample_maps=0"]
    try:
        # The data cache first (not timed): a dry start of the sweep's preparation.
        from orchestrator.plan import plan
        from orchestrator.config import parse_overrides
        from orchestrator.sweep import prepare_data

        values, overrides = parse_overrides([f"ablation={work / 'sleeper_schedule.yaml'}", *common])
        prepare_data(plan(values, overrides))
        start = time.monotonic()
        summary = sweep.run([f"ablation={work / 'sleeper_schedule.yaml'}", *common])
        makespan = time.monotonic() - start
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary.get("failed") == 0 and summary.get("trials") == args.trials, summary
    ideal = math.ceil(args.categories / args.nodes) * args.train_s + args.trials * args.categories * args.eval_s / args.nodes
    print(f"bench.cluster_schedule: {args.categories} categories x {args.trials} Optuna trials on {args.nodes} slots, "
          f"training {args.train_s:.0f} s, evaluation {args.eval_s:.0f} s")
    print(f"makespan {makespan:.1f} s, ideal {ideal:.1f} s -> makespan / ideal = {makespan / ideal:.2f} (goal <= 1.15)")


if __name__ == "__main__":
    sys.exit(main())
