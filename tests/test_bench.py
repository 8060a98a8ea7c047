"""Smoke test of the benchmark machinery: the quick fusion-loss bench and the plot step on CPU.

It checks the plumbing (records, schema, derived rates, plot), not speed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import bench_fusion_loss, plot
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


def test_plot_makes_png(quick_results: Path, tmp_path: Path) -> None:
    out = tmp_path / "fusion_loss.png"
    assert plot.main([str(quick_results), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
