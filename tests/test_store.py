"""The model store's keys: they change exactly when what a model is trained from changes."""

import shutil

import pytest
import torch

from orchestrator.config import resolve_method_config
from orchestrator.data import DataSpec
from orchestrator.files import publish_folder
from orchestrator.model_store import PROJECT_ROOT, ModelStore, code_files, code_version, model_key


@pytest.fixture
def tree(tmp_path):
    """A copy of the project's sources, to edit without touching the real ones."""
    for folder in ("methods", "orchestrator"):
        shutil.copytree(PROJECT_ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_code_files_follow_the_method_imports():
    names = {str(p.relative_to(PROJECT_ROOT)) for p in code_files("transfusion", "synthetic")}
    assert {"methods/transfusion.py", "methods/base.py", "methods/unet.py", "methods/anomaly_synthesis.py",
            "orchestrator/training.py", "orchestrator/data/synthetic.py", "orchestrator/data/mvtec.py"} <= names
    assert not names & {"methods/mdps.py", "methods/drdc.py", "methods/diffusionad.py", "methods/__init__.py",
                        "orchestrator/data/visa.py", "orchestrator/data/registry.py", "orchestrator/sweep.py"}


def test_new_method_or_dataset_adapter_leaves_the_key_alone(tree):
    before = code_version("transfusion", "synthetic", tree)
    (tree / "methods" / "patchcore.py").write_text("from methods.base import AnomalyMethod\n")
    (tree / "methods" / "__init__.py").write_text((tree / "methods" / "__init__.py").read_text() + "\n# patchcore registered\n")
    (tree / "orchestrator" / "data" / "mpdd2.py").write_text("from orchestrator.data.mvtec import MVTecLayout\n")
    (tree / "orchestrator" / "data" / "registry.py").write_text((tree / "orchestrator" / "data" / "registry.py").read_text() + "\n# mpdd2\n")
    (tree / "methods" / "mdps.py").write_text((tree / "methods" / "mdps.py").read_text() + "\n# another method's edit\n")
    assert code_version("transfusion", "synthetic", tree) == before


def test_editing_the_method_loss_or_shared_code_changes_the_key(tree):
    before = code_version("transfusion", "synthetic", tree)
    source = tree / "methods" / "transfusion.py"
    text = source.read_text()
    assert "def consistency_loss" in text
    # L_c as the L1 instead of the L2 distance: a change of the training loss
    source.write_text(text.replace("def consistency_loss(", "def consistency_loss_l2(", 1)
                      + "\n\ndef consistency_loss(next_pred, next_true):\n    return (next_pred - next_true).abs().mean()\n")
    after_method = code_version("transfusion", "synthetic", tree)
    assert after_method != before
    loop = tree / "orchestrator" / "training.py"
    loop.write_text(loop.read_text() + "\n# a change to the training loop\n")
    assert code_version("transfusion", "synthetic", tree) != after_method


def test_model_key_covers_training_fields_and_data_but_not_inference_fields(tmp_path):
    config = resolve_method_config("transfusion", "smoke")
    data = DataSpec("synthetic", None, str(tmp_path), 0.2, 0)
    key = model_key("transfusion", config, data, ["washer"]).key
    assert model_key("transfusion", resolve_method_config("transfusion", "smoke", {"disc_weight": 0.5}), data, ["washer"]).key == key
    assert model_key("transfusion", resolve_method_config("transfusion", "smoke", {"steps": 5}), data, ["washer"]).key != key
    assert model_key("transfusion", config, DataSpec("synthetic", None, str(tmp_path), 0.3, 0), ["washer"]).key != key
    assert model_key("transfusion", config, DataSpec("synthetic", None, str(tmp_path), 0.2, 1), ["washer"]).key != key
    assert model_key("transfusion", config, data, ["brick"]).key != key


def test_store_publishes_whole_models(tmp_path):
    store = ModelStore(tmp_path)
    key = model_key("transfusion", resolve_method_config("transfusion", "smoke"), DataSpec("synthetic", None, str(tmp_path), 0.2, 0), ["washer"])
    assert not store.exists(key)
    store.save(key, {"w": torch.ones(2)}, {"epochs": 1})
    state, meta = store.load(key)
    assert torch.equal(state["w"], torch.ones(2)) and meta["key"] == key.key and meta["inputs"]["method"] == "transfusion"
    versions = tmp_path / store.folder(key) / "versions"
    assert [p.name for p in versions.iterdir()] == [meta["version"]]  # no temporary file left behind
    assert sorted(p.name for p in (tmp_path / store.folder(key)).iterdir()) == ["current", "versions"]
    assert sorted(p.name for p in (versions / meta["version"]).iterdir()) == ["meta.json", "model.pt"]


def test_publish_folder_replaces_an_incomplete_one(tmp_path):
    target = tmp_path / "x"
    target.mkdir()
    (target / "partial").write_text("crash")
    assert publish_folder(target, lambda f: (f / "done").write_text("ok"), is_complete=lambda f: (f / "done").exists())
    assert sorted(p.name for p in target.iterdir()) == ["done"]


def test_model_key_covers_every_training_input(tmp_path, monkeypatch):
    """DDP world size, the libraries' versions, the dataset's files, the backbone's weight file."""
    from orchestrator import model_store

    root = tmp_path / "data"
    (root / "bottle" / "train" / "good").mkdir(parents=True)
    image = root / "bottle" / "train" / "good" / "000.png"
    image.write_bytes(b"one")
    config = resolve_method_config("transfusion", "smoke")
    data = DataSpec("mvtec_ad", str(root), str(tmp_path / "cache"), 0.2, 0)
    key = model_key("transfusion", config, data, ["bottle"]).key
    assert model_key("transfusion", config, data, ["bottle"], workers=2).key != key
    image.write_bytes(b"changed")  # same name, other size: another dataset
    model_store.dataset_manifest.cache_clear()
    changed = model_key("transfusion", config, data, ["bottle"]).key
    assert changed != key
    monkeypatch.setattr(model_store, "package_versions", lambda: {"torch": "0.0", "diffusers": "0.0"})
    assert model_key("transfusion", config, data, ["bottle"]).key != changed
    drdc = resolve_method_config("drdc", "smoke")  # its backbone is a training input
    with_backbone = model_key("drdc", drdc, data, ["bottle"])
    assert with_backbone.inputs["backbone_file"].startswith(f"{drdc.backbone}: ")
    monkeypatch.setattr(model_store, "backbone_file_identity", lambda name: f"{name}: another file")
    assert model_key("drdc", drdc, data, ["bottle"]).key != with_backbone.key
