"""Compile the Triton ops for GPUs that are not here, exactly as their CUDA launchers would.

    python -m fusellm_kernels.ops.aot_compile                     # the CI set, sm_80 and sm_90, a table
    python -m fusellm_kernels.ops.aot_compile --exhaustive --json out.json

How: the real launchers run on `meta` tensors under `assume_device(spec)`, so they make
their CUDA choices (block, warps, programs, chunking) from `launch_config`; the kernel
launch is captured instead of run, specialised by Triton's own binder for the target
(pointer alignment, integer divisibility, the `== 1` constants, as a launch on the card
would), and compiled with `triton.compile(..., target=GPUTarget("cuda", arch, 32))`. The
wheel's `ptxas -v` log gives registers and spills; the compiled metadata gives shared
memory. Each result is checked against what its launcher assumes: no spills, registers
within `register_limit` for the programs per SM the launcher asks for, shared memory
within the card's limit.

Needs triton with its NVIDIA backend and the interpreter off (`TRITON_INTERPRET` unset
before triton is imported): `tests/test_compile_targets.py` runs this in a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from fusellm_kernels.ops.launch_config import (
    A100,
    H100,
    DeviceSpec,
    assume_device,
    register_limit,
    resident_programs,
)

TARGETS = {"sm80": A100, "sm90": H100}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One call of a launcher: which op, at which shape and dtypes, in which mode."""

    op: str  # fusion_loss | fusion_loss_backward | scale_rows | segment_weights | teacher_gather | fused_linear
    v: int = 32000
    s: int = 1
    k: int = 10
    dtype: str = "bf16"
    mode: str = ""  # fusion_loss: loss | grad | inplace | upstream; segment_weights: strategy; teacher_gather: map | nomap
    kl: bool = False
    tail: bool = False  # teacher_tail="bucket" (the loss reads each candidate's lse)

    def label(self) -> str:
        parts = [self.op, f"V{self.v}", f"S{self.s}", f"K{self.k}", self.dtype]
        if self.mode:
            parts.append(self.mode)
        if self.op.startswith("fusion_loss") or self.op == "fused_linear":
            parts.append("kl" if self.kl else "soft_ce")
            if self.tail:
                parts.append("bucket")
        return " ".join(parts)


@dataclass
class Captured:
    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict
    programs_per_sm: int = 0


