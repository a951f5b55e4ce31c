"""Seeded fingerprints of every method's model: its initial state_dict, the same after two
training steps, and one anomaly map. tests/test_model_fingerprints.py compares them with
tests/data/model_fingerprints.json, recorded before the house-keeping refactors, so a
refactor that claims to move code without changing a model is held to it. Re-recorded once
since, on purpose: loading a pretrained backbone no longer draws from torch's global
generator (orchestrator/pretrained.py), which changed DRDC's seeded initial weights.

    python -m tests.model_fingerprints    # re-record (only when a change is *meant* to alter a model)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from methods import METHODS
from orchestrator.config import resolve_method_config
from orchestrator.training import TrainingData, build_model, predict_split, train_epoch

RECORD = Path(__file__).resolve().parent / "data" / "model_fingerprints.json"
SIZE = 64  # every method's smoke preset at 64 px: seconds per method
# Fewest sampling steps each method accepts, so one map costs seconds (inference fields).
SAMPLING = {"transfusion": {"steps": 2}, "diffusionad": {}, "mdps": {"steps": 2, "num_samples": 1, "mask_num_samples": 1},
            "drdc": {"timesteps": (200, 0)}, "patchcore": {}}


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, SIZE, SIZE), dtype=np.uint8)


def config_of(method: str):
    category = {"num_categories": 1} if method == "drdc" else {}
    return resolve_method_config(method, "smoke", {"image_size": SIZE, "crop_size": None, **category, **SAMPLING.get(method, {})})


def state_hash(model: torch.nn.Module) -> str:
    """Exact: initialisation draws from torch's CPU generator, the same on every machine."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def summary(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor (sum, L2 norm): compared with a tolerance, since float reductions may
    differ in the last bits between CPUs."""
    return {name: [float(t.double().sum()), float(t.double().norm())] for name, t in sorted(tensors.items()) if t.is_floating_point()}


def fingerprint(method: str) -> dict:
    config = config_of(method)
    torch.manual_seed(0)
    model = build_model(method, config)
    initial = state_hash(model)
    data = TrainingData(images=torch.from_numpy(images(4, 1)), foreground=torch.ones(4, 1, SIZE, SIZE, dtype=torch.uint8),
                        category=torch.zeros(4, dtype=torch.long), textures=torch.from_numpy(images(2, 2)).float() / 127.5 - 1)
    optimizers = model.configure_optimizers()
    train_epoch(model, optimizers, data, 2, 0, 0, torch.device("cpu"))  # two steps of batch 2
    trained = summary(model.state_dict())
    model.calibrate(torch.from_numpy(images(2, 4)).float() / 127.5 - 1, torch.zeros(2, dtype=torch.long))
    maps = predict_split(model, images(1, 3), 0, 1, 0, torch.device("cpu"))
    return {"initial": initial, "trained": trained, "map": summary({"map": torch.from_numpy(maps.maps)})["map"],
            "score": float(maps.scores[0])}


def main() -> int:
    record = {method: fingerprint(method) for method in sorted(METHODS)}
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
