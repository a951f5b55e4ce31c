"""Expected seconds of a training and of an evaluation: what orders a sweep's trainings
(longest first, orchestrator/schedule.py) and what ``dry_run=true`` estimates for a cluster.

Two sources, each estimate saying which it used:

* **measured**: ``bench/results/gpu.json``, written by ``python -m bench.gpu`` on a GPU
  (per method: seconds of one training step at its batch size and input size, and
  seconds per image of batched inference). Scaled to another configuration by pixels,
  batch size and sampling steps are not modelled: the measured configuration should be
  the paper preset the cluster runs.
* **estimate**: where nothing was measured. A training step is taken to cost
  ``REFERENCE_STEP_S`` at batch 8 and 256² pixels, scaled linearly by batch and pixels;
  inference costs the paper's own seconds per image where the paper states one
  (``AnomalyMethod.paper_seconds_per_image``), else ``REFERENCE_IMAGE_S``, also scaled by
  pixels. These orders of magnitude are for ordering and planning, not for reporting.

Training seconds = epochs × ceil(training images / batch size) × step seconds / workers
(ideal data-parallel scaling); evaluation seconds = (validation + test images) × seconds per
image (calibration on the validation normals included in the validation images).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from methods import get_method
from methods.fields import MethodConfig

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "gpu.json"
REFERENCE_STEP_S = 0.25  # one training step at batch 8, 256 x 256 pixels, one GPU (an order of magnitude, not a measurement)
REFERENCE_IMAGE_S = 0.3  # one image of inference at 256 x 256 pixels, one GPU (likewise)
REFERENCE_PIXELS = 256 * 256


@dataclass(frozen=True)
class Estimate:
    seconds: float
    source: str  # "measured (<device>)" | "paper" | "estimate"

    @property
    def measured(self) -> bool:
        return self.source.startswith("measured")


class TimingModel:
    def __init__(self, measured: dict[str, dict] | None = None):
        self.measured = measured or {}

    @classmethod
    def load(cls, path: Path = RESULTS) -> "TimingModel":
        """The measurements of ``bench.gpu`` where its results file exists, else estimates only."""
        if not path.is_file():
            return cls()
        rows = json.loads(path.read_text()).get("rows", [])
        return cls({r["method"]: r for r in rows if r.get("dtype", "fp32") == "fp32" and not r.get("errors")})

    def step(self, method: str, config: MethodConfig) -> Estimate:
        row = self.measured.get(method)
        if row and row.get("train_step_s"):
            return Estimate(float(row["train_step_s"]), f"measured ({row.get('device', 'GPU')})")
        scale = (config.batch_size / 8) * (config.input_size ** 2 / REFERENCE_PIXELS)
        return Estimate(REFERENCE_STEP_S * scale, "estimate")

    def image(self, method: str, config: MethodConfig) -> Estimate:
        row = self.measured.get(method)
        if row and row.get("latency_s"):
            return Estimate(float(row["latency_s"]), f"measured ({row.get('device', 'GPU')})")
        paper = get_method(method).paper_seconds_per_image
        pixels = config.input_size ** 2 / REFERENCE_PIXELS
        return Estimate(paper * pixels, "paper") if paper else Estimate(REFERENCE_IMAGE_S * pixels, "estimate")

    def training(self, method: str, config: MethodConfig, train_images: int, workers: int = 1) -> Estimate:
        step = self.step(method, config)
        steps = config.epochs * max(1, math.ceil(train_images / config.batch_size))
        return Estimate(steps * step.seconds / max(1, workers), step.source)

    def evaluation(self, method: str, config: MethodConfig, images: int) -> Estimate:
        per_image = self.image(method, config)
        return Estimate(images * per_image.seconds, per_image.source)