@contextlib.contextmanager
def _capture(kernels: list[Any]) -> Iterator[list[Captured]]:
    """Record launches of `kernels` instead of running them (JITFunction[grid](...) calls .run)."""
    got: list[Captured] = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            got.append(Captured(kernel, tuple(grid), args, kwargs))
        return run

    for k in kernels:
        k.run = recorder(k)
    try:
        yield got
    finally:
        for k in kernels:
            del k.run


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _launches(case: Case, spec: DeviceSpec, n: int = 8192) -> list[Captured]:
    """Run the launcher(s) of `case` on meta tensors as `spec` would, capturing every launch
    with the programs per SM its launch configuration relies on."""
    from fusellm_kernels.ops import fusion_loss as fl
    from fusellm_kernels.ops import segment_weights as sw
    from fusellm_kernels.ops import teacher_gather as tg
    from fusellm_kernels.ops.launch_config import (
        device_spec,
        fusion_loss_launch,
        scale_rows_launch,
        segment_weights_launch,
        teacher_gather_launch,
    )

    dt = DTYPES[case.dtype]
    f32 = torch.float32
    kernels = [fl._fusion_loss_kernel, fl._scale_rows_kernel, sw._segment_weights_kernel, tg._teacher_gather_kernel]

    def loss_inputs(rows: int):
        return (
            _meta(rows, dtype=torch.int64),  # labels
            _meta(case.s, rows, case.k, dtype=torch.int32),  # teacher ids, as gather_teacher_rows makes them
            _meta(case.s, rows, case.k, dtype=dt),  # teacher logits in the training dtype
            _meta(case.s, rows, dtype=f32),  # weights from segment_weights
            _meta(rows, dtype=torch.uint8),  # fusion mask
            _meta(dtype=f32), _meta(dtype=f32),  # ce_coef, f_coef
        )

    def tail_inputs(rows: int) -> dict:
        if not case.tail:
            return {}
        return {"teacher_lse": _meta(case.s, rows, dtype=f32), "log_q_out": _meta(case.s, rows, dtype=f32)}

    with assume_device(spec), _capture(kernels) as got:
        meta = torch.device("meta")
        if case.op == "fusion_loss":
            logits = _meta(n, case.v, dtype=dt)
            grad = {"loss": None, "grad": torch.empty_like(logits), "inplace": logits, "upstream": torch.empty_like(logits)}[case.mode]
            upstream = _meta(n, dtype=f32) if case.mode == "upstream" else None
            fl.fusion_loss_forward(logits, *loss_inputs(n), temperature=1.0, kl=case.kl, ignore_index=-100,
                                   grad=grad, upstream=upstream, **tail_inputs(n))
            pps = fusion_loss_launch(n, case.v, device_spec(meta), tail=case.tail).programs_per_sm
        elif case.op == "fusion_loss_backward":
            logits = _meta(n, case.v, dtype=dt)
            fl.fusion_loss_backward_(torch.empty_like(logits), _meta(n, dtype=f32), logits, *loss_inputs(n),
                                     _meta(n, dtype=f32), temperature=1.0, ignore_index=-100, **tail_inputs(n))
            pps = fusion_loss_launch(n, case.v, device_spec(meta), tail=case.tail).programs_per_sm
        elif case.op == "scale_rows":
            fl.scale_rows_(_meta(n, case.v, dtype=dt), _meta(n, dtype=f32))
            pps = scale_rows_launch(n, case.v, device_spec(meta)).programs_per_sm
        elif case.op == "segment_weights":
            sw.segment_weights_triton(_meta(case.s, n, dtype=f32), _meta(n, dtype=torch.int64), _meta(n, dtype=torch.int64),
                                      strategy=case.mode, ce_temperature=1.0, ignore_index=-100)
            pps = segment_weights_launch(n, device_spec(meta)).programs_per_sm
        elif case.op == "teacher_gather":
            rows = 4 * n
            tg.teacher_gather_triton(
                _meta(rows, case.k, dtype=torch.int32), _meta(rows, case.k, dtype=dt), _meta(n, dtype=torch.int64),
                _meta(n, dtype=torch.int32), _meta(case.v, dtype=torch.int32) if case.mode == "map" else None,
                _meta(n, 16, dtype=torch.int32), _meta(n, 16, dtype=dt),
            )
            pps = teacher_gather_launch(n, device_spec(meta)).programs_per_sm
        elif case.op == "fused_linear":
            pps = _fused_linear_launches(case, n, dt)
        else:
            raise ValueError(f"unknown op {case.op!r}")
    for c in got:
        c.programs_per_sm = pps
    return got


def _fused_linear_launches(case: Case, n: int, dt: torch.dtype) -> int:
    """The fused lm_head's chunk loop (`reduction='none'` backward: the upstream variant)."""
    from fusellm_kernels import fused_linear as fli
    from fusellm_kernels.functional import prepare_loss
    from fusellm_kernels.ops.launch_config import device_spec, fusion_loss_launch

    hdim = 4096
    meta = torch.device("meta")
    hidden, weight = _meta(n, hdim, dtype=dt), _meta(case.v, hdim, dtype=dt)
    prep = prepare_loss(
        (n,), case.v, meta, _meta(n, dtype=torch.int64), _meta(case.s, n, case.k, dtype=torch.int32),
        _meta(case.s, n, case.k, dtype=dt), teacher_ce=None, segment_ids=None, source_weights=_meta(case.s, n, dtype=torch.float32),
        fusion_mask=None, strategy="weights", lam=0.9, temperature=1.0, ce_temperature=1.0,
        divergence="kl" if case.kl else "soft_ce", ignore_index=-100, reduction="none" if case.mode == "upstream" else "mean",
        validate=False, backend="torch", teacher_lse=_meta(case.s, n, dtype=torch.float32) if case.tail else None,
        teacher_tail="bucket" if case.tail else "renormalize",
    )
    prep = dataclasses.replace(prep, use_triton=True)
    chunk = fli.default_chunk_rows(n, case.v, dt, torch.device("cuda"))
    up = _meta(n, dtype=torch.float32) if case.mode == "upstream" else None
    fli._run_chunks(hidden, weight, None, prep, chunk, (True, True, False), up)
    return fusion_loss_launch(chunk, case.v, device_spec(meta), tail=case.tail).programs_per_sm


