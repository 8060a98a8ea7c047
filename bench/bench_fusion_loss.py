"""Fusion loss on given logits, forward + backward, against the baselines of docs/performance.md.

    python -m bench.bench_fusion_loss                          # GPU: N=8192, V in {32000, 128256}, S in {2,3,4}
    python -m bench.bench_fusion_loss --quick --device cpu     # smoke test, a few seconds
    python -m bench.bench_fusion_loss --providers fused --vocab 128256 --candidates 3 --programs-per-sm 1 2 4
    python -m bench.plot bench/results/<card>/fusion_loss.jsonl

Providers (all compute λ·CE + (1-λ)·soft-CE to the min-CE teacher, except liger_ce):
  fused           fusellm_kernels.fusion_loss (backend "auto" on CUDA, "torch" on CPU)
  fused_bucket    the same with teacher_tail="bucket" (each teacher's top-k tail kept, the
                  lse read per row): checked against dense_bucket, not dense_teacher
  dense_bucket    its reference in fp32: dense [N, V] per-candidate distributions and tails
  dense_teacher   the reference in fp32: dense [N, V] teacher built by scatter
  gather_eager    log_softmax + gather at the S·K teacher ids
  gather_compile  the same under torch.compile
  liger_ce        Liger-Kernel cross entropy: CE only, no teacher (a lower bound for one kernel)
  fused_pps<P>    with --programs-per-sm P ... (CUDA only): the fused Triton path with P persistent
                  programs per SM instead of the launcher's choice; the grid and pass 2's L2
                  footprint (grid x V x bytes per logit) are recorded next to the card's L2 size

Floor: the bf16 logits read once and the bf16 gradient written once at the copy bandwidth
measured on the same card in the same run. Every provider but liger_ce is checked against
dense_teacher on the benchmark's own inputs before it is timed: a fast wrong kernel must
show up as a failure, not as a good number.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from bench.common import (
    MIB,
    BenchRecord,
    Ceilings,
    Environment,
    InputRotation,
    Timing,
    append_jsonl,
    cache_bytes,
    dtype_name,
    environment,
    format_table,
    make_record,
    measure_copy_bandwidth,
    peak_extra_memory,
    resolve_device,
    results_dir,
    shape_label,
    synchronize,
    time_fn,
)

if TYPE_CHECKING:
    from fusellm_kernels.ops.launch_config import DeviceSpec

OP = "fusion_loss"
# liger_ce runs last in every shape: it writes its gradient over the logits it is given,
# which would leave the other providers timing (and checking) on changed inputs.
PROVIDERS = ("fused", "fused_bucket", "dense_teacher", "dense_bucket", "gather_eager", "gather_compile", "liger_ce")
REFERENCE = "dense_teacher"
# the provider each one is checked against (its own loss); the rest use REFERENCE
REFERENCE_OF = {"fused_bucket": "dense_bucket", "dense_bucket": None, "dense_teacher": None, "liger_ce": None}
IGNORE_INDEX = -100
LAM = 0.9
SEQUENCES = 4  # rows form this many sequences; min_ce picks one teacher per sequence
LOSS_RTOL = 1e-4  # both sides accumulate in fp32 from the same inputs
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # ~ a few ulps of the stored gradient

LossFn = Callable[["LossInputs"], Tensor]
PPS_PREFIX = "fused_pps"  # fused_pps<P>: the fused provider at P persistent programs per SM


class Skip(Exception):
    """A provider that cannot run here; recorded with the reason, not counted as a failure."""


@dataclasses.dataclass(frozen=True)
class LossInputs:
    logits: Tensor  # [N, V] `dtype`, leaf requiring grad
    labels: Tensor  # int64 [N]; ~5 % IGNORE_INDEX, as prompt tokens are in real data
    teacher_ids: Tensor  # int32 [S, N, K]; ~10 % of slots -1 (empty)
    teacher_logits: Tensor  # float32 [S, N, K], descending like a top-k
    teacher_ce: Tensor  # float32 [S, N]
    segment_ids: Tensor  # int64 [N], SEQUENCES equal segments
    teacher_lse: Tensor  # float32 [S, N]: the top-k hold 20-90 % of each row's mass


def make_teacher_inputs(n: int, v: int, s: int, k: int, g: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """labels, teacher_ids, teacher_logits, teacher_ce and segment_ids as `LossInputs` documents
    them; shared by every loss benchmark so they all time the same kind of teachers."""

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, device=device)

    labels = torch.randint(0, v, (n,), generator=g, device=device)
    ids = torch.randint(0, v, (s, n, k), generator=g, device=device, dtype=torch.int32)
    teacher_logits = (3 * torch.randn(s, n, k, generator=g, device=device)).sort(dim=-1, descending=True).values
    return dict(
        labels=torch.where(rand(n) < 0.05, IGNORE_INDEX, labels),
        teacher_ids=torch.where(rand(s, n, k) < 0.1, -1, ids).to(torch.int32),
        teacher_logits=teacher_logits,
        teacher_ce=0.5 + 3 * rand(s, n),
        segment_ids=torch.arange(n, device=device) // max(1, n // SEQUENCES),
        # the top-k hold 20-90 % of the row's mass (slots emptied later count as unmapped)
        teacher_lse=teacher_logits.logsumexp(-1) - torch.log(0.2 + 0.7 * rand(s, n)),
    )


def make_inputs(n: int, v: int, s: int, k: int, dtype: torch.dtype, device: torch.device, seed: int) -> LossInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, v, generator=g, device=device, dtype=dtype).mul_(2).requires_grad_()
    return LossInputs(logits=logits, **make_teacher_inputs(n, v, s, k, g, device))


def _loss_kwargs(x: LossInputs) -> dict:
    return dict(teacher_ce=x.teacher_ce, segment_ids=x.segment_ids, strategy="min_ce", lam=LAM, ignore_index=IGNORE_INDEX)


def build_provider(name: str, device: torch.device, explicit: bool) -> LossFn:
    """The provider's loss function; raises Skip or ImportError when it cannot run here."""
    from fusellm_kernels import fusion_loss
    from fusellm_kernels.reference import fusion_loss_gather, fusion_loss_reference

    if name == "fused":
        backend = "auto" if device.type == "cuda" else "torch"
        return lambda x: fusion_loss(x.logits, x.labels, x.teacher_ids, x.teacher_logits, backend=backend, **_loss_kwargs(x))
    if name == "fused_bucket":
        backend = "auto" if device.type == "cuda" else "torch"
        return lambda x: fusion_loss(x.logits, x.labels, x.teacher_ids, x.teacher_logits, backend=backend,
                                     teacher_lse=x.teacher_lse, teacher_tail="bucket", **_loss_kwargs(x))
    if name == "dense_bucket":
        return lambda x: fusion_loss_reference(x.logits, x.labels, x.teacher_ids, x.teacher_logits, dtype=torch.float32,
                                               teacher_lse=x.teacher_lse, teacher_tail="bucket", **_loss_kwargs(x))
    if name.startswith(PPS_PREFIX):
        if device.type != "cuda":
            raise Skip("programs per SM exist only on CUDA (the Triton interpreter has no SMs)")
        from fusellm_kernels.ops.launch_config import persistent_programs

        programs_per_sm = int(name[len(PPS_PREFIX):])

        def fused_at(x: LossInputs) -> Tensor:
            # the forward launch is the one that reads the logits; with an upstream gradient of
            # 1 the backward launch skips every row whatever its program count
            with persistent_programs(programs_per_sm):
                return fusion_loss(x.logits, x.labels, x.teacher_ids, x.teacher_logits, backend="auto", **_loss_kwargs(x))

        return fused_at
    if name == "dense_teacher":
        return lambda x: fusion_loss_reference(
            x.logits, x.labels, x.teacher_ids, x.teacher_logits, dtype=torch.float32, **_loss_kwargs(x)
        )
    if name == "gather_eager":
        return lambda x: fusion_loss_gather(x.logits, x.labels, x.teacher_ids, x.teacher_logits, **_loss_kwargs(x))
    if name == "gather_compile":
        if device.type != "cuda" and not explicit:
            raise Skip("torch.compile takes ~40 s on a small CPU; name it in --providers to run it")
        compiled = torch.compile(fusion_loss_gather)
        return lambda x: compiled(x.logits, x.labels, x.teacher_ids, x.teacher_logits, **_loss_kwargs(x))
    if name == "liger_ce":
        if device.type != "cuda":
            raise Skip("Liger's Triton kernels need CUDA")
        # The functional API by keyword: Function.apply's positional arguments changed between releases.
        from liger_kernel.transformers.functional import liger_cross_entropy

        def liger(x: LossInputs) -> Tensor:
            out = liger_cross_entropy(x.logits, x.labels, ignore_index=IGNORE_INDEX)
            if isinstance(out, Tensor):
                return out
            return out.loss if hasattr(out, "loss") else out[0]  # some releases return a tuple or a record

        return liger
    raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


