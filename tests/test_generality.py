"""The frozen generality set (orchestrator/data/generality.py): a fourth defect family,
disjoint from training synthesis, validation defects and the synthetic test split; exact
masks; the generated files are the frozen ones."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from methods import METHODS, get_method
from orchestrator.data import generality, synthetic
from orchestrator.data.registry import get_adapter
from orchestrator.data.validation_defects import VALIDATION_DEFECTS


def test_generality_defects_are_disjoint_from_every_other_family():
    training = set().union(*(get_method(name).training_synthesis for name in METHODS))
    ours = set(generality.GENERALITY_DEFECTS)
    assert len(ours) == 3
    assert not ours & training
    assert not ours & set(VALIDATION_DEFECTS)
    assert not ours & set(synthetic.TEST_DEFECTS)


def test_generality_module_imports_no_other_family():
    tree = ast.parse(Path(generality.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m == "methods" or m.startswith("methods.") for m in imported), imported
    assert not imported & {"orchestrator.data.synthetic", "orchestrator.data.validation_defects"}, imported


@pytest.mark.parametrize("defect", generality.GENERALITY_DEFECTS)
def test_masks_are_exactly_the_visibly_changed_pixels(defect):
    photos = generality.load_photos()
    rng = np.random.default_rng(7)
    for category in generality.CATEGORIES:
        normal = generality.normal_image(photos[category], rng)
        image, mask = generality.draw_defect(defect, normal, rng)
        before = generality.to_uint8(normal)
        change = np.abs(image.astype(np.int16) - before).max(axis=2)
        assert mask.sum() >= generality.MIN_PIXELS
        assert (change[~mask] == 0).all(), "a pixel outside the mask changed"
        assert (change[mask] >= generality.CHANGE_TOLERANCE).all(), "a masked pixel did not visibly change"


def test_the_generated_set_is_the_frozen_one(tmp_path):
    adapter = get_adapter("generality")
    root = adapter.resolve_root(None, tmp_path)
    assert generality.digest(root) == generality.FROZEN_DIGEST, (
        "the generality set changed: bump VERSION, re-freeze FROZEN_DIGEST and re-measure bench.generality")
    assert adapter.categories(root) == list(generality.CATEGORIES)
    files = adapter.scan(root, "grass")
    assert len(files.train) == generality.N_TRAIN
    defects = sorted({item.defect for item in files.test})
    assert defects == sorted(("good", *generality.GENERALITY_DEFECTS))
    assert all(item.mask is not None for item in files.test if item.defect != "good")


def test_a_leftover_partial_folder_is_refused_with_the_fix(tmp_path):
    root = generality.dataset_root(tmp_path)
    root.mkdir(parents=True)
    (root / "stray.txt").write_text("x")
    with pytest.raises(Exception, match="delete that folder"):
        get_adapter("generality").resolve_root(None, tmp_path)
