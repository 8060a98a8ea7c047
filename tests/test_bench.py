"""Smoke test of the benchmark machinery: the quick fusion-loss and fused lm_head benches and
the plot step on CPU.

It checks the plumbing (records, schema, derived rates, plot), not speed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
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
    assert {"dense_teacher", "dense_bucket", "gather_eager", "fused", "fused_bucket"} <= timed
    for r in records:
        if r.provider in timed - {"dense_teacher", "dense_bucket"} and not r.skipped:
            assert r.extra["check_ok"] and r.extra["loss_rel_err"] <= bench_fusion_loss.LOSS_RTOL
            want = "dense_bucket" if r.provider == "fused_bucket" else "dense_teacher"
            assert r.extra["checked_against"] == want


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
    assert [r.provider for r in records[:len(bench_fused_linear.PROVIDERS)]] == list(bench_fused_linear.PROVIDERS)  # skipped ones are recorded too
    assert [(r.provider, r.shape["S"]) for r in records[-2:]] == [("fused", 4), ("fused_c16", 4)]
    assert {r.shape["V"] for r in records} == {1000, 70000}
    for r in records:
        assert r.op == "fused_linear_loss" and r.dtype == "float32" and r.shape["N"] == 64 and r.shape["H"] == 32
        assert r.flops == 6 * 64 * 32 * r.shape["V"] and r.bytes_moved is None
        if r.provider == "torch_lce" and not hasattr(torch.nn.functional, "linear_cross_entropy"):
            assert r.skipped and "added in 2.13" in r.extra["skipped"]
            continue
        if r.provider in ("liger_flce", "cce"):
            assert r.skipped and "CUDA" in r.extra["skipped"]  # these CE-only baselines need a GPU
            continue
        assert not r.skipped, r.extra
        assert 0 < r.p20_ms <= r.median_ms <= r.p80_ms and r.peak_extra_mib is None  # no allocator stats on CPU
        assert r.floor_ms > 0 and math.isclose(r.ratio_to_floor, r.median_ms / r.floor_ms)
        assert math.isclose(r.achieved_tflops, r.flops / r.median_ms / 1e9)
        if r.provider.startswith("fused"):
            reference = "eager_ce" if r.provider == "fused_ce" else "eager"  # fused_ce: λ = 1, plain cross entropy
            assert r.extra["check_ok"] and r.extra["checked_with_bias"] and r.extra["checked_against"] == reference
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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton kernels on CPU tensors: needs the interpreter")
def test_programs_per_sm_variant_is_the_fused_op() -> None:
    """fused_pps<P> is the fused op with the launch's programs per SM overridden
    (`persistent_programs`): with the launcher choosing as on an H100 (a grid of 3 or 16 here
    instead of the interpreter's 4), the same loss and gradient, also for an upstream gradient
    other than 1 (the backward recomputes)."""
    from fusellm_kernels import fusion_loss
    from fusellm_kernels.ops.launch_config import H100, assume_device, persistent_programs

    x = bench_fusion_loss.make_inputs(16, 300, 3, 10, torch.float32, torch.device("cpu"), seed=1)

    def loss_grad(fn):
        loss = fn(x)
        (grad,) = torch.autograd.grad(loss * 0.37, x.logits)
        return loss.detach(), grad

    want = loss_grad(lambda x: fusion_loss(x.logits, x.labels, x.teacher_ids, x.teacher_logits, backend="triton",
                                           **bench_fusion_loss._loss_kwargs(x)))
    h100_of_3_sms = dataclasses.replace(H100, sm_count=3)
    for pps in (1, 3):
        with assume_device(h100_of_3_sms), persistent_programs(pps):
            got = loss_grad(lambda x: fusion_loss(x.logits, x.labels, x.teacher_ids, x.teacher_logits, backend="triton",
                                                  **bench_fusion_loss._loss_kwargs(x)))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with assume_device(H100), persistent_programs(9), pytest.raises(ValueError, match="2304 threads"):  # 9 x 8 warps
        loss_grad(lambda x: fusion_loss(x.logits, x.labels, x.teacher_ids, x.teacher_logits, backend="triton",
                                        **bench_fusion_loss._loss_kwargs(x)))


def test_programs_per_sm_launch_notes() -> None:
    """The sweep's notes as an H100 would record them: grid = SMs x P capped by N, pass 2's L2
    footprint = grid x V x bytes per logit next to the card's L2."""
    from fusellm_kernels.ops.launch_config import H100

    notes = bench_fusion_loss.launch_notes("fused_pps3", 8192, 128_256, torch.bfloat16, H100)
    assert notes["programs_per_sm"] == 3 and notes["grid"] == 3 * H100.sm_count and not notes["programs_per_sm_default"]
    assert notes["pass2_l2_bytes"] == 3 * H100.sm_count * 128_256 * 2 and notes["l2_bytes"] == H100.l2_bytes
    assert notes["pass2_fits_l2"] == (notes["pass2_l2_bytes"] <= H100.l2_bytes)
    assert bench_fusion_loss.launch_notes("fused_pps4", 100, 128_256, torch.bfloat16, H100)["grid"] == 100  # capped by N
    assert "4096 threads" in bench_fusion_loss.launch_notes("fused_pps8", 8192, 128_256, torch.bfloat16, H100)["launch_refused"]
    assert bench_fusion_loss.launch_notes("fused", 8192, 32000, torch.bfloat16, H100)["programs_per_sm_default"]
    assert bench_fusion_loss.launch_notes("fused", 8192, 32000, torch.bfloat16, None) == {}  # not a CUDA card


def test_programs_per_sm_is_ignored_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--vocab", "1000", "--candidates", "2", "--providers", "fused"]
    assert bench_fusion_loss.main([*argv, "--programs-per-sm", "2", "4"]) == 0
    assert "--programs-per-sm ignored on cpu" in capsys.readouterr().out
    assert [r.provider for r in read_jsonl(tmp_path / "fusion_loss.jsonl")] == ["fused"]
    with pytest.raises(SystemExit, match="at least 1"):
        bench_fusion_loss.main([*argv, "--programs-per-sm", "0"])


@pytest.mark.parametrize("results", ["quick_results", "quick_fused_linear"])
def test_plot_makes_png(results: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    quick_results = request.getfixturevalue(results)
    out = tmp_path / "plot.png"
    assert plot.main([str(quick_results), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_cpu_profile_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import profile_cpu_fused_linear

    assert profile_cpu_fused_linear.main(["--rows", "40", "--hidden", "8", "--vocab", "300", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "ours, CE only" in out and "weight gradient" in out and "native's extra" in out
    with pytest.raises(SystemExit):
        profile_cpu_fused_linear.main(["--reps", "0"])


def test_bench_online_quick(tmp_path: Path) -> None:
    from bench import bench_online

    assert bench_online.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    records = read_jsonl(tmp_path / "online_fusion.jsonl")
    assert [r.provider for r in records] == ["offline", "online", "online_w1"]
    off = records[0].extra
    assert off["prepare_s"] > 0 and off["corpus_tokens"] > 0 and off["offline_total_s_per_token"] > 0
    for r in records[1:]:
        assert r.median_ms > 0 and r.extra["candidates_s"] > 0 and 0.0 <= r.extra["hidden_share"] <= 1.0
        assert 0.0 < r.extra["aligned_fraction"]["gpt2"] <= 1.0
