"""The validation split's defects are a third family: not what any method trains on, not
what the embedded test split draws (orchestrator/data/validation_defects.py)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

from methods import METHODS, get_method
from orchestrator.data import synthetic, validation_defects
from orchestrator.data.foreground import foreground_masks
from orchestrator.data.validation_defects import (
    MIN_ANOMALY_FRACTION,
    VALIDATION_DEFECTS,
    draw_defect,
    make_validation_anomalies,
)
from orchestrator.metrics import pixel_auroc


def synthetic_normals(category: str, count: int, seed: int) -> np.ndarray:
    """uint8 [count, 3, 128, 128] good images of the embedded dataset, made in memory."""
    rng = np.random.default_rng(seed)
    photos = synthetic.load_photos()
    return np.stack([synthetic.to_uint8(synthetic.make_sample(category, "good", rng, photos).image).transpose(2, 0, 1) for _ in range(count)])


@pytest.fixture(scope="module")
def washers() -> np.ndarray:
    return synthetic_normals("washer", 84, seed=1)  # 60 to learn a mean from, 24 to corrupt


# ---------------------------------------------------------------------------- three disjoint families


def test_training_validation_and_test_defects_are_pairwise_disjoint():
    training: dict[str, set[str]] = {}
    for name in METHODS:
        declared = get_method(name).training_synthesis
        assert isinstance(declared, tuple) and all(isinstance(d, str) and d for d in declared), name
        training[name] = set(declared)
    every_training = set().union(*training.values())
    validation, test = set(VALIDATION_DEFECTS), set(synthetic.TEST_DEFECTS)
    assert len(validation) == len(VALIDATION_DEFECTS) == 4
    assert not every_training & validation, training
    assert not every_training & test, training
    assert not validation & test


def test_methods_that_use_the_synthesis_module_declare_it():
    # A forgotten declaration would make the disjointness above vacuous.
    for name, target in METHODS.items():
        module = importlib.import_module(target.split(":")[0])
        uses_synthesis = any(getattr(value, "__module__", None) == "methods.anomaly_synthesis" for value in vars(module).values())
        if uses_synthesis:
            assert {"perlin_texture", "perlin_shuffled_patches"} <= set(get_method(name).training_synthesis), name
    assert get_method("transfusion").training_synthesis and get_method("diffusionad").training_synthesis
    assert get_method("mdps").training_synthesis == ()


def test_validation_defects_import_neither_other_family():
    tree = ast.parse(Path(validation_defects.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m == "methods" or m.startswith("methods.") for m in imported), imported
    assert "orchestrator.data.synthetic" not in imported and not any(m.startswith("orchestrator") for m in imported), imported


# ---------------------------------------------------------------------------- masks and determinism


@pytest.mark.parametrize("category", ["washer", "brick"])
def test_masks_are_exactly_the_changed_pixels_within_the_foreground(category):
    normals = synthetic_normals(category, 8, seed=3)
    foreground = foreground_masks(normals, is_object=category == "washer")
    result = make_validation_anomalies(normals, foreground, seed=0, salt=5)
    assert sorted(result.defects) == sorted(VALIDATION_DEFECTS * 2)  # the generators take turns
    assert result.images.dtype == np.uint8 and result.masks.dtype == np.uint8
    changed = (result.images != normals).any(axis=1)
    np.testing.assert_array_equal(result.masks.astype(bool), changed)
    assert (result.masks.reshape(8, -1).sum(1) >= MIN_ANOMALY_FRACTION * 128 * 128).all()
    assert not (result.masks.astype(bool) & ~foreground[:, 0].astype(bool)).any()
    if category == "washer":  # the washer's foreground is a ring, not the whole image
        assert foreground.mean() < 0.6


def test_split_is_a_function_of_seed_and_salt():
    normals = synthetic_normals("gravel", 4, seed=4)
    foreground = foreground_masks(normals, is_object=False)
    first = make_validation_anomalies(normals, foreground, seed=0, salt=1)
    again = make_validation_anomalies(normals, foreground, seed=0, salt=1)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.masks, again.masks)
    assert first.defects == again.defects
    for seed, salt in ((1, 1), (0, 2)):  # another seed, another category
        assert not np.array_equal(make_validation_anomalies(normals, foreground, seed=seed, salt=salt).images, first.images)


def test_unknown_defect_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: swirl_warp, patch_transplant"):
        draw_defect("scratch", np.zeros((3, 8, 8), np.uint8), np.ones((8, 8), bool), np.random.default_rng(0))


# ---------------------------------------------------------------------------- visible, not trivial


def test_a_trivial_baseline_finds_the_defects_better_than_chance_but_not_perfectly(washers):
    """Per-pixel distance to the mean normal washer: the defects stand out from the
    normal pixels of the same images, but pose jitter and noise keep it far from perfect."""
    train, held = washers[:60], washers[60:]
    result = make_validation_anomalies(held, foreground_masks(held, is_object=True), seed=0, salt=9)
    mean_normal = train.astype(np.float64).mean(axis=0)
    distance = np.abs(result.images - mean_normal).mean(axis=1)  # [V, H, W]
    auroc = pixel_auroc(result.masks, distance)
    assert 0.65 < auroc < 0.95, auroc
    for name in VALIDATION_DEFECTS:
        chosen = [i for i, d in enumerate(result.defects) if d == name]
        assert 0.55 < pixel_auroc(result.masks[chosen], distance[chosen]) < 0.99, name  # each generator, too
