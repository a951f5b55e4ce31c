"""A new method touches at most four files, and everything that takes a method runs on it.

In a copy of the repository (its tracked files and the untracked ones git does not
ignore, committed into a fresh git repository) a toy method is added as files, the way
docs/architecture.md ("How to add a method") says: ``methods/toy.py`` (a one-convolution
autoencoder, reconstruction-error maps, its paper facts left at the defaults of
methods/base.py), one line in ``methods/__init__.py``, ``search_spaces/toy_width.yaml``
and ``mutations/toy.yaml``. ``git status`` must list no other path. Then, as
subprocesses in the copy with this checkout's interpreter (no Ray address, the data cache
under tmp_path), each must exit 0:

* ``python -m orchestrator.sweep ablation=toy_width dry_run=true``;
* the sweep itself (2 trials, one per width, 1 epoch at 32 px, one category, an embedded
  Ray, a SQLite MLflow store) and ``python -m orchestrator.report`` on its store;
* the benches that take a method: ``bench.paper_scale``, ``bench.gpu`` (CPU, ``--fast``),
  ``bench.generality`` (1 seed) and ``bench.learning``, each with ``--methods toy``;
* ``python -m mutations.run --method toy`` (its one mutation caught) and the contract
  tests of tests/test_method_contract.py on the toy.

Measured: 102 s on 2 busy CPU cores (2026-12-07; the sweep ~50 s of it, mostly Ray starting).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"

TOY = '''\
"""Toy: a one-convolution autoencoder, the smallest method the contract admits
(methods/base.py). Its anomaly map is the squared reconstruction error, its image score
the map's maximum (or mean). Its paper facts stay at the base class's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import AnomalyMethod, BackboneFactory, Losses, MethodConfig, Optimizers, Prediction, TrainBatch, check, infer_field, train_field


class ImageScore(str, Enum):
    MAX = "max"
    MEAN = "mean"


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    width: int = train_field(8, "hidden channels of the one convolution")
    kernel_size: int = train_field(3, "side of the convolution's kernel, odd")
    channel_weights: tuple[float, ...] = infer_field((1.0, 1.0, 1.0), "weight of each colour channel's squared error in the map")
    image_score: ImageScore = infer_field(ImageScore.MAX, "image score: max | mean of the map")

    def validate(self) -> None:
        super().validate()
        check(self.width >= 1, f"width must be >= 1, got {self.width}")
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        check(len(self.channel_weights) == 3, f"channel_weights must have 3 values, got {self.channel_weights}")


