"""The frozen generality set (orchestrator/data/generality_set.py): a fourth defect family,
disjoint from training synthesis, validation defects and the synthetic test split; exact
masks; the generated files are the frozen ones."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from methods import METHODS, get_method
from orchestrator.data import generality_set, synthetic
from orchestrator.data.registry import get_adapter
from orchestrator.data.validation_defects import VALIDATION_DEFECTS


def test_generality_defects_are_disjoint_from_every_other_family():
    training = set().union(*(get_method(name).training_synthesis for name in METHODS))
    ours = set(generality_set.GENERALITY_DEFECTS)
    assert len(ours) == 3
    assert not ours & training
    assert not ours & set(VALIDATION_DEFECTS)
    assert not ours & set(synthetic.TEST_DEFECTS)


def test_generality_module_imports_no_other_family():
    tree = ast.parse(Path(generality_set.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m == "methods" or m.startswith("methods.") for m in imported), imported
    assert not imported & {"orchestrator.data.synthetic", "orchestrator.data.validation_defects"}, imported


# The candidates as committed 2026-12-07, before any measurement on the v2 set (once in
# bench/generality.py's GRIDS, now each method's selection_grid): not to be edited after the fact.
COMMITTED_GRIDS = {
    "transfusion": [{}, {"final_mask": "disc"}, {"final_mask": "recon"}, {"disc_weight": 0.5}, {"filter_size": 7}],
    "diffusionad": [{}, {"paradigm": "one_step"}, {"top_k": 10}, {"top_k": 200}, {"t_s": 100, "t_b": 200}],
    "mdps": [{}, {"metric": "perceptual"}, {"metric": "pixel"}, {"use_mask": False}, {"blur_sigma": 4.0}],
    "drdc": [{}, {"gamma": 0.9}, {"gamma": 1.0}, {"fusion": "temporal"}, {"score_pool_size": 9}],
    "patchcore": [{}, {"feature_strides": [4, 8]}, {"patch_size": 5}, {"image_score": "reweighted"}, {"blur_sigma": 4.0},
                  {"image_size": 256}],
}


def test_the_selection_candidates_are_the_committed_ones_and_each_resolves():
    from bench import generality as bench
    from orchestrator.config import resolve_method_config

    for method, grid in COMMITTED_GRIDS.items():
        assert bench.candidates(method) == grid, method  # same candidates, same order, preset first
        cls = get_method(method)
        for candidate in grid:
            resolve_method_config(method, "smoke", cls.category_overrides(list(generality_set.CATEGORIES)), candidate)


def test_no_photo_of_the_set_is_in_a_bank_a_method_trains_on():
    """By content: downscaled crops of each photo against every image of the offline texture
    bank (anomaly paste-ins) — and the check finds a renamed, resized copy."""
    from skimage import data as skdata

    from orchestrator.data import textures

    photos = generality_set.load_photos()
    bank = {name: getattr(skdata, name)() for name in textures.OFFLINE_SOURCES}
    assert generality_set.near_duplicates(photos, bank) == []
    resized = np.asarray(Image.fromarray(skdata.grass()).resize((300, 300), Image.BILINEAR))
    found = generality_set.near_duplicates(photos, {**bank, "renamed": resized})
    assert [(a, b) for a, b, _ in found] == [("grass", "renamed")]


def test_training_and_test_crops_come_from_disjoint_rows():
    photo = np.zeros((512, 512), np.uint8)
    rng = np.random.default_rng(0)
    rows = {split: set() for split in ("train", "test")}
    for split in rows:
        for _ in range(500):
            top, _left = generality_set.crop_box(split, photo.shape, rng)
            rows[split].update(range(top, top + generality_set.CROP))
    assert rows["train"] and rows["test"] and not rows["train"] & rows["test"]
    assert max(rows["train"]) < min(rows["test"])


@pytest.mark.parametrize("defect", generality_set.GENERALITY_DEFECTS)
def test_masks_are_exactly_the_visibly_changed_pixels(defect):
    photos = generality_set.load_photos()
    rng = np.random.default_rng(7)
    for category in generality_set.CATEGORIES:
        normal = generality_set.normal_image(photos[category], rng, "test")
        image, mask = generality_set.draw_defect(defect, normal, rng)
        before = generality_set.to_uint8(normal)
        change = np.abs(image.astype(np.int16) - before).max(axis=2)
        assert mask.sum() >= generality_set.MIN_PIXELS
        assert (change[~mask] == 0).all(), "a pixel outside the mask changed"
        assert (change[mask] >= generality_set.CHANGE_TOLERANCE).all(), "a masked pixel did not visibly change"


def test_the_generated_set_is_the_frozen_one(tmp_path):
    adapter = get_adapter("generality")
    root = adapter.resolve_root(None, tmp_path)
    assert generality_set.digest(root) == generality_set.FROZEN_DIGEST, (
        "the generality set changed: bump VERSION, re-freeze FROZEN_DIGEST and re-measure bench.generality")
    assert adapter.categories(root) == list(generality_set.CATEGORIES)
    files = adapter.scan(root, "grass")
    assert len(files.train) == generality_set.N_TRAIN
    defects = sorted({item.defect for item in files.test})
    assert defects == sorted(("good", *generality_set.GENERALITY_DEFECTS))
    assert all(item.mask is not None for item in files.test if item.defect != "good")


def test_a_leftover_partial_folder_is_refused_with_the_fix(tmp_path):
    root = generality_set.dataset_root(tmp_path)
    root.mkdir(parents=True)
    (root / "stray.txt").write_text("x")
    with pytest.raises(Exception, match="delete that folder"):
        get_adapter("generality").resolve_root(None, tmp_path)


class _FakeModel:
    """Stands in for a trained model in bench.generality.measure: only its config matters."""

    def __init__(self, config):
        self.config = config

    def to(self, device):
        return self

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("grid, val_by_blur, expected", [
    # blur 8 is best on validation; patch_size 5 needs its own training
    ([{}, {"blur_sigma": 4.0}, {"blur_sigma": 8.0}, {"patch_size": 5}], {2.0: 0.7, 4.0: 0.7, 8.0: 0.8}, 2),
    ([{}, {"blur_sigma": 4.0}], {2.0: 0.7, 4.0: 0.7}, 0),  # a tie keeps the preset
])
def test_candidates_are_chosen_on_validation_and_only_preset_and_chosen_are_tested(monkeypatch, grid, val_by_blur, expected):
    from types import SimpleNamespace

    from bench import generality as bench

    trainings, test_calls = [], []

    def train_local(method, config, data, group, seed, device):
        trainings.append((config.patch_size, seed))
        splits = [SimpleNamespace(category=c, val_images="val", val_masks=None, val_labels=None,
                                  test_images="test", test_masks=None, test_labels=None) for c in group]
        return _FakeModel(config), splits, 0.0

    def evaluate_split(model, images, masks, labels, position, batch_size, seed, device):
        if images == "test":
            test_calls.append((model.config.blur_sigma, seed))
            value = 0.1
        else:
            value = val_by_blur.get(model.config.blur_sigma, 0.6) if model.config.patch_size == 3 else 0.6
        return SimpleNamespace(metrics=SimpleNamespace(image_auroc=value))

    monkeypatch.setattr(get_method("patchcore"), "selection_grid", tuple(grid))
    monkeypatch.setattr(bench, "train_local", train_local)
    monkeypatch.setattr(bench, "build_model", lambda method, config: _FakeModel(config))
    monkeypatch.setattr(bench, "evaluate_split", evaluate_split)
    monkeypatch.setattr(bench, "calibrate_on_validation_normals", lambda *args: None)

    record = bench.measure("patchcore", 2, "smoke", "unused")
    assert record["selected"] == expected
    chosen_blur = 2.0 if expected == 0 else grid[expected]["blur_sigma"]
    categories = len(generality_set.CATEGORIES)
    # the preset on the test split, and the chosen one if it is another: nothing else
    tested = {2.0, chosen_blur}
    assert sorted(test_calls) == sorted([(blur, seed) for blur in tested for seed in range(2) for _ in range(categories)])
    # one training per (training settings, seed, category): inference-only candidates reuse it
    assert len(trainings) == len({(g.get("patch_size", 3)) for g in grid}) * 2 * categories
    assert record["chosen_test_image_auroc"] == {c: [0.1, 0.1] for c in generality_set.CATEGORIES}
    assert record["val_image_auroc"][expected]["brick"] == [val_by_blur[chosen_blur]] * 2
