"""The CUDA kernels compiled for GPUs that are not here (sm_80 and sm_90), as launched.

`fusellm_kernels.ops.aot_compile` runs the real launchers on meta tensors as an A100 / H100
would launch them and compiles every distinct kernel binary with Triton's own ptxas. The
suite runs it in a subprocess: `conftest.py` turns the interpreter on for the whole suite,
and interpreted kernels cannot be compiled. What is checked for every binary: it compiles,
it spills nothing, its registers leave room for the programs per SM its launcher assumes,
its shared memory fits the card. The exhaustive sweep (V up to 256 000, S 1–4, K 5–16,
fp16) is marked `compile_sweep` and only runs when selected (`pytest -m compile_sweep`,
which bench/gpu_check.sh's compile step does through the module itself).

The launch configuration is a pure function of (shape, dtype, device properties): the tests
at the bottom ask it what an H100 launches, on this CPU machine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusellm_kernels.ops.launch_config import (
    A100,
    H100,
    H200,
    fusion_loss_launch,
    register_limit,
    resident_programs,
    scale_rows_launch,
    segment_weights_launch,
    teacher_gather_launch,
)

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "this triton has no NVIDIA backend (ptxas), so nothing can be compiled for sm_80/sm_90"
    return None


def _compile(tmp_path_factory, *extra: str) -> dict:
    reason = _nvidia_backend_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "triton-cache")  # a private cache: binaries are compiled, not reused
    proc = subprocess.run(
        [sys.executable, "-m", "fusellm_kernels.ops.aot_compile", "--quiet", "--jobs", str(min(2, os.cpu_count() or 1)),
         "--json", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert out.exists(), f"aot_compile wrote no report (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    report["rc"] = proc.returncode
    report["log"] = proc.stdout + proc.stderr
    return report


@pytest.fixture(scope="module")
def ci_report(tmp_path_factory) -> dict:
    return _compile(tmp_path_factory)


def _describe(r: dict) -> str:
    return (f"{r['target']} {r['kernel']} warps={r['num_warps']} programs/SM={r['programs_per_sm']} "
            f"{r['constexprs']} (e.g. {r['cases'][0] if r['cases'] else '?'}): {'; '.join(r['problems']) or 'ok'}")


def _check(report: dict) -> None:
    results = report["results"]
    assert results, "no binary was compiled"
    errors = [f"{_describe(r)}\n{r['error'][:1500]}" for r in results if r["error"]]
    assert not errors, "kernels that do not compile:\n" + "\n".join(errors)
    spills = [_describe(r) for r in results if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "kernels that spill:\n" + "\n".join(spills)
    over = [_describe(r) for r in results
            if r["registers"] > r["register_limit"] or r["resident_programs"] < r["programs_per_sm"]]
    assert not over, "kernels whose registers do not leave room for the programs per SM their launcher assumes:\n" + "\n".join(over)
    budget = [_describe(r) for r in results if r["maxnreg"] != r["register_limit"]]
    assert not budget, "launches that do not hand ptxas their register budget (.maxnreg):\n" + "\n".join(budget)
    shared = [_describe(r) for r in results if "shared memory" in " ".join(r["problems"])]
    assert not shared, "kernels over the card's shared memory:\n" + "\n".join(shared)
    assert not [r for r in results if r["problems"]], "\n".join(_describe(r) for r in results if r["problems"])
    assert report["rc"] == 0, report["log"][-3000:]


def test_ci_set_compiles_for_sm80_and_sm90_at_the_assumed_occupancy(ci_report):
    _check(ci_report)
    results = ci_report["results"]
    assert {r["target"] for r in results} == {"sm80", "sm90"}
    kernels = {r["kernel"] for r in results}
    assert kernels == {"_fusion_loss_kernel", "_scale_rows_kernel", "_segment_weights_kernel", "_teacher_gather_kernel"}


def test_ci_set_covers_every_launcher_choice(ci_report):
    """Every mode of the loss kernel is compiled, at both vocabulary regimes (8 and 16 warps)."""
    loss = [r for r in ci_report["results"] if r["kernel"] == "_fusion_loss_kernel"]
    seen = {(r["target"], r["num_warps"], r["constexprs"]["KL"], r["constexprs"]["WRITE_GRAD"],
             r["constexprs"]["BACKWARD"], r["constexprs"]["HAS_UP"]) for r in loss}
    for target in ("sm80", "sm90"):
        for warps in (8, 16):
            for kl in (False, True):
                for flags in ((False, False, False), (True, False, False), (True, False, True)):
                    assert (target, warps, kl, *flags) in seen, (target, warps, kl, flags)
            assert any(s[:2] == (target, warps) and s[4] for s in seen), f"backward recompute on {target} at {warps} warps"
    cases = {c for r in ci_report["results"] for c in r["cases"]}
    for needle in ("fused_linear V128256 S3 K10 bf16 upstream kl", "segment_weights V32000 S3 K10 bf16 softmin_ce",
                   "teacher_gather V128256 S1 K16 fp32 map", "fusion_loss V128256 S3 K16 bf16 inplace kl",
                   "fusion_loss V50257 S3 K10 bf16 grad kl"):
        assert needle in cases, needle
    assert {r["constexprs"]["S_P"] for r in loss} == {1, 4} and {r["constexprs"]["K_P"] for r in loss} == {16}


@pytest.mark.compile_sweep
def test_exhaustive_sweep_compiles_without_spills(tmp_path_factory):
    _check(_compile(tmp_path_factory, "--exhaustive"))


# ---- the launch configuration as a pure function (no compiler needed) ----

def test_what_an_h100_launches():
    small = fusion_loss_launch(8192, 32_000, H100)
    assert (small.grid, small.num_warps, small.block, small.programs_per_sm, small.maxnreg) == (528, 8, 4096, 4, 64)
    large = fusion_loss_launch(8192, 128_256, H100)
    assert (large.grid, large.num_warps, large.block, large.programs_per_sm, large.maxnreg) == (264, 16, 4096, 2, 64)
    fp32 = fusion_loss_launch(8192, 32_000, H100, elem_bytes=4)
    assert fp32.block == 2048
    odd = fusion_loss_launch(8192, 50_257, H100, row_aligned=False)  # no 16-byte vectors: 8 logits per thread
    assert (odd.block, odd.num_warps) == (2048, 8)
    assert fusion_loss_launch(100, 128_256, H100).grid == 100  # never more programs than rows
    assert fusion_loss_launch(8192, 128_256, A100).grid == 216
    swept = fusion_loss_launch(8192, 128_256, H200, programs_per_sm=1)
    assert (swept.grid, swept.maxnreg) == (132, 128)
    assert scale_rows_launch(8192, 128_256, H100).grid == 8192
    assert segment_weights_launch(8192, H100).maxnreg == 64
    assert teacher_gather_launch(8192, H100).grid == 128


def test_interpreter_launch_assumes_nothing():
    cfg = fusion_loss_launch(8192, 128_256, None)
    assert cfg.programs_per_sm == 0 and cfg.maxnreg is None and cfg.grid == 4
    assert teacher_gather_launch(10, None).maxnreg is None


@pytest.mark.parametrize(("warps", "programs", "limit"), [(16, 2, 64), (8, 4, 64), (8, 2, 128), (4, 8, 64), (16, 1, 128), (4, 1, 255)])
def test_register_limit(warps, programs, limit):
    assert register_limit(H100, warps, programs) == limit


def test_resident_programs_counts_registers_threads_and_shared_memory():
    assert resident_programs(H100, 64, 16, 0) == 2
    assert resident_programs(H100, 65, 16, 0) == 1  # one register over: the second program no longer fits
    assert resident_programs(H100, 32, 4, 0) == 16  # 2048 threads per SM
    assert resident_programs(H100, 32, 4, 100_000) == 2  # shared memory binds
