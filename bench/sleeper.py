"""``method=sleeper``: a benchmark-only method whose costs are sleeps, so a schedule can be
measured on a laptop as if each training held a GPU (``bench.cluster_schedule``,
``bench.head_memory``, and the tests that count concurrent trials).

It is registered only where :func:`register` runs: in a process that calls it, and in
every Ray worker when Ray is started with ``runtime_env=RUNTIME_ENV`` (a
``worker_process_setup_hook``). ``write_dataset`` writes the tiny MVTec-layout tree it
trains on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from methods import METHODS
from methods.base import AnomalyMethod, Losses, MethodConfig, Optimizers, Prediction, TrainBatch, infer_field, train_field

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_ENV = {"worker_process_setup_hook": "bench.sleeper.register", "env_vars": {"PYTHONPATH": str(ROOT)}}


@dataclass(frozen=True)
class SleeperConfig(MethodConfig):
    """A method whose costs are sleeps: the scheduling benchmarks' stand-in for a GPU training."""

    image_size: int = train_field(32, "resize side in pixels")
    crop_size: int | None = train_field(None, "no crop")
    epochs: int = train_field(1, "one pass")
    batch_size: int = train_field(4, "one batch per epoch on the 4 training images of write_dataset")
    train_seconds: float = train_field(60.0, "sleep of one training (spread over its epochs)")
    eval_seconds: float = infer_field(5.0, "sleep of one category's evaluation")
    score_gain: float = infer_field(1.0, "an inference-only axis to sweep (scales the scores)")


class Sleeper(AnomalyMethod):
    Config = SleeperConfig
    PRESETS = {"paper": {}, "smoke": {}}

    def __init__(self, config: SleeperConfig, backbone_factory=None):
        super().__init__(config, backbone_factory)
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, batch: TrainBatch) -> Losses:
        time.sleep(self.config.train_seconds / max(1, self.config.epochs))
        loss = (self.weight - 1.0) ** 2
        return Losses(loss, {"loss": loss.detach()})

    def configure_optimizers(self) -> Optimizers:
        return Optimizers(torch.optim.SGD(self.parameters(), lr=0.1), None)

    def calibrate(self, normal_images: torch.Tensor, category: torch.Tensor | None) -> None:
        time.sleep(self.config.eval_seconds)

    def infer(self, images: torch.Tensor, category: torch.Tensor | None, generator: torch.Generator) -> Prediction:
        maps = images.mean(dim=1).abs() * self.config.score_gain
        return Prediction(maps, maps.flatten(1).amax(dim=1))


def register() -> None:
    """Make ``method=sleeper`` known (here and, as the setup hook, in every Ray worker)."""
    METHODS.setdefault("sleeper", "bench.sleeper:Sleeper")


SPACE = """\
description: "the sleeper's inference-only axis (scheduling benchmarks and tests)"
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
trial: {{cpus: 1, workers: 1}}
"""


def write_space(path: Path, trials: int) -> Path:
    path.write_text(SPACE.format(trials=trials))
    return path


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


def start_cluster(slots: int):
    """A local multi-node Ray (``ray.cluster_utils.Cluster``): a head without CPUs and
    ``slots`` nodes of one CPU and one ``slot`` each, isolated from any other Ray on the
    machine: its own RAY_TMPDIR (inherited by every node, so Ray Train's placement-group
    cleaner and the State API find this cluster, not another) and a free dashboard port."""
    import os
    import socket
    import tempfile

    from ray.cluster_utils import Cluster

    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: socket paths are length-limited
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": dashboard_port})
    for _ in range(slots):
        cluster.add_node(num_cpus=1, resources={"slot": 1})
    address_file = Path(os.environ["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text(cluster.address)
    return cluster
