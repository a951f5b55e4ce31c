"""evaluate_model calibrates each category on its validation normals, and only on them,
before any predict on that category (methods/base.py: AnomalyMethod.calibrate)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from methods.base import AnomalyMethod, MethodConfig, Prediction
from orchestrator.data import CategoryData
from orchestrator.training import EvaluationSettings, evaluate_model


@dataclass(frozen=True)
class SpyConfig(MethodConfig):
    pass


class Spy(AnomalyMethod):
    """Records calibrate and predict calls; the map is the mean image (any number would do)."""

    Config = SpyConfig

    def __init__(self, config: MethodConfig, backbone_factory=None):
        super().__init__(config, backbone_factory)
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, batch):  # pragma: no cover - never trained here
        raise NotImplementedError

    def configure_optimizers(self):
        return None

    def calibrate(self, normal_images, category):
        self.calls.append(("calibrate", normal_images.clone(), category))

    def infer(self, images, category, generator):
        self.calls.append(("predict", images.clone(), category))
        anomaly_map = images.mean(1)
        return Prediction(anomaly_map, anomaly_map.flatten(1).mean(1))


def category(name: str, offset: int) -> CategoryData:
    """4 validation images (2 normals first) and 4 test images with values that say which is which."""
    def images(values):
        return np.stack([np.full((3, 4, 4), v, np.uint8) for v in values])

    masks = np.zeros((4, 4, 4), np.uint8)
    masks[2:, :2] = 1
    labels = np.array([0, 0, 1, 1], np.int64)
    return CategoryData(
        dataset="fake", category=name, train_images=images([0]), train_foreground=np.ones((1, 1, 4, 4), np.uint8),
        val_images=images([offset + 1, offset + 2, offset + 3, offset + 4]), val_masks=masks, val_labels=labels,
        test_images=images([offset + 100, offset + 101, offset + 102, offset + 103]), test_masks=masks, test_labels=labels,
        test_defect_types=["good", "good", "cut", "cut"],
    )


def test_evaluate_model_calibrates_on_validation_normals_before_predicting():
    model = Spy(SpyConfig())
    datas = [category("a", 0), category("b", 10)]
    evaluate_model(model, datas, EvaluationSettings(batch_size=4, latency_images=1, sample_maps=0), torch.device("cpu"), None, 0.0)
    kinds = [kind for kind, _, _ in model.calls]
    assert kinds.count("calibrate") == 2
    first_b = next(i for i, (_, _, cat) in enumerate(model.calls) if int(cat[0]) == 1)  # the first call for category b
    assert kinds[0] == "calibrate" and kinds[first_b] == "calibrate"  # before every predict of its category
    for position, (offset, index) in enumerate(((0, 0), (10, first_b))):
        _, images, cat = model.calls[index]
        pixels = (images * 127.5 + 127.5).round()[:, 0, 0, 0].tolist()  # to_unit_range undone
        assert pixels == [offset + 1, offset + 2]  # the validation normals only: no anomalies, no test image
        assert cat.tolist() == [position, position]
