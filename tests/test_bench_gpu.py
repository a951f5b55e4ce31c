"""bench.gpu, run in-process on CPU at tiny sizes: a row per method with positive, finite
latency, throughput and training-step time, the bf16 variant beside fp32, the JSON file,
and error rows instead of a crash. The ``gpu``-marked test runs the same on CUDA (bench/gpu.sh)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from bench import gpu
from methods import METHODS

# Smoke presets at 32 px, shrunk further where a method samples many steps; names a
# Config does not have are skipped by the bench (and listed in the row).
TINY = [
    "--scale", "smoke", "--size", "32", "--batch", "2", "--train-batch", "2", "--warmup", "1", "--repeats", "1", "--threads", "1",
    "--override", "transfusion.steps=2",
    "--override", "mdps.steps=2", "--override", "mdps.num_samples=1", "--override", "mdps.mask_num_samples=1",
    "--override", "drdc.feature_stride=8", "--override", "drdc.timesteps=(200, 0)",
]  # fmt: skip


def run_bench(argv: list[str]) -> tuple[list[dict], str]:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        rows = gpu.main(argv)
    return rows, text.getvalue()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "gpu.json"
    rows, text = run_bench(TINY + ["--device", "cpu", "--dtype", "fp32,bf16", "--out", str(out)])
    return rows, text, out


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def check_row(row: dict) -> None:
    assert "error" not in row, row
    for key in ("latency_s", "throughput_ips", "train_step_s"):
        assert positive(row.get(key)), (key, row)
    assert row["size"] == 32 and row["batch"] >= 1 and row["train_batch"] >= 1, row


def table_lines(text: str, method: str, variant: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"| {method} | {variant} |")]


def test_a_row_per_method_with_positive_finite_timings(cpu_run):
    rows, text, _ = cpu_run
    fp32 = {row["method"]: row for row in rows if row["variant"] == "fp32"}
    assert set(fp32) == set(METHODS)
    for method, row in fp32.items():
        check_row(row)
        assert len(table_lines(text, method, "fp32")) == 1, text
        assert row["paper_speed"] == gpu.get_method(method).paper_speed
        assert row["infer_peak_mib"] is None and row["train_peak_mib"] is None  # CPU: n/a
    assert fp32["mdps"]["backbone"] == fp32["drdc"]["backbone"] == "efficientnet_lite0"
    assert fp32["transfusion"]["backbone"] == "none"


def test_bf16_rows_beside_fp32(cpu_run):
    rows, text, _ = cpu_run
    assert [row["variant"] for row in rows] == ["fp32"] * len(METHODS) + ["bf16"] * len(METHODS)
    for row in rows[len(METHODS) :]:
        check_row(row)
        assert len(table_lines(text, row["method"], "bf16")) == 1, text


def test_json_holds_the_rows_and_the_environment(cpu_run):
    rows, _, out = cpu_run
    saved = json.loads(out.read_text())
    assert saved["environment"]["device"] == "cpu"
    assert [(r["method"], r["variant"], r["latency_s"]) for r in saved["rows"]] == [(r["method"], r["variant"], r["latency_s"]) for r in rows]


def test_a_failing_method_gives_an_error_row_and_the_run_goes_on():
    rows, text = run_bench(TINY + ["--device", "cpu", "--methods", "drdc,diffusionad", "--override", "drdc.feature_stride=7"])
    drdc, diffusionad = rows
    assert drdc["method"] == "drdc" and drdc["error"].startswith("ValueError"), drdc
    check_row(diffusionad)
    assert "ValueError" in table_lines(text, "drdc", "fp32")[0]


def test_deadline_skips_rows():
    rows, _ = run_bench(TINY + ["--device", "cpu", "--methods", "diffusionad", "--deadline", "-1"])
    assert rows[0]["error"].startswith("skipped"), rows


def test_variants_and_fast_settings():
    names = [v.name for v in gpu.variants(["bf16"], channels_last=True, compile=True)]
    assert names == ["fp32", "bf16", "fp32+channels_last", "bf16+channels_last", "fp32+compile", "bf16+compile"]
    for method in METHODS:
        cls = gpu.get_method(method)
        config = gpu.build_config(cls, "paper", {})
        fast, unknown = gpu.known(cls, cls.minimal_sampling(config))  # --fast: the method's minimal_sampling
        assert not unknown, (method, unknown)  # it names fields the configs have
        gpu.build_config(cls, "paper", fast)  # and valid values
    assert gpu.get_method("mdps").minimal_sampling(gpu.build_config(gpu.get_method("mdps"), "paper", {}))["steps"] == 1


def test_fast_uses_the_minimal_sampling_settings(monkeypatch):
    rows, _ = run_bench(TINY + ["--device", "cpu", "--methods", "diffusionad", "--fast"])
    assert rows[0]["inference"] == "fast: paradigm=one_step", rows[0]


def test_paper_backbone_falls_back_to_lite0_without_torchvision(monkeypatch):
    monkeypatch.setattr(gpu, "torchvision_status", lambda: "torchvision unavailable (ImportError)")
    cls = gpu.get_method("mdps")
    override, text = gpu.choose_backbone("mdps", cls.Config, "paper", "efficientnet_lite0", random_paper=True)
    assert override == {"backbone": "efficientnet_lite0"}
    assert text.startswith("efficientnet_lite0 (fallback for wide_resnet101_2: torchvision unavailable")
    assert gpu.choose_backbone("transfusion", gpu.get_method("transfusion").Config, "paper", None, False) == ({}, "none")


def test_a_paper_backbone_without_an_extractor_keeps_the_configs():
    cls = gpu.get_method("patchcore")
    assert cls.paper_backbone == "wide_resnet50_2"
    override, text = gpu.choose_backbone("patchcore", cls.Config, "paper", "efficientnet_lite0", random_paper=False)
    assert override == {"backbone": "efficientnet_lite0"}
    assert text.startswith("efficientnet_lite0 (stands in for the paper's wide_resnet50_2: no extractor in methods/backbones.py)"), text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rows_with_peak_memory():
    rows, _ = run_bench(TINY + ["--device", "cuda", "--dtype", "fp32,bf16", "--channels-last"])
    assert len(rows) == 4 * len(METHODS)
    for row in rows:
        check_row(row)
        assert row["infer_peak_mib"] > 0 and row["train_peak_mib"] > 0, row
