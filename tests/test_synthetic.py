"""The embedded synthetic dataset: deterministic, MVTec layout, exact masks, not trivial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from orchestrator.data import DATASETS, Preprocess, list_categories, load_category, synthetic
from orchestrator.errors import DatasetError


@pytest.fixture(scope="module")
def generated(cache_dir) -> Path:
    """The dataset as ``root=None`` makes it, in the session cache (shared with the e2e tests)."""
    list_categories("synthetic", None, cache_dir)
    return synthetic.dataset_root(cache_dir)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generated_once_in_mvtec_layout(generated, cache_dir):
    assert generated == Path(cache_dir) / "synthetic" / f"{synthetic.VERSION}-seed{synthetic.SEED}"
    assert list_categories("synthetic", None, cache_dir) == ["brick", "gravel", "washer"]
    adapter = DATASETS["synthetic"]
    assert {c for c in synthetic.CATEGORIES if adapter.is_texture(c)} == {"brick", "gravel"}
    assert not adapter.is_texture("washer")
    for category, defects in synthetic.CATEGORIES.items():
        folder = generated / category
        assert len(list((folder / "train" / "good").glob("*.png"))) == synthetic.N_TRAIN
        assert sorted(p.name for p in (folder / "test").iterdir()) == sorted([*defects, "good"])
        n_test = sum(len(list(d.glob("*.png"))) for d in (folder / "test").iterdir())
        assert 50 <= n_test <= 70 and len(defects) >= 3
        assert not (folder / "ground_truth" / "good").exists()
        for defect in defects:
            for image in sorted((folder / "test" / defect).glob("*.png")):
                mask = np.asarray(Image.open(folder / "ground_truth" / defect / f"{image.stem}_mask.png"))
                assert mask.shape == (synthetic.SIZE, synthetic.SIZE) and set(np.unique(mask)) == {0, 255}


def test_same_seed_same_bytes(generated, tmp_path):
    again = synthetic.generate(tmp_path / "copy", synthetic.SEED)
    assert file_bytes(again) == file_bytes(generated)
    # A second call finds it complete and writes nothing.
    stamp = (again / ".complete").stat().st_mtime_ns
    synthetic.generate(again, synthetic.SEED)
    assert (again / ".complete").stat().st_mtime_ns == stamp


def test_other_seed_other_images():
    photos = synthetic.load_photos()
    for category in synthetic.CATEGORIES:
        a = synthetic.make_sample(category, "good", np.random.default_rng([0, 1]), photos)
        b = synthetic.make_sample(category, "good", np.random.default_rng([1, 1]), photos)
        assert not np.array_equal(synthetic.to_uint8(a.image), synthetic.to_uint8(b.image))


@pytest.mark.parametrize("category", sorted(synthetic.CATEGORIES))
def test_masks_are_exactly_the_defect_pixels(category):
    photos = synthetic.load_photos()
    rng = np.random.default_rng(7)
    good = synthetic.make_sample(category, "good", rng, photos)
    assert not good.mask.any() and np.array_equal(good.image, good.normal)
    for defect in synthetic.CATEGORIES[category]:
        for _ in range(4):
            sample = synthetic.make_sample(category, defect, rng, photos)
            changed = (synthetic.to_uint8(sample.image) != synthetic.to_uint8(sample.normal)).any(-1)
            assert sample.mask.any()
            assert not (changed & ~sample.mask).any(), f"{category}/{defect} changed pixels outside its mask"
            assert (changed & sample.mask).sum() >= 0.9 * sample.mask.sum(), f"{category}/{defect} mask covers unchanged pixels"


def test_loads_through_the_cache_and_is_not_trivial(generated, cache_dir, monkeypatch):
    """Labels and masks line up, and a mean-intensity detector is far from perfect."""
    aurocs = {}
    for category in synthetic.CATEGORIES:
        data = load_category("synthetic", category, Preprocess(32), cache_dir=cache_dir)
        good = np.array([d == "good" for d in data.test_defect_types])
        assert (data.test_labels == ~good).all() and 0.3 <= good.mean() <= 0.6
        assert data.test_masks[good].sum() == 0
        assert (data.test_masks[~good].reshape((~good).sum(), -1).sum(1) > 0).all()
        intensity = data.train_images.reshape(len(data.train_images), -1).mean(1)
        score = np.abs(data.test_images.reshape(len(data.test_images), -1).mean(1) - intensity.mean())
        aurocs[category] = roc_auc_score(data.test_labels, score)
    assert max(aurocs.values()) < 0.9, aurocs

    # Second call: neither generation nor decoding.
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded a PNG on a cached load"))
    monkeypatch.setattr(synthetic, "make_sample", lambda *a, **k: pytest.fail("regenerated the dataset"))
    assert load_category("synthetic", "washer", Preprocess(32), cache_dir=cache_dir).test_images.shape[-1] == 32


def test_incomplete_folder_is_an_error(tmp_path):
    (tmp_path / "half" / "brick").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"{tmp_path / 'half'} exists but is not a complete synthetic dataset"):
        synthetic.generate(tmp_path / "half")
