"""Smoke test of the benchmark machinery: the quick fusion-loss and fused lm_head benches and
the plot step on CPU.

It checks the plumbing (records, schema, derived rates, plot), not speed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import bench_fused_linear, bench_fusion_loss, plot
from bench.common import RECORD_FIELDS, read_jsonl


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert bench_fusion_loss.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    return out / "fusion_loss.jsonl"


def test_records_follow_the_schema(quick_results: Path) -> None:
    lines = [json.loads(line) for line in quick_results.read_text().splitlines()]
    assert lines and all(set(line) == set(RECORD_FIELDS) for line in lines)
    records = read_jsonl(quick_results)
    providers = {r.provider for r in records}
    assert providers == set(bench_fusion_loss.PROVIDERS)  # skipped providers are recorded too
    assert {r.shape["V"] for r in records} == {1000, 70000}
    for r in records:
        assert r.op == "fusion_loss" and r.dtype == "float32" and r.card and r.torch and r.commit and r.date
        assert r.bytes_moved == 2 * r.shape["N"] * r.shape["V"] * 4
        if r.skipped:
            assert r.extra["skipped"] and r.achieved_gbps is None
            continue
        assert 0 < r.p20_ms <= r.median_ms <= r.p80_ms
        assert r.floor_ms > 0 and math.isclose(r.ratio_to_floor, r.median_ms / r.floor_ms)
        assert math.isclose(r.achieved_gbps, r.bytes_moved / r.median_ms / 1e6)
        assert r.peak_extra_mib is None  # no allocator statistics on CPU
    timed = {r.provider for r in records if not r.skipped}
    assert {"dense_teacher", "gather_eager"} <= timed
    for r in records:
        if r.provider in timed - {"dense_teacher"} and not r.skipped:
            assert r.extra["check_ok"] and r.extra["loss_rel_err"] <= bench_fusion_loss.LOSS_RTOL


@pytest.fixture(scope="module")
def quick_fused_linear(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two quick runs into one file: every provider at S=2 (V=70000 dominates the time), then a
    chunk sweep of the fused op alone at V=1000, S=4 (16 rows per chunk: N=64 in 4 chunks)."""
    out = tmp_path_factory.mktemp("bench_fl")
    quick = ["--quick", "--device", "cpu", "--out", str(out)]
    assert bench_fused_linear.main([*quick, "--candidates", "2"]) == 0
    assert bench_fused_linear.main([*quick, "--vocab", "1000", "--candidates", "4", "--chunk-rows", "0", "16", "--providers", "fused"]) == 0
    return out / "fused_linear_loss.jsonl"


def test_fused_linear_records(quick_fused_linear: Path) -> None:
    lines = [json.loads(line) for line in quick_fused_linear.read_text().splitlines()]
    assert lines and all(set(line) == set(RECORD_FIELDS) for line in lines)
    records = read_jsonl(quick_fused_linear)
    assert [r.provider for r in records[:4]] == list(bench_fused_linear.PROVIDERS)  # skipped ones are recorded too
    assert [(r.provider, r.shape["S"]) for r in records[-2:]] == [("fused", 4), ("fused_c16", 4)]
    assert {r.shape["V"] for r in records} == {1000, 70000}
    for r in records:
        assert r.op == "fused_linear_loss" and r.dtype == "float32" and r.shape["N"] == 64 and r.shape["H"] == 32
        assert r.flops == 6 * 64 * 32 * r.shape["V"] and r.bytes_moved is None
        if r.provider in bench_fused_linear.CE_ONLY:
            assert r.skipped and "CUDA" in r.extra["skipped"]  # the CE-only baselines need a GPU
            continue
        assert not r.skipped, r.extra
        assert 0 < r.p20_ms <= r.median_ms <= r.p80_ms and r.peak_extra_mib is None  # no allocator stats on CPU
        assert r.floor_ms > 0 and math.isclose(r.ratio_to_floor, r.median_ms / r.floor_ms)
        assert math.isclose(r.achieved_tflops, r.flops / r.median_ms / 1e9)
        if r.provider.startswith("fused"):
            assert r.extra["check_ok"] and r.extra["checked_with_bias"] and r.extra["checked_against"] == "eager"
            assert r.extra["loss_rel_err"] <= bench_fused_linear.LOSS_RTOL[torch.float32]
            assert max(r.extra[f"grad_{g}_rel_err"] for g in ("hidden", "weight", "bias")) <= bench_fused_linear.GRAD_RTOL[torch.float32]
            assert (r.extra["chunk_rows"], r.extra["chunks"]) == ((16, 4) if r.provider == "fused_c16" else (64, 1))


def test_fused_linear_wrong_result_fails_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = bench_fused_linear.build_provider

    def off_by_one_percent(name, device, chunk_rows=None):
        fn = real(name, device, chunk_rows)
        return (lambda x: 1.01 * fn(x)) if name == "fused" else fn

    monkeypatch.setattr(bench_fused_linear, "build_provider", off_by_one_percent)
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--vocab", "1000", "--candidates", "2", "--providers", "fused"]
    assert bench_fused_linear.main(argv) == 1
    (record,) = read_jsonl(tmp_path / "fused_linear_loss.jsonl")
    assert record.skipped and record.extra["skipped"].startswith("wrong result") and record.extra["check_ok"] is False


@pytest.mark.parametrize("results", ["quick_results", "quick_fused_linear"])
def test_plot_makes_png(results: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    quick_results = request.getfixturevalue(results)
    out = tmp_path / "plot.png"
    assert plot.main([str(quick_results), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