def launch_notes(name: str, n: int, v: int, dtype: torch.dtype, spec: DeviceSpec | None) -> dict:
    """What the fusion-loss kernel launches for a `fused*` provider on a CUDA card (`spec`, from
    `launch_config.device_spec`; None off CUDA: no notes): programs per SM, grid (SMs x programs,
    capped by N), and pass 2's L2 footprint (grid x V x bytes per logit: the rows in flight
    whose recent blocks the backwards walk re-reads) next to the card's L2 size
    (`torch.cuda.get_device_properties(dev).L2_cache_size`, as the spec reads it)."""
    if spec is None or not (name == "fused" or name.startswith(PPS_PREFIX)):
        return {}
    from fusellm_kernels.ops.launch_config import fusion_loss_launch

    elem = torch.finfo(dtype).bits // 8
    asked = int(name[len(PPS_PREFIX):]) if name.startswith(PPS_PREFIX) else None
    try:
        launch = fusion_loss_launch(n, v, spec, asked, elem)
    except ValueError as e:  # more programs than an SM holds: the provider's run fails with the same words
        return dict(programs_per_sm=asked, launch_refused=str(e))
    footprint = launch.grid * v * elem
    return dict(
        programs_per_sm=launch.programs_per_sm, programs_per_sm_default=asked is None, grid=launch.grid,
        sm_count=spec.sm_count, num_warps=launch.num_warps, maxnreg=launch.maxnreg,
        pass2_l2_bytes=footprint, l2_bytes=spec.l2_bytes, pass2_l2_fraction=round(footprint / spec.l2_bytes, 3),
        pass2_fits_l2=footprint <= spec.l2_bytes,
    )


