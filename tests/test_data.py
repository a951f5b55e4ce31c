"""Dataset layer: MVTec-layout loading, preprocessing, cache, validation split, errors,
foreground masks and texture bank, on tiny trees built in tmp_path (32-px PNGs)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import orchestrator.data.cache as cache_module
import orchestrator.data.textures as textures_module
from orchestrator.data import DATASETS, ForegroundMode, Preprocess, list_categories, load_category, texture_bank, to_unit_range
from orchestrator.data.cache import cache_folder
from orchestrator.data.foreground import estimate_foreground
from orchestrator.errors import ConfigError, DatasetError

SIZE = 32
N_TRAIN = 6


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def object_image(rng: np.random.Generator) -> np.ndarray:
    """A red disk on a grey background, with per-image noise so every image is distinct."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image = np.full((SIZE, SIZE, 3), 60.0) + rng.normal(0, 2, (SIZE, SIZE, 3))
    image[np.hypot(yy - 16, xx - 16) <= 9] = [200, 40, 40]
    return np.clip(image, 0, 255).astype(np.uint8)


def texture_image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def build_tree(root: Path, seed: int = 0, test_offset: int = 0) -> Path:
    """<root>/{bottle (object), carpet (texture)}: 6 train/good, 2 test/good, 2 test/broken.
    broken/000 has a 0/255 mask on [8:24, 8:24]; broken/001 a value-128 mask on [0:8, 0:8].
    ``test_offset`` changes only the test images (same training images)."""
    for category, make in (("bottle", object_image), ("carpet", texture_image)):
        rng = np.random.default_rng(seed)
        folder = root / category
        for i in range(N_TRAIN):
            save_png(folder / "train" / "good" / f"{i:03d}.png", make(rng))
        test_rng = np.random.default_rng(seed + 1000 + test_offset)
        for i in range(2):
            save_png(folder / "test" / "good" / f"{i:03d}.png", make(test_rng))
            save_png(folder / "test" / "broken" / f"{i:03d}.png", make(test_rng))
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[8:24, 8:24] = 255
        save_png(folder / "ground_truth" / "broken" / "000_mask.png", mask)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[0:8, 0:8] = 128
        save_png(folder / "ground_truth" / "broken" / "001_mask.png", mask)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return build_tree(tmp_path / "mvtec")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache per module so the offline texture bank is built once."""
    return tmp_path_factory.mktemp("data_cache")


def load(root: Path, cache: Path, preprocess: Preprocess = Preprocess(16), **kwargs):
    return load_category("mvtec_ad", kwargs.pop("category", "bottle"), preprocess, root=root, cache_dir=cache, **kwargs)


def rows(images: np.ndarray) -> set[bytes]:
    return {np.ascontiguousarray(image).tobytes() for image in images}


class OpenCounter:
    """Counts PIL.Image.open calls (every image decode goes through it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls = 0
        original = Image.open

        def counting_open(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(Image, "open", counting_open)


# --------------------------------------------------------------------------- loading


def test_load_shapes_labels_and_masks(tree, shared_cache):
    data = load(tree, shared_cache)
    n_val = max(1, round(0.2 * N_TRAIN))
    assert data.train_images.shape == (N_TRAIN - n_val, 3, 16, 16) and data.train_images.dtype == np.uint8
    assert data.train_foreground.shape == (N_TRAIN - n_val, 1, 16, 16)
    assert data.test_images.shape == (4, 3, 16, 16)
    assert data.test_defect_types == ["broken", "broken", "good", "good"]
    assert data.test_labels.tolist() == [1, 1, 0, 0] and data.test_labels.dtype == np.int64
    assert data.test_masks.dtype == np.uint8 and set(np.unique(data.test_masks)) == {0, 1}
    # broken/000: the 16x16 block at [8:24] -> exactly [4:12] at half size (nearest).
    expected = np.zeros((16, 16), np.uint8)
    expected[4:12, 4:12] = 1
    np.testing.assert_array_equal(data.test_masks[0], expected)
    # broken/001: mask value 128 counts as anomalous.
    assert data.test_masks[1][:4, :4].all() and data.test_masks[1].sum() == 16
    # Good test images get all-zero masks.
    assert data.test_masks[2:].sum() == 0


def test_preprocess_resize_and_centre_crop(tree, shared_cache):
    data = load(tree, shared_cache, Preprocess(24, 16))
    assert data.test_images.shape[-2:] == (16, 16) and data.val_images.shape[-2:] == (16, 16)
    assert data.test_masks.shape[-2:] == (16, 16) and data.train_foreground.shape[-2:] == (16, 16)
    with Image.open(tree / "bottle" / "test" / "broken" / "000.png") as image:
        reference = np.asarray(image.convert("RGB").resize((24, 24), Image.BILINEAR))[4:20, 4:20].transpose(2, 0, 1)
    np.testing.assert_array_equal(data.test_images[0], reference)
    # The [8:24] block becomes [6:18] at 24 px and [2:14] after the crop offset of 4.
    ys, xs = np.nonzero(data.test_masks[0])
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (2, 13, 2, 13)
    # The crop removed part of broken/001's corner block: what is left sits at the corner.
    assert data.test_masks[1][0, 0] == 1 and data.test_masks[1].sum() == 4


def test_preprocess_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="crop_size"):
        Preprocess(16, 32)
    with pytest.raises(ConfigError, match="image_size"):
        Preprocess(4)


def test_to_unit_range_scales_to_minus_one_one(tree, shared_cache):
    values = np.array([[0, 127, 255]], np.uint8)
    out = to_unit_range(values)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[-1.0, 127 / 127.5 - 1, 1.0]]))
    torch.testing.assert_close(to_unit_range(torch.from_numpy(values)), out)
    data = load(tree, shared_cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read-only memory maps convert without a torch warning
        images = to_unit_range(data.test_images)
    assert images.shape == (4, 3, 16, 16) and images.min() >= -1 and images.max() <= 1


# --------------------------------------------------------------------------- cache


def test_second_load_decodes_nothing(tree, tmp_path, monkeypatch):
    first = load(tree, tmp_path / "cache")
    counter = OpenCounter(monkeypatch)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded a category that is cached")

    monkeypatch.setattr(cache_module, "decode_category", no_decode)
    monkeypatch.setattr("orchestrator.data.decode_category", no_decode)
    second = load(tree, tmp_path / "cache")
    assert counter.calls == 0
    assert isinstance(second.test_images, np.memmap)
    for name in ("train_images", "val_images", "val_masks", "val_labels", "test_images", "test_masks", "test_labels"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert first.test_defect_types == second.test_defect_types


def test_cache_key_follows_preprocessing_and_split(tree, tmp_path, monkeypatch):
    base = dict(dataset="mvtec_ad", root=tree, category="bottle", preprocess=Preprocess(16), val_fraction=0.2, seed=0, foreground="auto")
    key = cache_folder(tmp_path, **base)
    assert cache_folder(tmp_path, **base) == key
    for change in (dict(preprocess=Preprocess(16, 8)), dict(preprocess=Preprocess(20)), dict(val_fraction=0.3), dict(seed=1),
                   dict(foreground="off"), dict(category="carpet"), dict(root=tmp_path), dict(dataset="mpdd")):
        assert cache_folder(tmp_path, **{**base, **change}) != key, change
    # A new preprocessing really decodes again (and lands in its own folder).
    load(tree, tmp_path / "cache")
    counter = OpenCounter(monkeypatch)
    cropped = load(tree, tmp_path / "cache", Preprocess(16, 8))
    assert counter.calls > 0 and cropped.test_images.shape[-1] == 8
    assert len(list((tmp_path / "cache" / "arrays" / "mvtec_ad" / "bottle").iterdir())) == 2


def test_concurrent_preparation_is_safe(tree, tmp_path):
    results, errors = [], []

    def worker():
        try:
            results.append(load(tree, tmp_path / "cache"))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    np.testing.assert_array_equal(results[0].val_images, results[1].val_images)
    folder = tmp_path / "cache" / "arrays" / "mvtec_ad" / "bottle"
    # One complete cache folder, no temporary leftovers.
    assert [p.name for p in folder.iterdir()] == [cache_folder(tmp_path / "cache", "mvtec_ad", tree, "bottle", Preprocess(16), 0.2, 0, "auto").name]


def test_broken_cache_is_rebuilt(tree, tmp_path):
    expected = np.array(load(tree, tmp_path / "cache").test_images)  # a copy, not the memory map
    folder = cache_folder(tmp_path / "cache", "mvtec_ad", tree, "bottle", Preprocess(16), 0.2, 0, "auto")
    (folder / "test_images.npy").unlink()
    (folder / "test_images.npy").write_bytes(b"not an array")
    np.testing.assert_array_equal(load(tree, tmp_path / "cache").test_images, expected)


# --------------------------------------------------------------------------- validation split


def test_validation_split_is_disjoint_seeded_and_labelled(tree, shared_cache):
    full = load(tree, shared_cache, Preprocess(SIZE), val_fraction=0.34)
    n_val = round(0.34 * N_TRAIN)
    assert len(full.train_images) == N_TRAIN - n_val
    assert full.val_labels.tolist() == [0] * n_val + [1] * n_val
    normals, anomalous = full.val_images[:n_val], full.val_images[n_val:]
    # Held-out normals are training images not left in the training set.
    all_train = {np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1).tobytes() for p in sorted((tree / "bottle" / "train" / "good").iterdir())}
    assert rows(normals) <= all_train and not rows(normals) & rows(full.train_images)
    assert rows(normals) | rows(full.train_images) == all_train
    # Anomalous copies: non-empty masks, pixels changed inside the mask only; normals: empty masks.
    assert full.val_masks[:n_val].sum() == 0
    masks = full.val_masks[n_val:].astype(bool)
    assert (masks.reshape(n_val, -1).sum(1) > 0).all()
    changed = (anomalous.astype(int) - normals.astype(int)).any(1)
    assert (changed & masks).any() and not (changed & ~masks).any()
    assert not rows(full.val_images) & rows(full.test_images)
    # Another seed holds out (or makes) something else.
    other = load(tree, shared_cache, Preprocess(SIZE), val_fraction=0.34, seed=1)
    assert not np.array_equal(other.val_images, full.val_images)
    # At least one image is held out even for a tiny fraction.
    assert load(tree, shared_cache, Preprocess(SIZE), val_fraction=0.01).val_labels.tolist() == [0, 1]


def test_validation_split_never_reads_test(tmp_path, shared_cache):
    a = load(build_tree(tmp_path / "a"), shared_cache)
    b = load(build_tree(tmp_path / "b", test_offset=1), shared_cache)
    assert not np.array_equal(a.test_images, b.test_images)
    for name in ("train_images", "train_foreground", "val_images", "val_masks", "val_labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_val_fraction_that_leaves_no_training_images(tree, shared_cache):
    with pytest.raises(DatasetError, match="val_fraction=0.95"):
        load(tree, shared_cache, val_fraction=0.95)


# --------------------------------------------------------------------------- foreground


def test_foreground_auto_on_off(tree, shared_cache):
    assert DATASETS["mvtec_ad"].is_texture("carpet") and not DATASETS["mvtec_ad"].is_texture("bottle")
    bottle = load(tree, shared_cache)
    disk_fraction = np.pi * 9**2 / SIZE**2
    assert abs(bottle.train_foreground.mean() - disk_fraction) < 0.08
    assert load(tree, shared_cache, category="carpet").train_foreground.all()
    assert load(tree, shared_cache, foreground="off").train_foreground.all()
    np.testing.assert_array_equal(load(tree, shared_cache, foreground="on").train_foreground, bottle.train_foreground)
    with pytest.raises(ConfigError, match="valid: auto, on, off"):
        load(tree, shared_cache, foreground="yes")
    assert ForegroundMode.parse("on") is ForegroundMode.ON


def test_estimate_foreground_finds_a_disk_with_a_hole():
    yy, xx = np.mgrid[:64, :64]
    dist = np.hypot(yy - 30, xx - 34)
    disk = dist <= 20
    image = np.full((3, 64, 64), 40, np.uint8)
    image[:, disk] = np.array([180, 170, 60], np.uint8)[:, None]
    image[:, dist <= 3] = 40  # a small hole of background colour is filled
    fg = estimate_foreground(image)[0].astype(bool)
    iou = (fg & disk).sum() / (fg | disk).sum()
    assert iou > 0.95
    # A frame-filling object (border = object) falls back to all ones.
    assert estimate_foreground(np.full((3, 16, 16), 90, np.uint8)).all()


# --------------------------------------------------------------------------- errors


def message(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_error_missing_root(tmp_path, shared_cache):
    with pytest.raises(DatasetError) as excinfo:
        load(tmp_path / "nowhere", shared_cache)
    assert str(tmp_path / "nowhere") in message(excinfo) and "train/good" in message(excinfo)
    with pytest.raises(DatasetError, match="needs data.root"):
        list_categories("mvtec_ad", None)
    with pytest.raises(DatasetError, match="unknown dataset 'mvtec'; valid: .*mvtec_ad"):
        list_categories("mvtec", tmp_path)


def test_error_missing_category_lists_found(tree, shared_cache):
    assert list_categories("mvtec_ad", tree) == ["bottle", "carpet"]
    with pytest.raises(DatasetError) as excinfo:
        load(tree, shared_cache, category="zipper")
    assert "'zipper'" in message(excinfo) and str(tree) in message(excinfo) and "bottle, carpet" in message(excinfo)


def test_error_wrong_layout(tree, tmp_path, shared_cache):
    (tree / "bottle" / "train" / "good").rename(tree / "bottle" / "train" / "ok")
    with pytest.raises(DatasetError) as excinfo:
        load(tree, shared_cache)
    assert str(tree / "bottle" / "train" / "good") in message(excinfo) and "expected" in message(excinfo)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no categories under"):
        list_categories("mvtec_ad", tmp_path / "empty")
    with pytest.raises(DatasetError, match=f"set data.root={tree}"):
        list_categories("mvtec_ad", tree / "carpet")


def test_error_anomalous_image_without_mask(tree, shared_cache):
    mask = tree / "bottle" / "ground_truth" / "broken" / "001_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError) as excinfo:
        load(tree, shared_cache)
    assert str(tree / "bottle" / "test" / "broken" / "001.png") in message(excinfo) and f"expected {mask}" in message(excinfo)


def test_error_mask_size_mismatch(tree, shared_cache):
    mask = tree / "bottle" / "ground_truth" / "broken" / "000_mask.png"
    save_png(mask, np.zeros((16, 20), np.uint8))
    with pytest.raises(DatasetError) as excinfo:
        load(tree, shared_cache)
    assert str(mask) in message(excinfo) and "20x16" in message(excinfo) and "32x32" in message(excinfo)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_error_corrupt_or_truncated_image(tree, shared_cache, damage):
    path = tree / "bottle" / "train" / "good" / "003.png"
    payload = path.read_bytes()
    path.write_bytes(b"definitely not a png" if damage == "garbage" else payload[: len(payload) // 2])
    with pytest.raises(DatasetError) as excinfo:
        load(tree, shared_cache)
    assert str(path) in message(excinfo) and "corrupt or truncated" in message(excinfo)


# --------------------------------------------------------------------------- texture bank


def test_offline_texture_bank_is_cached(shared_cache, monkeypatch):
    bank = texture_bank(16, cache_dir=shared_cache)
    assert bank.ndim == 4 and bank.shape[1:] == (3, 16, 16) and len(bank) >= 20
    assert bank.dtype == torch.float32 and bank.min() >= -1 and bank.max() <= 1 and bank.std() > 0.1

    def no_build(size):
        raise AssertionError("rebuilt a cached texture bank")

    monkeypatch.setattr(textures_module, "_offline", no_build)
    torch.testing.assert_close(texture_bank(16, cache_dir=shared_cache), bank)


def test_texture_bank_from_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("banded/a.jpg", "banded/deeper/b.png", "dotted/c.png"):
        save_png(tmp_path / "dtd" / "images" / name, rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    (tmp_path / "dtd" / "images" / "labels.txt").write_text("not an image")
    bank = texture_bank(8, cache_dir=tmp_path / "cache", source=tmp_path / "dtd" / "images")
    assert bank.shape == (3, 3, 8, 8)
    # Adding a file changes the key: the bank is rebuilt with it.
    save_png(tmp_path / "dtd" / "images" / "dotted" / "d.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    assert texture_bank(8, cache_dir=tmp_path / "cache", source=tmp_path / "dtd" / "images").shape[0] == 4
    with pytest.raises(DatasetError, match=str(tmp_path / "missing")):
        texture_bank(8, cache_dir=tmp_path / "cache", source=tmp_path / "missing")
    (tmp_path / "blank").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        texture_bank(8, cache_dir=tmp_path / "cache", source=tmp_path / "blank")