def ci_cases() -> list[Case]:
    """The set the suite compiles: every choice the CUDA launchers make at the usual shapes."""
    cases: list[Case] = []
    for v in (32000, 128256):
        for dtype in ("bf16", "fp32"):
            for s in (1, 3):
                for k in (10, 16):
                    for kl in (False, True):
                        for mode in ("loss", "grad", "inplace", "upstream"):
                            cases.append(Case("fusion_loss", v, s, k, dtype, mode, kl))
                    cases.append(Case("fusion_loss_backward", v, s, k, dtype))
                cases.append(Case("fused_linear", v, s, 10, dtype, "mean"))
                cases.append(Case("fused_linear", v, s, 10, dtype, "upstream", True))
                # the bucketed tail: its own kernel variant (TAIL), in every mode at K = 10
                for kl in (False, True):
                    for mode in ("loss", "grad", "inplace", "upstream"):
                        cases.append(Case("fusion_loss", v, s, 10, dtype, mode, kl, tail=True))
                cases.append(Case("fusion_loss_backward", v, s, 10, dtype, tail=True))
                cases.append(Case("fused_linear", v, s, 10, dtype, "mean", tail=True))
            cases.append(Case("scale_rows", v, dtype=dtype))
            for k in (10, 16):
                for mode in ("map", "nomap"):
                    cases.append(Case("teacher_gather", v, 1, k, dtype, mode))
    # an odd vocabulary (GPT-2, GPT-NeoX: 50 257): rows that Triton cannot read as 16-byte vectors
    for mode in ("grad", "upstream"):
        cases.append(Case("fusion_loss", 50257, 3, 10, "bf16", mode, True))
        cases.append(Case("fusion_loss", 50257, 3, 10, "bf16", mode, True, tail=True))
    for s in (1, 3):
        for strategy in ("min_ce", "avg_ce", "softmin_ce"):
            cases.append(Case("segment_weights", s=s, mode=strategy))
    return cases


def exhaustive_cases() -> list[Case]:
    """The sweep behind `--exhaustive` (the compile report): V up to 256 000, S 1–4, K 5–16, fp16."""
    cases = list(ci_cases())
    for v in (32000, 50257, 65536, 128256, 151936, 256000):
        for dtype in ("bf16", "fp16", "fp32"):
            for s in (1, 2, 3, 4):
                for k in (5, 8, 10, 16):
                    for kl in (False, True):
                        for mode in ("loss", "grad", "upstream"):
                            for tail in (False, True):
                                cases.append(Case("fusion_loss", v, s, k, dtype, mode, kl, tail))
                    for tail in (False, True):
                        cases.append(Case("fusion_loss_backward", v, s, k, dtype, tail=tail))
            cases.append(Case("scale_rows", v, dtype=dtype))
    for s in (1, 2, 3, 4):
        for strategy in ("min_ce", "avg_ce", "softmin_ce"):
            cases.append(Case("segment_weights", s=s, mode=strategy))
    return list(dict.fromkeys(cases))


@dataclass
class Result:
    kernel: str
    target: str
    cases: list[str]
    num_warps: int
    programs_per_sm: int
    maxnreg: int | None  # the register budget the launcher hands ptxas (.maxnreg)
    constexprs: dict
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared_bytes: int = -1
    register_limit: int = -1
    resident_programs: int = -1
    compile_s: float = 0.0
    error: str = ""
    problems: list[str] = field(default_factory=list)


_PTXAS_LOGS: list[str] = []
_REAL_RUN = subprocess.run  # Triton's compiler calls `subprocess.run` through the shared module


