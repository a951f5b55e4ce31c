"""bench/paper_scale.py: every registered method's paper preset builds, takes one training
step and runs one minimal inference on a paper-resolution image (in-process here; the
bench runs each in a fresh subprocess)."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import paper_scale
from methods import METHODS, get_method
from orchestrator.config import resolve_method_config


def test_the_minimal_sampling_settings_and_the_paper_facts_come_from_the_method():
    for method in METHODS:
        cls = get_method(method)
        paper = resolve_method_config(method, "paper", cls.category_overrides(["bench"]))
        sampling = cls.minimal_sampling(paper)
        assert set(sampling) <= {f.name for f in dataclasses.fields(cls.Config)}, method  # fields the config has
        resolve_method_config(method, "paper", cls.category_overrides(["bench"]), sampling)  # with valid values
        row = paper_scale.table_row(method, {"error": "x"}, {"error": "x"})
        assert row[4] == cls.paper_parameters and row[4].startswith("not stated"), row
    assert get_method("mdps").minimal_sampling(paper_scale.resolve_method_config("mdps", "paper", {})) == {"steps": 1, "num_samples": 1, "mask_num_samples": 1}


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="the fallback is for machines without torchvision")
def test_a_paper_backbone_that_cannot_be_loaded_is_replaced_and_said_so():
    built = paper_scale.build("patchcore")
    assert built.config.backbone == "efficientnet_lite0"
    assert built.backbone.startswith("efficientnet_lite0, stands in for wide_resnet50_2: torchvision not installed")


MEASURE_64_MIB = """
import json, torch
from bench import paper_scale
blocks = []
result = paper_scale.measure_call(lambda: blocks.append(torch.ones(64, 2**20, dtype=torch.uint8).add_(1)), warmup=True)  # 64 MiB, touched
print(json.dumps({**result, "blocks": len(blocks)}))
"""


def test_measure_call_times_the_call_and_its_memory_growth():
    # In a fresh process, as the bench measures: this test process carries the heap of every
    # test before it (and Ray's threads), whose frees during the call would hide its growth.
    done = subprocess.run([sys.executable, "-c", MEASURE_64_MIB], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["blocks"] == 2 and result["seconds"] > 0
    assert result["memory_measure"] == "VmHWM"
    assert 50 <= result["peak_increase_mib"] <= 200, result


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_paper_preset_trains_one_step_and_infers_once(method):
    """~10-60 s per method on 2 CPU cores (paper resolution, batch 1)."""
    built = paper_scale.build(method)  # with the minimal sampling settings
    assert built.config.input_size >= 224  # the paper resolution, not a smoke size
    total, trainable = paper_scale.parameter_counts(built)
    assert total > 0 and 0 <= trainable <= total
    step = paper_scale.training_step(built)
    step()
    paper_scale.inference_call(built)  # (a training-free method fills its bank here)
    image = paper_scale.one_image(built.config, seed=3)
    prediction = built.model.predict(torch.from_numpy(image).float() / 127.5 - 1)
    assert prediction.anomaly_map.shape == (1, built.config.input_size, built.config.input_size)
    assert torch.isfinite(prediction.anomaly_map).all() and torch.isfinite(prediction.image_score).all()
