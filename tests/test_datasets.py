"""Real-dataset adapters (VisA, BTAD, MPDD, DAGM, folder) and the data CLI
(``python -m orchestrator.data``), on tiny fake trees built in tmp_path (32-px images)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import orchestrator.data.synthetic as synthetic_module
from orchestrator.data import DATASETS, Preprocess, list_categories, load_category
from orchestrator.data.__main__ import main
from orchestrator.errors import DatasetError

SIZE = 32
REPO = Path(__file__).resolve().parents[1]


def save(path: Path, array: np.ndarray, format: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=format)
    return path


def image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def block_mask(value: int, size: int = SIZE) -> np.ndarray:
    """``value`` on [8:24, 8:24], zero elsewhere."""
    mask = np.zeros((size, size), np.uint8)
    mask[8:24, 8:24] = value
    return mask


EXPECTED_MASK = block_mask(1)[::2, ::2]  # the block at Preprocess(16), nearest


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for the module, so the offline texture bank is built once."""
    return tmp_path_factory.mktemp("datasets_cache")


def load(dataset: str, root: Path, category: str, cache: Path):
    return load_category(dataset, category, Preprocess(16), root=root, cache_dir=cache)


def message(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- fake trees


def build_visa(root: Path, categories=("candle", "pcb1")) -> Path:
    """Original VisA release: split_csv/1cls.csv; 4 train normals, 1 test normal, 2 anomalies
    per object (JPEG images, masks with value 1 like VisA's)."""
    rng = np.random.default_rng(0)
    rows = []
    for category in categories:
        base = Path(category) / "Data"
        for i in range(5):
            rel = base / "Images" / "Normal" / f"{i:04d}.JPG"
            save(root / rel, image(rng), "JPEG")
            rows.append([category, "train" if i < 4 else "test", "normal", str(rel), ""])
        for i in range(2):
            rel, mask = base / "Images" / "Anomaly" / f"{i:03d}.JPG", base / "Masks" / "Anomaly" / f"{i:03d}.png"
            save(root / rel, image(rng), "JPEG")
            save(root / mask, block_mask(1 if i == 0 else 255))
            rows.append([category, "test", "anomaly", str(rel), str(mask)])
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def build_mvtec_like(root: Path, category: str, good: str = "good", defect: str = "broken", suffix: str = ".png",
                     mask_name: str = "{stem}_mask.png", fmt: str | None = None) -> Path:
    """4 train/<good>, 1 test/<good>, 2 test/<defect> with masks ground_truth/<defect>/<mask_name>."""
    rng = np.random.default_rng(1)
    folder = root / category
    for i in range(4):
        save(folder / "train" / good / f"{i:03d}{suffix}", image(rng), fmt)
    save(folder / "test" / good / f"000{suffix}", image(rng), fmt)
    for i in range(2):
        save(folder / "test" / defect / f"{i:03d}{suffix}", image(rng), fmt)
        save(folder / "ground_truth" / defect / mask_name.format(stem=f"{i:03d}"), block_mask(255))
    return root


def build_dagm(root: Path, classes=("Class1", "Class10", "Class2")) -> Path:
    """Train: 4 images, 0003 defective; Test: 4 images, 0001 and 0002 defective."""
    rng = np.random.default_rng(2)
    for name in classes:
        for split, defective in (("Train", {3}), ("Test", {1, 2})):
            folder = root / name / split
            lines = ["4"]
            for i in range(4):
                stem = f"{i:04d}"
                save(folder / f"{stem}.PNG", rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
                if i in defective:
                    save(folder / "Label" / f"{stem}_label.PNG", block_mask(255))
                    lines.append(f"{i + 1}\t1\t{stem}.PNG\t0\t{stem}_label.PNG")
                else:
                    lines.append(f"{i + 1}\t0\t{stem}.PNG\t0\t")
            (folder / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")
    return root


def build_folder(root: Path, test_normal: bool = False, nested: bool = False) -> Path:
    """normal/ (5 images), abnormal/ (2, or 1 in abnormal/scratch/ + 1 directly), masks/."""
    rng = np.random.default_rng(3)
    for i in range(5):
        save(root / "normal" / f"n{i}.png", image(rng))
    if test_normal:
        save(root / "test_normal" / "t0.png", image(rng))
    save(root / "abnormal" / "a0.png", image(rng))
    save(root / "masks" / "a0_mask.png", block_mask(255))
    sub = "scratch/" if nested else ""
    save(root / "abnormal" / f"{sub}a1.png", image(rng))
    save(root / "masks" / f"{sub}a1.png", block_mask(255))
    return root


# --------------------------------------------------------------------------- VisA


def test_visa_original_release(tmp_path, cache):
    root = build_visa(tmp_path / "visa")
    assert list_categories("visa", root) == ["candle", "pcb1"]
    assert not DATASETS["visa"].is_texture("candle")
    data = load("visa", root, "pcb1", cache)
    assert len(data.train_images) + len(data.val_images) // 2 == 4
    assert data.test_defect_types == ["good", "anomaly", "anomaly"] and data.test_labels.tolist() == [0, 1, 1]
    # A value-1 mask (VisA style) and a value-255 one both binarise to the block.
    np.testing.assert_array_equal(data.test_masks[1], EXPECTED_MASK)
    np.testing.assert_array_equal(data.test_masks[2], EXPECTED_MASK)
    assert data.test_masks[0].sum() == 0


def test_visa_defect_names_from_image_anno(tmp_path):
    root = build_visa(tmp_path / "visa", categories=("candle",))
    with (root / "candle" / "image_anno.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image", "label", "mask"], ["candle/Data/Images/Anomaly/000.JPG", "wax melded,spot", "x"]])
    defects = [item.defect for item in DATASETS["visa"].scan(root, "candle").test]
    assert defects == ["good", "wax melded+spot", "anomaly"]


def test_visa_converted_tree(tmp_path, cache):
    root = build_mvtec_like(tmp_path / "visa_pytorch", "capsules", defect="bad", mask_name="{stem}.png")
    assert list_categories("visa", root) == ["capsules"]
    data = load("visa", root, "capsules", cache)
    assert data.test_defect_types == ["bad", "bad", "good"]
    np.testing.assert_array_equal(data.test_masks[0], EXPECTED_MASK)


def test_visa_errors(tmp_path):
    with pytest.raises(DatasetError, match="needs data.root"):
        list_categories("visa", None)
    with pytest.raises(DatasetError) as excinfo:
        list_categories("visa", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message(excinfo) and "1cls.csv" in message(excinfo)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as excinfo:
        list_categories("visa", tmp_path / "empty")
    assert str(tmp_path / "empty" / "split_csv" / "1cls.csv") in message(excinfo) and "converted" in message(excinfo)

    root = build_visa(tmp_path / "visa")
    csv_path = root / "split_csv" / "1cls.csv"
    text = csv_path.read_text()
    csv_path.rename(root / "split_csv" / "2cls.csv")
    with pytest.raises(DatasetError) as excinfo:
        list_categories("visa", root)
    assert f"{csv_path} is missing" in message(excinfo)

    csv_path.write_text(text.replace("object,split,label,image,mask", "object,split,kind,image"))
    with pytest.raises(DatasetError) as excinfo:
        list_categories("visa", root)
    assert str(csv_path) in message(excinfo) and "label, mask" in message(excinfo) and "object,split,label,image,mask" in message(excinfo)

    lines = text.splitlines()
    broken = [line for line in lines if "Anomaly/001" in line][0]
    csv_path.write_text("\n".join(line if line != broken else broken.rsplit(",", 1)[0] + "," for line in lines) + "\n")
    with pytest.raises(DatasetError) as excinfo:
        DATASETS["visa"].scan(root, "candle")
    assert "candle/Data/Images/Anomaly/001.JPG has no mask" in message(excinfo)

    csv_path.write_text(text)
    (root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png").unlink()
    with pytest.raises(DatasetError, match="Anomaly/000.JPG has no mask: expected .*Masks/Anomaly/000.png"):
        DATASETS["visa"].scan(root, "candle")
    with pytest.raises(DatasetError, match="'bottle' not in .*found: candle, pcb1"):
        DATASETS["visa"].scan(root, "bottle")


# --------------------------------------------------------------------------- BTAD, MPDD


def test_btad_bmp_images_png_masks(tmp_path, cache):
    root = build_mvtec_like(tmp_path / "btad", "01", good="ok", defect="ko", suffix=".bmp", mask_name="{stem}.png", fmt="BMP")
    build_mvtec_like(root, "03", good="ok", defect="ko", mask_name="{stem}.png")
    assert list_categories("btad", root) == ["01", "03"]
    assert not any(DATASETS["btad"].is_texture(c) for c in ("01", "02", "03"))
    data = load("btad", root, "01", cache)
    assert data.test_defect_types == ["ko", "ko", "good"] and data.test_labels.tolist() == [1, 1, 0]
    np.testing.assert_array_equal(data.test_masks[1], EXPECTED_MASK)
    (root / "03" / "ground_truth" / "ko" / "001.png").unlink()
    with pytest.raises(DatasetError) as excinfo:
        DATASETS["btad"].scan(root, "03")
    assert f"{root / '03' / 'test' / 'ko' / '001.png'} has no mask: expected {root / '03' / 'ground_truth' / 'ko' / '001.png'}" in message(excinfo)
    with pytest.raises(DatasetError, match="train/ok"):
        list_categories("btad", tmp_path / "missing")


def test_mpdd_is_an_mvtec_tree_of_objects(tmp_path, cache):
    root = build_mvtec_like(tmp_path / "mpdd", "metal_plate")
    assert list_categories("mpdd", root) == ["metal_plate"] and not DATASETS["mpdd"].is_texture("metal_plate")
    data = load("mpdd", root, "metal_plate", cache)
    assert data.test_labels.tolist() == [1, 1, 0]
    np.testing.assert_array_equal(data.test_masks[0], EXPECTED_MASK)


# --------------------------------------------------------------------------- DAGM


def test_dagm_protocol(tmp_path, cache):
    root = build_dagm(tmp_path / "dagm")
    (root / "notes").mkdir()
    assert list_categories("dagm", root) == ["Class1", "Class2", "Class10"]
    assert DATASETS["dagm"].is_texture("Class1")
    files = DATASETS["dagm"].scan(root, "Class1")
    assert [p.name for p in files.train] == ["0000.PNG", "0001.PNG", "0002.PNG"]  # the defective 0003 is not trained on
    assert [(i.image.name, i.defect, i.mask.name if i.mask else None) for i in files.test] == [
        ("0000.PNG", "good", None), ("0001.PNG", "defect", "0001_label.PNG"), ("0002.PNG", "defect", "0002_label.PNG"), ("0003.PNG", "good", None)]
    data = load("dagm", root, "Class10", cache)
    assert data.test_labels.tolist() == [0, 1, 1, 0] and data.test_images.shape == (4, 3, 16, 16)
    np.testing.assert_array_equal(data.test_masks[1], EXPECTED_MASK)


def test_dagm_errors(tmp_path):
    root = build_dagm(tmp_path / "dagm", classes=("Class1",))
    labels = root / "Class1" / "Test" / "Label" / "Labels.txt"
    (root / "Class1" / "Test" / "Label" / "0002_label.PNG").unlink()
    with pytest.raises(DatasetError) as excinfo:
        DATASETS["dagm"].scan(root, "Class1")
    assert f"{root / 'Class1' / 'Test' / '0002.PNG'} has no mask" in message(excinfo) and "0002_label.PNG" in message(excinfo)
    text = labels.read_text()
    labels.write_text(text + "5\tyes\n")
    with pytest.raises(DatasetError, match="Labels.txt line 6: expected 'index flag"):
        DATASETS["dagm"].scan(root, "Class1")
    labels.unlink()
    with pytest.raises(DatasetError, match=f"{labels} is missing"):
        DATASETS["dagm"].scan(root, "Class1")
    with pytest.raises(DatasetError, match=f"set data.root={root}"):
        list_categories("dagm", root / "Class1")


# --------------------------------------------------------------------------- folder


def test_folder_single_category_holds_out_normals(tmp_path, cache):
    root = build_folder(tmp_path / "parts")
    assert list_categories("folder", root) == ["parts"]
    files = DATASETS["folder"].scan(root, "parts")
    assert len(files.train) == 4 and [i.defect for i in files.test] == ["good", "abnormal", "abnormal"]
    held = files.test[0].image
    assert held.parent.name == "normal" and held not in files.train
    assert DATASETS["folder"].scan(root, "parts") == files  # deterministic
    data = load("folder", root, "parts", cache)
    np.testing.assert_array_equal(data.test_masks[1], EXPECTED_MASK)  # a0 via masks/a0_mask.png


def test_folder_several_categories_test_normal_and_defect_folders(tmp_path):
    root = tmp_path / "mine"
    build_folder(root / "a", test_normal=True, nested=True)
    build_folder(root / "b")
    assert list_categories("folder", root) == ["a", "b"]
    files = DATASETS["folder"].scan(root, "a")
    assert len(files.train) == 5
    assert [(i.image.name, i.defect, i.mask.name if i.mask else None) for i in files.test] == [
        ("t0.png", "good", None), ("a0.png", "abnormal", "a0_mask.png"), ("a1.png", "scratch", "a1.png")]


def test_folder_errors(tmp_path):
    root = build_folder(tmp_path / "parts")
    (root / "masks" / "a1.png").unlink()
    with pytest.raises(DatasetError) as excinfo:
        DATASETS["folder"].scan(root, "parts")
    assert f"{root / 'abnormal' / 'a1.png'} has no mask: expected {root / 'masks' / 'a1.png'}" in message(excinfo)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="no normal/ folder in"):
        list_categories("folder", tmp_path / "plain")
    only = tmp_path / "only"
    save(only / "normal" / "n0.png", image(np.random.default_rng(0)))
    save(only / "normal" / "n1.png", image(np.random.default_rng(1)))
    with pytest.raises(DatasetError, match="abnormal is missing or holds no images"):
        DATASETS["folder"].scan(only, "only")


# --------------------------------------------------------------------------- CLI


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list(tmp_path, capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and all(name in out for name in ("mvtec_ad", "visa", "btad", "mpdd", "dagm", "folder", "synthetic"))
    root = build_dagm(tmp_path / "dagm", classes=("Class1", "Class2"))
    code, out, _ = run(capsys, "list", "dataset=dagm", f"data.root={root}", "categories=[Class2]")
    assert code == 0 and "Class1" not in out
    assert out.splitlines()[-1].split() == ["Class2", "3", "2", "2", "yes"]  # train, test good, test anomalous, texture


def test_cli_verify(tmp_path, capsys):
    root = build_visa(tmp_path / "visa")
    code, out, err = run(capsys, "verify", "dataset=visa", f"data.root={root}")
    assert code == 0, err
    assert "visa/candle: train 4 | test good 1 | test anomalous 2 (anomaly 2): ok" in out
    assert "verified 2 categories" in out and "18 files decoded" in out

    mask = root / "pcb1" / "Data" / "Masks" / "Anomaly" / "001.png"
    save(mask, np.zeros((16, 20), np.uint8))
    code, out, err = run(capsys, "verify", "dataset=visa", f"data.root={root}", "categories=[pcb1]")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: mask {mask} is 20x16 but its image ") and "32x32" in err

    save(mask, block_mask(1))
    train = root / "candle" / "Data" / "Images" / "Normal" / "0002.JPG"
    train.write_bytes(train.read_bytes()[:200])
    code, _, err = run(capsys, "verify", "dataset=visa", f"data.root={root}")
    assert code == 2 and err.count("\n") == 1 and f"corrupt or truncated image {train}" in err

    code, _, err = run(capsys, "verify", "dataset=visa", f"data.root={root}", "categories=[capsules]")
    assert code == 2 and "unknown category capsules" in err and "valid: candle, pcb1" in err
    code, _, err = run(capsys, "verify", "dataset=nope")
    assert code == 2 and "unknown dataset 'nope'" in err
    code, _, err = run(capsys, "verify", "datset=visa")
    assert code == 2 and "unknown key 'datset'" in err


def test_cli_prepare_builds_the_cache_a_sweep_reads(tmp_path, cache, capsys, monkeypatch):
    root = build_mvtec_like(tmp_path / "btad", "02", good="ok", defect="ko", mask_name="{stem}.png")
    code, out, err = run(capsys, "prepare", "dataset=btad", f"data.root={root}", f"data.cache_dir={cache}", "image_size=16")
    assert code == 0, err
    assert "btad/02 at r16: train 3, val 2, test 3" in out
    import orchestrator.data.cache as cache_module

    monkeypatch.setattr(cache_module, "decode_category", lambda *a, **k: pytest.fail("prepare did not fill the cache"))
    monkeypatch.setattr("orchestrator.data.decode_category", lambda *a, **k: pytest.fail("prepare did not fill the cache"))
    assert load("btad", root, "02", cache).test_labels.tolist() == [1, 1, 0]
    # Without image_size the method's preprocessing at the scale is used (TransFusion paper: 256, crop 224).
    code, _, err = run(capsys, "prepare", "dataset=btad", f"data.root={root}", f"data.cache_dir={cache}", "crop_size=8")
    assert code == 2 and "needs image_size" in err
    code, _, err = run(capsys, "prepare", "dataset=btad", f"data.root={root}", "out=x")
    assert code == 2 and "out= is not used by prepare" in err


def test_cli_make_synthetic(tmp_path, capsys, monkeypatch):
    written = []
    monkeypatch.setattr(synthetic_module, "generate", lambda root, seed=0: written.append(root) or root)
    code, out, _ = run(capsys, "make-synthetic", f"out={tmp_path / 'syn'}")
    assert code == 0 and written == [tmp_path / "syn"] and str(tmp_path / "syn") in out
    code, out, _ = run(capsys, "make-synthetic", f"data.cache_dir={tmp_path / 'c'}")
    assert code == 0 and written[-1] == synthetic_module.dataset_root(tmp_path / "c")


def test_cli_usage(capsys):
    assert run(capsys, "--help")[0] == 0
    assert run(capsys, )[0] == 2
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "valid: list, verify, prepare, make-synthetic" in err


def test_cli_subprocess_exit_codes(tmp_path):
    root = build_folder(tmp_path / "parts")
    command = [sys.executable, "-m", "orchestrator.data", "verify", "dataset=folder", f"data.root={root}"]
    ok = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "folder/parts: train 4 | test good 1 | test anomalous 2 (abnormal 2): ok" in ok.stdout
    (root / "abnormal" / "a0.png").write_bytes(b"not an image")
    bad = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == f"error: corrupt or truncated image {root / 'abnormal' / 'a0.png'} (cannot identify image file {str(root / 'abnormal' / 'a0.png')!r}); re-extract or replace that file"