def _run_recording_ptxas(cmd, *args, **kwargs):
    """subprocess.run for Triton's ptxas call that also keeps its `-v` log (stderr)."""
    if cmd and "ptxas" in os.path.basename(str(cmd[0])) and "stderr" in kwargs:
        kwargs.pop("stderr")  # Triton's log file; it reads it only to report a failure, which this raises itself
        proc = _REAL_RUN(cmd, *args, stderr=subprocess.PIPE, **kwargs)
        log = proc.stderr.decode(errors="replace")
        _PTXAS_LOGS.append(log)
        if kwargs.get("check") and proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd, stderr=proc.stderr)
        return proc
    return _REAL_RUN(cmd, *args, **kwargs)


def _parse_ptxas(log: str) -> tuple[int, int, int]:
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    st, ld = (max(int(a) for a, _ in spills), max(int(b) for _, b in spills)) if spills else (0, 0)
    return int(regs[-1]), st, ld


def _key(c: Captured, target: str) -> tuple:
    """What decides the compiled binary: kernel, target, and the binder's specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    spec = TARGETS[target]
    backend = make_backend(GPUTarget("cuda", spec.arch, 32))
    binder = create_function_from_signature(c.kernel.signature, c.kernel.params, backend)
    _, specialization, _ = binder(*c.args, **c.kwargs)
    return (c.kernel.fn.__name__, target, repr(specialization), c.kwargs.get("num_warps", 4), c.kwargs.get("maxnreg"),
            c.programs_per_sm)


def _compile_job(job: tuple[Case, str, int]) -> Result:
    """In a worker process: record the case's launches again (kernels do not pickle) and compile one."""
    case, target, index = job
    return _compile_one(_launches(case, TARGETS[target])[index], target)


def _compile_one(c: Captured, target: str) -> Result:
    import triton
    import triton.backends.nvidia.compiler as nvc
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    spec = TARGETS[target]
    num_warps = c.kwargs.get("num_warps", 4)
    constexprs = {k: v for k, v in c.kwargs.items() if k not in ("num_warps", "maxnreg")}
    res = Result(kernel=c.kernel.fn.__name__, target=target, cases=[], num_warps=num_warps,
                 programs_per_sm=c.programs_per_sm, maxnreg=c.kwargs.get("maxnreg"), constexprs=constexprs)
    gpu = GPUTarget("cuda", spec.arch, 32)
    backend = make_backend(gpu)
    binder = create_function_from_signature(c.kernel.signature, c.kernel.params, backend)
    bound_args, specialization, options = binder(*c.args, **c.kwargs)
    options, signature, consts, attrs = c.kernel._pack_args(backend, c.kwargs, bound_args, specialization, options)
    _PTXAS_LOGS.clear()
    nvc.subprocess.run = _run_recording_ptxas
    triton.knobs.compilation.always_compile = True  # a cached binary would come without ptxas's log
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(c.kernel, signature, consts, attrs), target=gpu, options=options.__dict__)
    except Exception as err:  # a kernel that does not compile is a finding, not a crash
        res.error = f"{type(err).__name__}: {str(err)[:2000]}"
        res.problems.append("does not compile")
        return res
    finally:
        nvc.subprocess.run = _REAL_RUN
    res.compile_s = round(time.perf_counter() - t0, 2)
    md = compiled.metadata
    res.shared_bytes = int(md.shared if hasattr(md, "shared") else md["shared"])
    res.registers, res.spill_stores, res.spill_loads = _parse_ptxas("\n".join(_PTXAS_LOGS))
    res.register_limit = register_limit(spec, num_warps, c.programs_per_sm)
    res.resident_programs = resident_programs(spec, res.registers, num_warps, res.shared_bytes)
    if res.spill_stores or res.spill_loads:
        res.problems.append(f"spills {res.spill_stores} B stores / {res.spill_loads} B loads")
    if res.maxnreg != res.register_limit:  # ptxas would then aim at an occupancy of its own choosing
        res.problems.append(f"maxnreg {res.maxnreg} is not the launcher's budget of {res.register_limit} registers")
    if res.registers > res.register_limit:
        res.problems.append(f"{res.registers} registers > {res.register_limit} for {c.programs_per_sm} programs/SM of {num_warps} warps")
    if res.shared_bytes > spec.max_shared_per_block:
        res.problems.append(f"shared memory {res.shared_bytes} B > {spec.max_shared_per_block} B")
    return res


