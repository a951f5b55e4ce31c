"""Reports from MLflow: which sweeps a table shows, honest leaderboards, the HTML site,
MLflow links, system tags and dataset inputs, and benchmark (method-as-axis) spaces.

Most tests write sweeps into a real SQLite MLflow store through tracking.py's own
writers (SweepRun, TrialRecorder) with made-up numbers, so they take seconds; the slow
ones read the session's one real tiny sweep (tests/conftest.py: tiny_sweep).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import tempfile
import time
from html.parser import HTMLParser

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from orchestrator import report, tracking
from orchestrator import search_space as spaces
from orchestrator.config import Settings, config_to_dict, flatten, resolve_method_config
from orchestrator.errors import ConfigError
from orchestrator.metrics import Metrics
from orchestrator.results import CategoryEvaluation, ModelEvaluation, TrialResult, tune_report
from orchestrator.storage import Storage

_serial = itertools.count()


@pytest.fixture
def uri(tmp_path, empty_store):
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def sample_png(tmp_path):
    path = tmp_path / "washer_001_anomalous.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 48, 3), dtype=np.uint8)).save(path)
    return str(path)


SPOOL = tempfile.mkdtemp(prefix="report-site-spool-")  # the writers' storage (nothing is spooled: the store is local)


def fake_sweep(uri: str, ablation: str, rows: dict[str, dict[str, float | None]], *, dataset: str = "synthetic",
               scale: str = "smoke", categories: tuple[str, ...] = ("washer",), overrides: str = "none", seed: int = 0,
               maps: list[str] = (), split_sizes: dict | None = None, status: str = "FINISHED") -> str:
    """A sweep recorded the way sweep.py records one: parent run, one child run per
    (row, category) with its params, final metrics and sample maps. ``rows`` maps a row
    label to {category: image AUROC in [0, 1], or None for a FAILED trial}. Returns its name."""
    space = spaces.load(ablation)
    name = f"{ablation}-{dataset}-{next(_serial):04d}"
    settings = Settings(ablation=ablation, method=space.method, dataset=dataset, scale=scale, categories=list(categories), seed=seed)
    parent = tracking.SweepRun(uri, ablation, Storage(SPOOL), name)
    parent.open({"ablation": ablation, "dataset": dataset, "scale": scale, "method": space.method, "git_commit": "0123456789abcdef-dirty",
                 "search": space.search, "selection_metric": space.metric, "method_overrides": overrides},
                {**flatten({"settings": config_to_dict(settings)}), "categories": ",".join(categories), "skipped_points": "none"}, resume=False)

    def trial_params(config):
        params = {"method": config["method"], "ablation": ablation, "dataset": dataset, "scale": scale, "seed": seed, "categories": config["category"]}
        if "train_seed" in config:
            params["train_seed"] = config["train_seed"]
        if space.conditions:
            params["condition"] = config["point"]
        return params

    description = tracking.dataset_description(dataset, None, split_sizes or {}, seed=seed)
    recorder = tracking.TrialRecorder(parent, {"ablation": ablation, "dataset": dataset}, description)
    for label, per_category in rows.items():
        method = label if space.is_benchmark else space.method
        for category, det, config in _trials(label, per_category, method):
            run_id = recorder.run_for(f"{name}/{label}/{category}/{config.get('train_seed')}", f"{label} · {category}")
            recorder.log(run_id, {"params": json.dumps(trial_params(config))}, step=0)
            if det is None:
                recorder.finish(run_id, ok=False, error="RuntimeError: boom")
                continue
            test = Metrics(image_auroc=det, pixel_auroc=det - 0.01, aupro=det - 0.1, pixel_ap=det / 2)
            evaluation = CategoryEvaluation(category, val=Metrics(det, det, det, det), test=test, images_per_second=12.5,
                                            latency_ms=4.0, sample_maps=list(maps))
            result = TrialResult(models=[ModelEvaluation([evaluation], train_seconds=1.0)], model_keys=["k"], models_trained=1)
            recorder.log(run_id, tune_report(result), step=1)
            recorder.finish(run_id, ok=True)
    parent.finish(status)
    assert parent.writer.flush(timeout=60) and parent.writer.spooled == 0
    time.sleep(0.02)  # distinct start times
    return name


def _trials(label: str, per_category: dict, method: str):
    """(category, det, trial config) per trial; a list of dets is one trial per training seed."""
    for category, det in per_category.items():
        config = {"point": label, "category": category, "method": method}
        if isinstance(det, list):
            yield from ((category, d, {**config, "train_seed": seed}) for seed, d in enumerate(det))
        else:
            yield category, det, config


FINAL_MASK = "transfusion_final_mask"
FM_ROWS = ["TransFusion (Eq. 10, λ = 0.95)", "Only M_1", "Only M_disc", "Only M_recon"]


def final_mask_rows(base: float, categories=("washer",)) -> dict[str, dict[str, float]]:
    return {label: {c: base - 0.01 * i for c in categories} for i, label in enumerate(FM_ROWS)}


# ------------------------------------------------------------------------------ sweep identity


def test_table_shows_the_latest_default_sweep_and_lists_the_others(uri, tmp_path):
    default = fake_sweep(uri, FINAL_MASK, final_mask_rows(0.80))
    shortened = fake_sweep(uri, FINAL_MASK, final_mask_rows(0.60), overrides="method.epochs=1")  # newer, with overrides
    selections = report.select(report.all_sweeps(FINAL_MASK, uri))
    assert [s.name for sel in selections for s in sel.sweeps] == [default]
    assert "no method overrides" in selections[0].reason

    report.write_reports(FINAL_MASK, uri, tmp_path / "reports")
    text = (tmp_path / "reports" / "ablations" / f"{FINAL_MASK}.md").read_text()
    assert default in text and shortened not in text
    assert "| TransFusion (Eq. 10, λ = 0.95) | 80.0 |" in text  # Det. of the default sweep, not the newer one

    index = report.write_site(uri, tmp_path / "site")
    page = (index.parent / "ablations" / f"{FINAL_MASK}.html").read_text()
    assert f"sweep={shortened}" in page  # listed, with how to pick it, but not in the tables

    # sweep=<name> reports exactly that sweep
    assert report.main([f"tracking_uri={uri}", f"out={tmp_path / 'pinned'}", f"sweep={shortened}"]) == 0
    pinned = (tmp_path / "pinned" / "ablations" / f"{FINAL_MASK}.md").read_text()
    assert shortened in pinned and default not in pinned and "| TransFusion (Eq. 10, λ = 0.95) | 60.0 |" in pinned
    assert "chosen with sweep=" in (tmp_path / "pinned" / "site" / "ablations" / f"{FINAL_MASK}.html").read_text()


def test_without_a_default_sweep_the_latest_is_shown_and_unknown_sweeps_fail(uri, tmp_path, capsys):
    fake_sweep(uri, FINAL_MASK, final_mask_rows(0.50), overrides="method.epochs=1")
    latest = fake_sweep(uri, FINAL_MASK, final_mask_rows(0.70), overrides="method.epochs=2")
    selection = report.select(report.all_sweeps(FINAL_MASK, uri))[0]
    assert selection.newest.name == latest and selection.identity.overrides == "method.epochs=2"
    assert report.main([f"tracking_uri={uri}", f"out={tmp_path}", "sweep=no-such-sweep"]) == 2
    assert "no sweep named 'no-such-sweep'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no sweep named"):
        report.select(report.all_sweeps(FINAL_MASK, uri), "nope")


def test_seeds_of_one_identity_give_mean_and_std(uri, tmp_path):
    fake_sweep(uri, FINAL_MASK, final_mask_rows(0.70), seed=0)
    fake_sweep(uri, FINAL_MASK, final_mask_rows(0.80), seed=1)
    fake_sweep(uri, FINAL_MASK, final_mask_rows(0.90), seed=1, overrides="method.steps=5")  # another identity: not mixed in
    selection = report.select(report.all_sweeps(FINAL_MASK, uri))[0]
    assert sorted(s.seed for s in selection.sweeps) == ["0", "1"] and "2 seeds" in selection.reason
    table, _, _, _ = report.build_table(spaces.load(FINAL_MASK), [selection])
    assert table.loc[FM_ROWS[0], "Synthetic Det."] == "75.0 ± 7.1"
    report.write_site(uri, tmp_path / "site")
    page = (tmp_path / "site" / "ablations" / f"{FINAL_MASK}.html").read_text()
    assert "75.0 ± 7.1" in page and "mean ± std over 2 seeds" in page


def test_training_seeds_of_one_sweep_give_mean_and_std(uri):
    rows = {label: {"washer": [0.70 - 0.01 * i, 0.80 - 0.01 * i]} for i, label in enumerate(FM_ROWS)}  # seeds=2
    fake_sweep(uri, FINAL_MASK, rows)
    (selection,) = report.select(report.all_sweeps(FINAL_MASK, uri))
    table, _, _, _ = report.build_table(spaces.load(FINAL_MASK), [selection])
    assert table.loc[FM_ROWS[0], "Synthetic Det."] == "75.0 ± 7.1" and table.loc[FM_ROWS[0], "Synthetic trials"] == "2"
    assert table.loc[FM_ROWS[1], "Synthetic Det."] == "-1.0 ± 7.1"
    assert table.loc[FM_ROWS[1], "Synthetic Δ Det. vs seed noise"] == "within noise"  # |Δ| 1 < 2·√(2·7.1²/2)


def test_one_seed_is_never_significant_and_agreement_is_reported(uri, tmp_path):
    # validation (= det in fake_sweep) ranks the rows as the test does: τ = +1, no regret
    fake_sweep(uri, FINAL_MASK, {label: {"washer": 0.9 - 0.1 * i} for i, label in enumerate(FM_ROWS)})
    (selection,) = report.select(report.all_sweeps(FINAL_MASK, uri))
    space = spaces.load(FINAL_MASK)
    table, _, notes, default = report.build_table(space, [selection])
    assert set(table["Synthetic Δ Det. vs seed noise"]) == {"", "n/a"}
    agreed = report.agreement(space, report.combine(space, selection, default))
    assert agreed.rows == 4 and agreed.tau == pytest.approx(1.0) and agreed.regret == 0.0 and not agreed.saturated
    assert any("Kendall τ +1.00" in n for n in notes)
    report.write_site(uri, tmp_path / "site")
    assert "Kendall τ +1.00" in (tmp_path / "site" / "ablations" / f"{FINAL_MASK}.html").read_text()


def test_a_constant_selection_metric_is_flagged_saturated(uri):
    fake_sweep(uri, FINAL_MASK, {label: {"washer": 1.0} for label in FM_ROWS})
    name = report.all_sweeps(FINAL_MASK, uri)[0].name
    (line,) = report.agreement_lines(spaces.load(FINAL_MASK), uri, name)
    assert "SATURATED" in line and "undefined" in line


# ------------------------------------------------------------------------------ paper vs ours


def test_every_metric_the_paper_reports_is_compared(uri, tmp_path, sample_png):
    """DiffusionAD Table VII reports det, pixel AUROC, loc, pixel AP and FPS on VisA."""
    rows = {"Norm-guided": {"candle": 0.90, "pcb1": 0.80}, "One-step": {"candle": 0.85, "pcb1": 0.75}}
    fake_sweep(uri, "diffusionad_paradigm", rows, dataset="visa", categories=("candle", "pcb1"), maps=[sample_png])
    space = spaces.load("diffusionad_paradigm")
    assert report.shown_metrics(space) == ["det", "loc", "pixel_auroc", "pixel_ap", "fps"]
    selection = report.select(report.all_sweeps("diffusionad_paradigm", uri))[0]
    comparison = report._comparison_table(space, selection, report.combine(space, selection, "Norm-guided"), "Norm-guided", None)
    titles = {g["title"]: g["columns"] for g in comparison["groups"]}
    assert titles == {"Det.": ["ours", "paper", "Δ"], "Loc.": ["ours", "paper", "Δ"], "pix. AUROC": ["ours", "paper", "Δ"],
                      "pix. AP": ["ours", "paper", "Δ"], "img/s": ["ours", "paper"]}
    default_row = comparison["rows"][0]
    assert default_row["label"] == "Norm-guided"
    assert [c["text"] for c in default_row["cells"][:3]] == ["85.0", "98.8", "-13.8"]  # ours (mean of 90, 80), paper, Δ
    one_step = comparison["rows"][1]
    assert [c["text"] for c in one_step["cells"][:2]] == ["80.0", "98.0"]  # the paper's absolute One-step number

    table, _, _, _ = report.build_table(space, [selection])
    assert {"VisA pix. AUROC", "VisA pix. AP", "VisA img/s", "paper VisA pix. AP", "paper VisA img/s"} <= set(table.columns)
    assert table.loc["One-step", "VisA Det."] == "-5.0"  # Δ to the default row, Table-4 layout


def test_paper_deltas_become_absolute_numbers(uri):
    space = spaces.load(FINAL_MASK)
    assert report.paper_value(space, "mvtec_ad", "Only M_1", "det", FM_ROWS[0], absolute=False) == -1.4
    assert report.paper_value(space, "mvtec_ad", "Only M_1", "det", FM_ROWS[0], absolute=True) == pytest.approx(97.8)
    assert report.paper_value(space, "mvtec_ad", FM_ROWS[0], "loc", FM_ROWS[0], absolute=True) == 94.3


# ------------------------------------------------------------------------------ leaderboards


def test_leaderboards_rank_only_comparable_complete_rows(uri, tmp_path):
    two = ("bottle", "cable")
    common = {"dataset": "mvtec_ad", "scale": "paper", "categories": two}
    fake_sweep(uri, FINAL_MASK, {FM_ROWS[0]: {"bottle": 0.90, "cable": 0.92}}, **common)  # transfusion: 91.0
    fake_sweep(uri, "drdc_fusion", {"spatio-temporal fusion (preset)": {"bottle": 0.95, "cable": 0.97}}, **common)  # drdc: 96.0
    fake_sweep(uri, "mdps_components", {"MDPS": {"bottle": 0.99, "cable": None}}, **common)  # cable FAILED
    fake_sweep(uri, "diffusionad_paradigm", {"Norm-guided": {"bottle": 0.99, "cable": 0.99}}, overrides="method.epochs=1", **common)
    fake_sweep(uri, FINAL_MASK, {FM_ROWS[0]: {"bottle": 0.99}}, dataset="mvtec_ad", scale="paper", categories=("bottle",))

    boards = report.leaderboards(uri)
    assert [(b.dataset, b.scale, b.categories) for b in boards] == [("mvtec_ad", "paper", "bottle"), ("mvtec_ad", "paper", "bottle,cable")]
    full = {r.method: r for r in boards[1].rows}
    assert full["drdc"].rank == 1 and full["transfusion"].rank == 2  # the bottle-only 99.0 is not ranked against them
    assert full["mdps"].rank is None and full["mdps"].failed == 1 and full["mdps"].missing == ["cable"]
    assert full["mdps"].values["det"] == pytest.approx(99.0)  # shown over what finished, flagged, never ranked
    assert full["diffusionad"].rank is None and full["diffusionad"].unranked == ["method overrides"]
    assert full["transfusion"].paper["det"] == 99.2 and full["drdc"].paper["det"] == 98.45
    assert boards[0].rows[0].rank == 1 and boards[0].rows[0].values["det"] == pytest.approx(99.0)

    report.write_leaderboard(uri, tmp_path, site=False)
    md = (tmp_path / "leaderboard.md").read_text()
    assert md.count("## MVTec AD · paper") == 1 and "### categories bottle,cable" in md and "### categories bottle\n" in md
    assert "| mdps | MVTec AD | paper | – |" in md and "| cable |" in md and "no finished result for cable" in md
    assert "| drdc | MVTec AD | paper | 1 | 96.0 |" in md
    csv = pd.read_csv(tmp_path / "leaderboard.csv")
    assert {"Rank", "Failed trials", "Missing categories", "Categories", "paper Det."} <= set(csv.columns)


def test_newest_sweep_per_method_wins_and_is_flagged(uri):
    fake_sweep(uri, FINAL_MASK, {FM_ROWS[0]: {"washer": 0.9}})
    fake_sweep(uri, FINAL_MASK, {FM_ROWS[0]: {"washer": None}}, status="FAILED")  # newer: its trial failed
    (board,) = report.leaderboards(uri)
    (row,) = board.rows
    assert row.failed == 1 and row.missing == ["washer"] and row.rank is None and math_isnan(row.values["det"])


def math_isnan(x: float) -> bool:
    return x != x


# ------------------------------------------------------------------------------ the site


class Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tables = 0
        self.body_rows = 0
        self._in_tbody = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("href", "src"):
                self.refs.append((tag, key, value or ""))
        self.tables += tag == "table"
        self._in_tbody = self._in_tbody or tag == "tbody"
        self.body_rows += tag == "tr" and self._in_tbody

    def handle_endtag(self, tag):
        self._in_tbody = self._in_tbody and tag != "tbody"


def test_site_is_self_contained_and_links_into_mlflow(uri, tmp_path, sample_png):
    fake_sweep(uri, FINAL_MASK, final_mask_rows(0.8), maps=[sample_png])
    fake_sweep(uri, "benchmark_synthetic", {"transfusion": {"washer": 0.7}, "drdc": {"washer": 0.8}}, maps=[sample_png])
    ui = "http://mlflow.example:8080"
    index = report.write_site(uri, tmp_path / "site", mlflow_ui_url=ui)
    pages = sorted(index.parent.rglob("*.html"))
    assert {p.relative_to(index.parent).as_posix() for p in pages} == {
        "index.html", "leaderboard.html", f"ablations/{FINAL_MASK}.html", "ablations/benchmark_synthetic.html"}
    for path in pages:
        page = Page(path.read_text())
        assert page.tables and page.body_rows, path
        for tag, attribute, value in page.refs:
            if value.startswith(("http://", "https://")):  # only plain links into the MLflow UI leave the site
                assert tag == "a" and value.startswith(ui + "/#/experiments/") and value.endswith("?workflowType=machine_learning"), value
            elif not value.startswith(("#", "data:")):
                target = (path.parent / value.split("#")[0]).resolve()
                assert target.is_file(), f"{path.name}: {tag} {attribute}={value} is missing"
    text = (index.parent / "ablations" / f"{FINAL_MASK}.html").read_text()
    assert text.count('src="transfusion_final_mask/maps/') == 4  # one map per row (one per trial here)
    assert "python -m orchestrator.sweep ablation=transfusion_final_mask dataset=synthetic" in text
    assert "git checkout 0123456789abcdef" in text and "uncommitted changes" in text
    assert "<script" not in text and "<style" not in text  # no inline JS; CSS only from static/
    bench = (index.parent / "ablations" / "benchmark_synthetic.html").read_text()
    assert "transfusion, diffusionad, mdps, drdc" in bench and "<td>drdc</td>" in bench
    board = (index.parent / "leaderboard.html").read_text()
    assert "benchmark_synthetic" in board and "Synthetic · smoke" in board


def test_html_is_escaped_not_concatenated(uri, tmp_path):
    rows = final_mask_rows(0.8)
    fake_sweep(uri, FINAL_MASK, rows, overrides="method.final_mask=<script>alert(1)</script>")
    report.write_site(uri, tmp_path / "site")
    text = (tmp_path / "site" / "ablations" / f"{FINAL_MASK}.html").read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text


def test_reproduce_command_spells_out_what_ran(uri):
    name = fake_sweep(uri, FINAL_MASK, final_mask_rows(0.8), seed=3, overrides="method.epochs=1 method.steps=5")
    (sweep,) = [s for s in report.all_sweeps(FINAL_MASK, uri) if s.name == name]
    command = report.reproduce_command(sweep)
    assert command.startswith("python -m orchestrator.sweep ablation=transfusion_final_mask dataset=synthetic ")
    for part in ("categories=[washer]", "scale=smoke", "seed=3", "trial.cpus=1.0", "method.epochs=1 method.steps=5"):
        assert part in command
    for where in ("tracking_uri", "storage_path", "cache_dir", "resume"):
        assert where not in command


# ------------------------------------------------------------------------------ tracking


def test_ui_links_open_the_training_runs_view():
    assert tracking.experiment_url(None, "3") == "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    assert tracking.run_url("http://h:1/", "3", "abc") == "http://h:1/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.run_url(None, "3", "abc", artifact="anomaly_maps/x.png").endswith("/runs/abc/artifacts/anomaly_maps/x.png?workflowType=machine_learning")
    assert "?workflowType=machine_learning" in tracking.review_hint("sqlite:////x.db", "3", "abc")


def test_runs_carry_system_tags_and_their_dataset_as_an_input(uri):
    fake_sweep(uri, FINAL_MASK, {FM_ROWS[0]: {"washer": 0.8}}, split_sizes={"washer": {"train": 80, "val": 40, "test": 60}})
    fake_sweep(uri, FINAL_MASK, {FM_ROWS[0]: {"washer": 0.8}})  # no split sizes from the sweep: not recorded
    client = tracking.client(uri)
    runs = tracking.search_runs(uri, FINAL_MASK)
    for _, run in runs.iterrows():
        for key in ("system.python", "system.torch", "system.ray", "system.mlflow", "system.cuda_available", "system.gpu"):
            assert isinstance(run[f"tags.{key}"], str) and run[f"tags.{key}"], key
    children = runs[runs["tags.kind"] == "trial"].sort_values("start_time")
    profiles = []
    for run_id in children["run_id"]:
        (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
        assert dataset_input.dataset.name == "synthetic/washer" and len(dataset_input.dataset.digest) == 16
        assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "train/val/test")]
        profiles.append(json.loads(dataset_input.dataset.profile))
    assert profiles[0]["splits"] == {"washer": {"train": 80, "val": 40, "test": 60}} and profiles[0]["categories"] == ["washer"]
    assert profiles[1]["splits"] == "not recorded" and profiles[1]["seed"] == 0


# ------------------------------------------------------------------------------ benchmark spaces


def test_shipped_benchmark_spaces_take_the_method_as_axis():
    smoke, paper = spaces.load("benchmark_synthetic"), spaces.load("benchmark_mvtec_ad")
    for space in (smoke, paper):
        assert space.is_benchmark and space.methods == ("transfusion", "diffusionad", "mdps", "drdc", "patchcore")
        assert space.grid_points() == [{"method": m} for m in space.methods]
        assert space.point_method({"method": "mdps"}) == ("mdps", {})
        assert space.axis_names == ("method",) and not space.axes and not space.conditions and space.fixed == {}
    assert smoke.dataset == "synthetic" and smoke.scale == "smoke" and smoke.categories is None
    assert paper.dataset == "mvtec_ad" and paper.scale == "paper" and len(paper.categories) == 15
    assert set(paper.paper["rows"]) <= set(paper.methods) and not paper.paper["delta"]
    for space in (smoke, paper):
        for method in space.methods:  # every method has a preset at the space's scale
            resolve_method_config(method, space.scale, space.fixed)
    # single-method spaces are unchanged
    steps = spaces.load("transfusion_steps")
    assert not steps.is_benchmark and steps.methods == () and steps.point_method({"steps": 5}) == ("transfusion", {"steps": 5})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"methods": ["transfusion", "nope"]}, "methods must be a non-empty list"),
        ({"methods": []}, "methods must be a non-empty list"),
        ({"methods": "transfusion"}, "methods must be a non-empty list"),
        ({"methods": ["mdps", "mdps"]}, "each method once"),
        ({"methods": ["mdps"], "method": "mdps"}, "drop method"),
        ({"methods": ["mdps"], "axes": {"steps": {"grid": [1]}}}, "drop axes"),
        ({"methods": ["mdps"], "fixed": {"epochs": 1}}, "drop fixed"),
        ({"methods": ["mdps"], "conditions": [{"name": "a", "set": {}}]}, "drop conditions"),
        ({"methods": ["mdps"], "search": "optuna"}, "search must be grid"),
        ({"methods": ["mdps"], "metric": "test_image_auroc"}, "validation metric"),
        ({"methods": ["mdps"], "paper": {"rows": {"drdc": {"mvtec_ad": {"det": 1}}}}}, "keyed by method"),
        ({"methods": ["mdps"], "paper": {"delta": True, "rows": {}}}, "absolute"),
        ({"methods": ["mdps"], "scale": "huge"}, "scale must be smoke or paper"),
    ],
)
def test_invalid_benchmark_spaces_fail_clearly(raw, message):
    with pytest.raises(ConfigError, match=message):
        spaces.parse("bad", raw, "bad.yaml")


def test_benchmark_rows_are_methods_with_their_papers_numbers(uri):
    rows = {"transfusion": {"bottle": 0.9}, "mdps": {"bottle": 0.95}, "drdc": {"bottle": None}}
    fake_sweep(uri, "benchmark_mvtec_ad", rows, dataset="mvtec_ad", scale="paper", categories=("bottle",))
    space = spaces.load("benchmark_mvtec_ad")
    (selection,) = report.select(report.all_sweeps("benchmark_mvtec_ad", uri))
    combined = report.combine(space, selection, None)
    assert combined.rows == ["transfusion", "diffusionad", "mdps", "drdc", "patchcore"]  # the space's order, every method
    assert combined.not_run == {"diffusionad", "patchcore"} and report._flags(combined, "diffusionad") == "not run in this sweep"
    (board,) = report.leaderboards(uri)
    by_method = {r.method: r for r in board.rows}
    assert by_method["mdps"].rank == 1 and by_method["transfusion"].rank == 2 and by_method["drdc"].failed == 1
    assert by_method["transfusion"].paper == {"det": 99.2, "loc": 94.3} and by_method["mdps"].paper["pixel_auroc"] == 97.32


# ------------------------------------------------------------------------------ the real sweep


@pytest.mark.slow
def test_a_real_sweep_writes_the_site_and_records_inputs_and_system_tags(tiny_sweep):
    site = tiny_sweep.root / "reports" / "site"
    assert (site / "index.html").is_file() and (site / "ablations" / f"{tiny_sweep.ablation}.html").is_file()
    assert len(list((site / "ablations" / tiny_sweep.ablation / "maps").rglob("*.png"))) == 8  # 4 rows x 2 maps
    runs = tracking.search_runs(tiny_sweep.uri, tiny_sweep.ablation)
    assert (runs["tags.system.mlflow"] == mlflow.__version__).all()
    client = tracking.client(tiny_sweep.uri)
    for run_id in runs.loc[runs["tags.kind"] == "trial", "run_id"]:
        (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
        assert dataset_input.dataset.name == "synthetic/washer"
        assert json.loads(dataset_input.dataset.profile)["categories"] == ["washer"]


def test_a_field_one_method_renamed_is_read_under_its_new_name_on_that_methods_runs_only():
    import pandas as pd

    from methods import METHODS, get_method
    from orchestrator.report.sweeps import with_current_names

    for name in METHODS:  # every rename names a field the method has today
        cls = get_method(name)
        assert set(cls.renamed_fields.values()) <= {f.name for f in dataclasses.fields(cls.Config)}, name
    runs = pd.DataFrame({"params.method": ["drdc", "diffusionad", "drdc"], "params.method.num_heads": ["8", "4", None],
                         "params.method.transformer_heads": [None, None, "2"]})
    out = with_current_names(runs)
    heads = out["params.method.transformer_heads"]
    assert heads[0] == "8" and pd.isna(heads[1]) and heads[2] == "2"  # DRDC's old name folded in, not onto DiffusionAD
    assert out["params.method.num_heads"].tolist()[1] == "4" and pd.isna(out["params.method.num_heads"][0])  # DiffusionAD's stays
