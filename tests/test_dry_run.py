"""`dry_run=true`: every search space on every registered dataset (fake trees) prints its
plan in-process, and nothing is started or written."""

import pytest

from orchestrator import search_space as spaces
from orchestrator import sweep
from orchestrator.data.registry import DATASETS
from test_datasets import build_dagm, build_folder, build_mvtec_like, build_visa

BUILDERS = {
    "synthetic": None,
    "generality": None,  # generated into the cache like synthetic
    "mvtec_ad": lambda root: build_mvtec_like(root, "bottle"),
    "mpdd": lambda root: build_mvtec_like(root, "bracket_black"),
    "btad": lambda root: build_mvtec_like(root, "01", good="ok", defect="ko", suffix=".bmp", mask_name="{stem}.png", fmt="BMP"),
    "visa": build_visa,
    "dagm": build_dagm,
    "folder": build_folder,
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    return {name: (build(base / name) if build else None) for name, build in BUILDERS.items()}


def test_every_registered_dataset_has_a_fake_tree():
    assert set(BUILDERS) == set(DATASETS)


@pytest.mark.parametrize("dataset", sorted(BUILDERS))
def test_dry_run_of_every_space_on_every_dataset(dataset, roots, tmp_path, cache_dir, capsys):
    root = roots[dataset]
    for ablation in spaces.available():
        args = [f"ablation={ablation}", f"dataset={dataset}", "dry_run=true", f"storage_path={tmp_path / 'ray'}",
                f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"data.cache_dir={cache_dir}", "categories=null"]
        assert sweep.run(args + ([f"data.root={root}"] if root else [])) == {"dry_run": True}
        out = capsys.readouterr().out
        assert f"sweep {ablation}:" in out and "\ntrials: " in out and "\ntrainings: " in out and "per trial:" in out, out
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started, nothing written


def test_dry_run_counts_trials_and_trainings(tmp_path, cache_dir, capsys):
    base = [f"storage_path={tmp_path / 'ray'}", f"data.cache_dir={cache_dir}", "dry_run=true"]
    sweep.run(["ablation=transfusion_final_mask", "seeds=2", *base])
    out = capsys.readouterr().out
    assert "trials: 8 (grid: 4 points x categories x 2 seeds)" in out  # one category (washer)
    assert "trainings: 2 distinct models" in out  # final_mask is inference-only: one model per training seed
    sweep.run(["ablation=transfusion_steps", *base])
    assert "trainings: 4 distinct models" in capsys.readouterr().out  # steps change the trained model
    sweep.run(["ablation=transfusion_lambda", *base])
    assert "every axis is inference-only" in capsys.readouterr().out