def forward_backward(loss_fn: LossFn, x: LossInputs) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d logits). autograd.grad returns a fresh gradient, so no call pays for
    accumulating into a .grad left by the previous one."""
    loss = loss_fn(x)
    (grad,) = torch.autograd.grad(loss, x.logits)
    return loss.detach(), grad


def relative_errors(got: tuple[Tensor, Tensor], want: tuple[Tensor, Tensor]) -> tuple[float, float]:
    loss_err = (got[0].double() - want[0].double()).abs() / want[0].double().abs().clamp_min(1e-30)
    grad_err = torch.linalg.vector_norm(got[1].float() - want[1].float()) / torch.linalg.vector_norm(want[1].float()).clamp_min(1e-30)
    return float(loss_err), float(grad_err)


@dataclasses.dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    rows: int
    vocabs: tuple[int, ...]
    candidates: tuple[int, ...]
    top_k: int
    warmup_ms: float
    rep_ms: float
    sweep: bool = False  # --programs-per-sm given: launch notes on the fused* records


def bench_provider(
    name: str, loss_fn: LossFn, rotation: InputRotation[LossInputs], reference: tuple[Tensor, Tensor] | None, cfg: Config,
    reference_name: str = REFERENCE,
) -> tuple[Timing | None, float | None, dict]:
    """Check, time and measure one provider on one shape: (timing or None, peak extra MiB, extra)."""
    extra: dict = {"inputs_rotated": len(rotation)}
    start = time.perf_counter()
    first = forward_backward(loss_fn, rotation.sets[0])  # includes any compile: worth knowing, never timed
    synchronize(cfg.device)
    extra["first_call_s"] = round(time.perf_counter() - start, 2)
    errors = relative_errors(first, reference) if reference is not None else None
    del first  # an [N, V] gradient: freed before timing
    if errors is not None:
        loss_err, grad_err = errors
        ok = loss_err <= LOSS_RTOL and grad_err <= GRAD_RTOL[cfg.dtype]
        extra.update(checked_against=reference_name, loss_rel_err=loss_err, grad_rel_err=grad_err, check_ok=ok)
        print(f"  check {name}: loss rel err {loss_err:.2e}, grad rel err {grad_err:.2e} -> {'ok' if ok else 'WRONG'}", flush=True)
        if not ok:
            return None, None, {**extra, "skipped": f"wrong result: loss rel {loss_err:.2e}, grad rel {grad_err:.2e}"}
    elif name == "liger_ce":
        extra["note"] = "CE only (no teacher term): not the same loss, so not checked"
    timing = time_fn(lambda: forward_backward(loss_fn, rotation.next()), warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms, device=cfg.device)

    kept: list[Tensor] = []
    x = rotation.sets[0]
    raw = peak_extra_memory(lambda: kept.append(forward_backward(loss_fn, x)[1]), cfg.device)
    peak = None
    if raw is not None:
        # The gradient is the op's output, not its overhead: excluded unless written over the logits.
        grad = kept[0]
        in_place = grad.data_ptr() == x.logits.data_ptr()
        peak = max(0.0, raw - (0 if in_place else grad.numel() * grad.element_size() / MIB))
        extra.update(peak_raw_mib=round(raw, 1), grad_in_place=in_place)
    return timing, peak, extra


def run(cfg: Config, providers: list[str], explicit: bool, out_file: Path, env: Environment) -> tuple[list[BenchRecord], int]:
    """All shapes × providers; records are appended as they are made, so a run cut short by a
    timeout still leaves its data. Returns (records, number of failures)."""
    copy_bw = measure_copy_bandwidth(cfg.device)
    ceilings = Ceilings(copy_bytes_per_s=copy_bw)
    print(f"card {env.card}: copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)", flush=True)

    spec = None
    if cfg.device.type == "cuda":
        from fusellm_kernels.ops.launch_config import device_spec

        spec = device_spec(cfg.device)
    built: dict[str, LossFn | Exception] = {}
    records: list[BenchRecord] = []
    failures = 0
    elem = torch.finfo(cfg.dtype).bits // 8
    for v in cfg.vocabs:
        for s in cfg.candidates:
            n, k = cfg.rows, cfg.top_k
            shape = {"N": n, "V": v, "S": s, "K": k, "seq_len": max(1, n // SEQUENCES)}
            print(f"{OP} {shape_label(shape)} {dtype_name(cfg.dtype)}", flush=True)
            set_bytes = n * v * elem + s * n * (8 * k + 4) + 16 * n  # logits, teacher ids+logits+ce, labels+segments
            rotation = InputRotation(
                lambda i: make_inputs(n, v, s, k, cfg.dtype, cfg.device, seed=1_000_003 * v + 101 * s + i),
                set_bytes,
                cache=cache_bytes(cfg.device),
            )
            references: dict[str, tuple[Tensor, Tensor]] = {}
            for name in providers:
                if name not in built:
                    try:
                        built[name] = build_provider(name, cfg.device, explicit)
                    except (ImportError, Skip) as e:
                        built[name] = e
                fn = built[name]
                notes = launch_notes(name, n, v, cfg.dtype, spec) if cfg.sweep else {}
                base = dict(op=OP, provider=name, shape=shape, dtype=cfg.dtype, env=env, bytes_moved=2 * n * v * elem, ceilings=ceilings)
                if isinstance(fn, Exception):
                    record = make_record(**base, extra={**notes, "skipped": f"{type(fn).__name__}: {fn}"})
                else:
                    try:
                        against = REFERENCE_OF.get(name, REFERENCE)
                        if against is not None and against not in references:
                            references[against] = forward_backward(build_provider(against, cfg.device, explicit), rotation.sets[0])
                        check = references[against] if against is not None else None
                        timing, peak, extra = bench_provider(name, fn, rotation, check, cfg, against or REFERENCE)
                        failures += timing is None
                        record = make_record(**base, timing=timing, peak_extra_mib=peak, extra={**notes, **extra})
                    except Exception as e:  # noqa: BLE001 - one broken provider must not lose the others' numbers
                        traceback.print_exc()
                        failures += 1
                        record = make_record(**base, extra={**notes, "skipped": f"failed: {type(e).__name__}: {e}"[:500]})
                append_jsonl(out_file, record)
                records.append(record)
                print("  " + format_table([record]).splitlines()[1], flush=True)
            del rotation, references
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()
    return records, failures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timing windows (CI smoke test)")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<card>/)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--providers", help=f"comma-separated subset of {','.join(PROVIDERS)}")
    p.add_argument("--rows", type=int, help="N (default 8192; quick 64)")
    p.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default 32000 128256; quick 1000 70000)")
    p.add_argument("--candidates", type=int, nargs="+", help="teacher counts S (default 2 3 4; quick 2 4)")
    p.add_argument("--rep-ms", type=float, help="timing window per provider and shape in ms (default 200; quick 20)")
    p.add_argument("--programs-per-sm", type=int, nargs="+", metavar="P",
                   help=f"CUDA only: also time the fused provider at P persistent programs per SM, one provider "
                        f"{PPS_PREFIX}<P> each (default: the launcher's choice, 4 below V = 65536, 2 from there)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    providers = list(PROVIDERS)
    if args.providers:
        asked = [p.strip() for p in args.providers.split(",") if p.strip()]
        unknown = sorted(set(asked) - set(PROVIDERS))
        if unknown:
            raise SystemExit(f"unknown provider(s) {unknown}; choose from {', '.join(PROVIDERS)}")
        providers = [p for p in PROVIDERS if p in asked]  # canonical order: liger_ce last
    sweep = list(dict.fromkeys(args.programs_per_sm or ()))  # de-duplicated, in the order given
    if any(p < 1 for p in sweep):
        raise SystemExit("--programs-per-sm takes counts of at least 1")
    if sweep and device.type != "cuda":
        print(f"note: --programs-per-sm ignored on {device.type}: the Triton interpreter has no SMs to sweep", flush=True)
        sweep = []
    if sweep and "fused" not in providers:
        raise SystemExit("--programs-per-sm sweeps the fused provider: add fused to --providers")
    if sweep:
        at = providers.index("fused") + 1
        providers[at:at] = [f"{PPS_PREFIX}{p}" for p in sweep]
    cfg = Config(
        device=device,
        # bf16 is what training feeds the loss on a GPU; CPUs lack fast bf16, and fp32 keeps the check tight.
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        rows=args.rows or (64 if args.quick else 8192),
        vocabs=tuple(args.vocab or ((1000, 70000) if args.quick else (32000, 128256))),
        candidates=tuple(args.candidates or ((2, 4) if args.quick else (2, 3, 4))),
        top_k=10,
        warmup_ms=5.0 if args.quick else 25.0,
        rep_ms=args.rep_ms or (20.0 if args.quick else 200.0),
        sweep=bool(sweep),
    )
    env = environment(device)
    out_file = (args.out or results_dir(env.card)) / f"{OP}.jsonl"
    records, failures = run(cfg, providers, bool(args.providers), out_file, env)
    print(f"\n{OP} on {env.card} (torch {env.torch}, triton {env.triton}, commit {env.commit}) -> {out_file}")
    print(format_table(records))
    if failures:
        print(f"{failures} provider run(s) failed or gave wrong results", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