def compile_cases(cases: list[Case], targets: list[str], jobs: int = 1,
                  progress: Callable[[str], None] | None = None) -> list[Result]:
    """Compile the de-duplicated launches of `cases` for `targets`; one Result per binary."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: interpreted kernels cannot be compiled; unset it before triton is imported")
    unique: dict[tuple, tuple[Captured, tuple[Case, str, int], list[str]]] = {}
    for target in targets:
        for case in cases:
            for i, c in enumerate(_launches(case, TARGETS[target])):
                key = _key(c, target)
                unique.setdefault(key, (c, (case, target, i), []))[2].append(case.label())
    work = list(unique.values())
    results: list[Result] = []
    if progress:
        progress(f"{len(cases)} cases → {len(work)} distinct binaries over {', '.join(targets)}")
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            outs = pool.map(_compile_job, [job for _, job, _ in work])
            for (_, _, labels), res in zip(work, outs):
                res.cases = labels
                results.append(res)
                if progress:
                    progress(_line(res))
    else:
        for c, (_, t, _), labels in work:
            res = _compile_one(c, t)
            res.cases = labels
            results.append(res)
            if progress:
                progress(_line(res))
    return results


def _line(r: Result) -> str:
    cx = " ".join(f"{k}={v}" for k, v in r.constexprs.items() if k in ("BLOCK_V", "S_P", "K_P", "KL", "WRITE_GRAD", "BACKWARD", "HAS_UP", "TAIL", "STRATEGY", "HAS_MAP"))
    verdict = "ok" if not r.problems else "; ".join(r.problems)
    return (f"{r.target} {r.kernel:<26} warps={r.num_warps:<2} pps={r.programs_per_sm} regs={r.registers}/{r.register_limit} "
            f"spill={r.spill_stores}/{r.spill_loads} smem={r.shared_bytes} resident={r.resident_programs} "
            f"{r.compile_s:.1f}s [{cx}] {verdict}  ({len(r.cases)} cases, e.g. {r.cases[0] if r.cases else ''})")


def environment() -> dict:
    import triton

    from triton.backends.nvidia.compiler import get_ptxas_version

    try:
        ptxas = get_ptxas_version(90).splitlines()[-1]
    except Exception as err:  # pragma: no cover - depends on the wheel
        ptxas = f"unknown ({err})"
    return {"triton": triton.__version__, "torch": torch.__version__, "ptxas": ptxas, "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusellm_kernels.ops.aot_compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--exhaustive", action="store_true", help="the full sweep (V up to 256 000, S 1-4, K 5-16, fp16)")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes (default: min(4, cores))")
    ap.add_argument("--json", metavar="FILE", help="write the environment and every result as JSON to FILE")
    ap.add_argument("--quiet", action="store_true", help="no line per binary")
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error(f"--jobs {a.jobs}: must be at least 1")
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as err:
        print(f"aot_compile: this triton has no NVIDIA backend ({err}); nothing to compile", file=sys.stderr)
        return 3
    t0 = time.perf_counter()
    cases = exhaustive_cases() if a.exhaustive else ci_cases()
    say = None if a.quiet else (lambda msg: print(msg, flush=True))
    try:
        results = compile_cases(cases, a.targets, jobs=a.jobs, progress=say)
    except RuntimeError as err:
        print(f"aot_compile: {err}", file=sys.stderr)
        return 2
    bad = [r for r in results if r.problems]
    wall = time.perf_counter() - t0
    print(f"aot_compile: {len(results)} binaries, {len(bad)} with problems, {wall:.0f} s", flush=True)
    if a.json:
        payload = {"environment": environment(), "exhaustive": a.exhaustive, "wall_s": round(wall, 1),
                   "results": [dataclasses.asdict(r) for r in results]}
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, a.json)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