class Toy(AnomalyMethod):
    """x -> conv(3 -> width) -> ReLU -> 1x1 conv(width -> 3) ~ x, trained by MSE on normal images."""

    Config = ToyConfig
    PRESETS = {"paper": {}, "smoke": {"image_size": 32, "crop_size": None, "epochs": 1, "batch_size": 8, "learning_rate": 1e-2}}
    training_synthesis = ()  # trained on normal images only

    def __init__(self, config: ToyConfig, backbone_factory: BackboneFactory | None = None):
        super().__init__(config, backbone_factory)
        self.encode = nn.Conv2d(3, config.width, config.kernel_size, padding=config.kernel_size // 2)
        self.decode = nn.Conv2d(config.width, 3, 1)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(F.relu(self.encode(images)))

    def forward(self, batch: TrainBatch) -> Losses:
        loss = F.mse_loss(self.reconstruct(batch.images), batch.images)
        return Losses(loss, {"mse": loss.detach()})

    def configure_optimizers(self) -> Optimizers:
        return Optimizers(torch.optim.Adam(self.parameters(), lr=self.config.learning_rate), None)

    def infer(self, images: torch.Tensor, category: torch.Tensor | None, generator: torch.Generator) -> Prediction:
        weights = torch.tensor(self.config.channel_weights, device=images.device).view(1, 3, 1, 1)
        anomaly_map = ((images - self.reconstruct(images)).pow(2) * weights).mean(dim=1)
        flat = anomaly_map.flatten(1)
        score = flat.amax(1) if self.config.image_score == ImageScore.MAX else flat.mean(1)
        return Prediction(anomaly_map, score)
'''

SPACE = """\
# Toy: the width of the one convolution (a training field: each row trains its own model).
description: "Toy: hidden width of the one convolution (4, 8)"
method: toy
dataset: synthetic
categories: [washer]
scale: smoke
fixed: {}
default_label: "Toy (width 8)"
axes:
  width: {grid: [4, 8]}
search: grid
num_samples: 1
points_to_evaluate: []
metric: val_pixel_ap  # see search_spaces/README.md, "Which validation metric"
mode: max
asha: null
trial: {cpus: 1, workers: 1}
"""

MUTATIONS = """\
# Toy mutations: the listed test must fail on every one.
# Run: python -m mutations.run --method toy
- id: toy-map-keeps-channel-axis
  file: methods/toy.py
  find: "anomaly_map = ((images - self.reconstruct(images)).pow(2) * weights).mean(dim=1)"
  replace: "anomaly_map = ((images - self.reconstruct(images)).pow(2) * weights).mean(dim=1, keepdim=True)"
  tests: ["tests/test_method_contract.py::test_predict_outputs[toy]"]
  why: "the anomaly map keeps a channel axis: [B, 1, H, W] instead of the contract's [B, H, W]"
"""

ADDED = {"methods/toy.py", "methods/__init__.py", "search_spaces/toy_width.yaml", "mutations/toy.yaml"}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false", *args],
                          cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout


def copy_repository(dest: Path) -> None:
    """The checkout's tracked files and the untracked ones git does not ignore, committed."""
    names = git(ROOT, "ls-files", "-z", "-co", "--exclude-standard").split("\0")
    for name in filter(None, names):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "the repository as it is")


def add_toy_method(copy: Path) -> None:
    (copy / "methods" / "toy.py").write_text(TOY)
    registry = copy / "methods" / "__init__.py"
    text = registry.read_text()
    start = text.index("METHODS: dict[str, str] = {")
    close = text.index("\n}\n", start)
    registry.write_text(text[:close] + '\n    "toy": "methods.toy:Toy",' + text[close:])
    (copy / "search_spaces" / "toy_width.yaml").write_text(SPACE)
    (copy / "mutations" / "toy.yaml").write_text(MUTATIONS)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(600)
def test_a_new_method_touches_four_files_and_runs_everywhere(tmp_path):
    copy, work = tmp_path / "repo", tmp_path / "work"
    copy.mkdir()
    work.mkdir()
    copy_repository(copy)
    add_toy_method(copy)

    changed = [line[3:] for line in git(copy, "status", "--porcelain", "--untracked-files=all").splitlines()]
    assert len(changed) <= 4 and set(changed) == ADDED, changed
    assert git(copy, "diff", "--numstat").split() == ["1", "0", "methods/__init__.py"]  # one line added to METHODS

    python = str(PYTHON if PYTHON.is_file() else sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=str(copy), DIFFAD_CACHE=str(tmp_path / "cache"), PYTHONDONTWRITEBYTECODE="1")
    cache, db = tmp_path / "cache", tmp_path / "mlflow.db"

    def run(*args: str, timeout: float = 300) -> str:
        done = subprocess.run([python, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{output[-4000:]}"
        return done.stdout

    out = run("-m", "orchestrator.sweep", "ablation=toy_width", "dry_run=true")
    assert "sweep toy_width: toy on synthetic" in out and "trials: 2" in out, out

    out = run("-m", "orchestrator.sweep", "ablation=toy_width", f"tracking_uri=sqlite:///{db}", f"storage_path={tmp_path / 'ray'}",
              "max_concurrent=1", "latency_images=1", "sample_maps=1", timeout=400)
    assert re.search(r"sweep toy_width-\S+: 2 trials, 0 failed", out), out[-3000:]

    out = run("-m", "orchestrator.report", f"tracking_uri=sqlite:///{db}", f"out={work / 'reports'}")
    assert (work / "reports" / "ablations" / "toy_width.md").is_file(), out
    assert "| toy |" in (work / "reports" / "leaderboard.md").read_text()

    out = run("-m", "bench.paper_scale", "--methods", "toy", "--timeout", "240")
    (row,) = [line for line in out.splitlines() if line.startswith("| toy |")][-1:]
    assert "error" not in row and "| not stated |" in row and "defaults (nothing to reduce)" in row, row

    run("-m", "bench.gpu", "--methods", "toy", "--device", "cpu", "--scale", "smoke", "--size", "32", "--batch", "2", "--train-batch", "2",
        "--warmup", "1", "--repeats", "1", "--threads", "1", "--fast", "--out", str(work / "gpu.json"))
    (row,) = json.loads((work / "gpu.json").read_text())["rows"]
    assert "error" not in row and row["paper_speed"] == "not reported" and row["inference"] == "fast: none available", row

    run("-m", "bench.generality", "--methods", "toy", "--seeds", "1", "--scale", "smoke", "--cache-dir", str(cache),
        "--out", str(work / "generality.json"))
    record = json.loads((work / "generality.json").read_text())["methods"]["toy"]
    assert record["candidates"] == [{}] and record["selected"] == 0, record  # selection_grid's default: the preset alone

    run("-m", "bench.learning", "--methods", "toy", "--cache-dir", str(cache), "--out", str(work / "learning.json"))
    assert "toy" in json.loads((work / "learning.json").read_text())["methods"]

    out = run("-m", "mutations.run", "--method", "toy")
    assert out.strip().splitlines()[-1] == "1 caught, 0 survived, 0 timed out of 1", out
    run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_method_contract.py", "-k", "toy")
