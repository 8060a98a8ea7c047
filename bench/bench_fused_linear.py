"""Fused lm_head + fusion loss, forward + backward, against the baselines of docs/performance.md.

    python -m bench.bench_fused_linear                             # GPU: N=8192, H=4096, V in {32000, 128256}, S in {2,3,4}
    python -m bench.bench_fused_linear --chunk-rows 0 1024 2048    # sweep the fused provider's chunk size (0 = automatic)
    python -m bench.bench_fused_linear --quick --device cpu        # smoke test, a few seconds
    python -m bench.plot bench/results/<card>/fused_linear_loss.jsonl

Providers (all take hidden [N, H] and the lm_head weight [V, H] and return gradients to hidden,
weight and, with --bias, bias):
  fused        fusellm_kernels.fused_linear_fusion_loss: λ·CE + (1-λ)·soft-CE to the min-CE
               teacher, chunked, no [N, V] logits. With --chunk-rows, one provider per chunk
               size: `fused` for the automatic one (0), `fused_c<rows>` for the others.
  fused_ce     the same op with lam=1 (the teacher term weighted 0): our CE-only mode, the
               like-for-like comparison with the CE-only baselines below; checked against
               cross_entropy on materialised logits
  eager        logits = hidden @ weight.T (+ bias), then fusellm_kernels.reference.fusion_loss_gather
               (log_softmax + gather at the S·K teacher ids): what a training loop does without us
  torch_lce    torch.nn.functional.linear_cross_entropy (torch >= 2.13), as called by default
               (options=None): CE only. Skipped, with the reason recorded, on an older torch
  liger_flce   Liger-Kernel fused linear cross entropy: CE only, no teacher term
  cce          Cut Cross-Entropy (cut_cross_entropy.linear_cross_entropy, its defaults): CE only

Floor: 6·N·H·V FLOPs (the logits, then the gradients to hidden and to weight) at the bf16
matmul rate measured on the same card in the same run. Before timing, once per shape, every
fused variant is checked against eager (fused_ce against cross_entropy on the materialised
logits) on the benchmark's own inputs plus a random bias (so the bias gradient is checked too
even when --bias is off): relative error of the loss and of each of the three gradients. A
wrong result is recorded and fails the run (exit 1). The CE-only baselines (torch_lce,
liger_flce, cce) are not checked.

Peak extra memory is what a forward + backward allocates above its inputs, minus the
gradients it returns (those are the op's output; a fused kernel's fp32 weight-gradient
accumulator or its chunk of logits is overhead and is counted).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from bench.bench_fusion_loss import IGNORE_INDEX, LAM, SEQUENCES, Skip, make_teacher_inputs
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
    measure_matmul_tflops,
    peak_extra_memory,
    resolve_device,
    results_dir,
    shape_label,
    synchronize,
    time_fn,
)

OP = "fused_linear_loss"
# The CE-only baselines run last in every shape, after everything that is checked.
PROVIDERS = ("fused", "fused_ce", "eager", "torch_lce", "liger_flce", "cce")
REFERENCE = "eager"
# What each checked provider is checked against (`eager_ce` is a reference only, never timed).
REFERENCES = {"fused": REFERENCE, "fused_ce": "eager_ce"}
CE_ONLY = ("torch_lce", "liger_flce", "cce")
CE_ONLY_LAM = 1.0  # fused_ce: λ = 1, so the loss is plain mean cross entropy, as the CE-only baselines compute
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# fp32: both sides do the same fp32 arithmetic in a different order. bf16/fp16: both sides
# store the logits and their gradient in the input dtype; they differ where a matmul tiles
# differently or the weight gradient is summed over chunks in fp32 and rounded once (eager
# rounds one full-length product), which moves the gradients by about an ulp here and there:
# norm-relative errors of ~3e-3 measured on CPU in bf16 with 4 chunks, losses within ~1e-7.
LOSS_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-4, torch.float16: 5e-4}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}

LossFn = Callable[["LinearInputs"], Tensor]


@dataclasses.dataclass(frozen=True)
class LinearInputs:
    hidden: Tensor  # [N, H] `dtype`, leaf requiring grad
    weight: Tensor  # [V, H] `dtype`, leaf requiring grad
    bias: Tensor | None  # [V] `dtype`, leaf requiring grad, or None
    labels: Tensor  # int64 [N]; ~5 % IGNORE_INDEX
    teacher_ids: Tensor  # int32 [S, N, K]; ~10 % of slots -1 (empty)
    teacher_logits: Tensor  # float32 [S, N, K], descending like a top-k
    teacher_ce: Tensor  # float32 [S, N]
    segment_ids: Tensor  # int64 [N], SEQUENCES equal segments
    teacher_lse: Tensor  # float32 [S, N] (read by no provider here yet)

    def params(self) -> list[Tensor]:
        """The tensors gradients are taken to: hidden, weight and bias when there is one."""
        return [self.hidden, self.weight] + ([self.bias] if self.bias is not None else [])


def random_bias(v: int, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return (0.5 * torch.randn(v, generator=g, device=device, dtype=torch.float32)).to(dtype).requires_grad_()


def make_inputs(
    n: int, h: int, v: int, s: int, k: int, dtype: torch.dtype, device: torch.device, seed: int, bias: bool
) -> LinearInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    # weight ~ N(0, 4/H): logits of standard deviation ~2, as a trained lm_head gives.
    weight = torch.randn(v, h, generator=g, device=device, dtype=torch.float32).mul_(2 / math.sqrt(h))
    hidden = torch.randn(n, h, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_()
    return LinearInputs(
        hidden=hidden,
        weight=weight.to(dtype).requires_grad_(),
        bias=random_bias(v, dtype, device, seed + 7) if bias else None,
        **make_teacher_inputs(n, v, s, k, g, device),
    )


def _loss_kwargs(x: LinearInputs) -> dict:
    return dict(teacher_ce=x.teacher_ce, segment_ids=x.segment_ids, strategy="min_ce", lam=LAM, ignore_index=IGNORE_INDEX)


def _first_tensor(out) -> Tensor:
    """The loss from whatever a CE library returns: a tensor, a tuple or a record with .loss."""
    if isinstance(out, Tensor):
        return out
    return out.loss if hasattr(out, "loss") else out[0]


def build_provider(name: str, device: torch.device, chunk_rows: int | None = None) -> LossFn:
    """The provider's loss function; raises Skip or ImportError when it cannot run here."""
    if name in ("fused", "fused_ce"):  # fused_ce: the same op with the teacher term weighted 0
        from fusellm_kernels import fused_linear_fusion_loss  # ImportError until the public op exists

        lam = CE_ONLY_LAM if name == "fused_ce" else LAM
        return lambda x: fused_linear_fusion_loss(
            x.hidden, x.weight, x.labels, x.teacher_ids, x.teacher_logits, bias=x.bias, chunk_rows=chunk_rows,
            backend="auto", **{**_loss_kwargs(x), "lam": lam},
        )
    if name == "eager_ce":  # the reference of fused_ce
        return lambda x: torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(x.hidden, x.weight, x.bias).float(), x.labels, ignore_index=IGNORE_INDEX
        )
    if name == "eager":
        from fusellm_kernels.reference import fusion_loss_gather

        def eager(x: LinearInputs) -> Tensor:
            logits = torch.nn.functional.linear(x.hidden, x.weight, x.bias)  # hidden @ weight.T (+ bias)
            return fusion_loss_gather(logits, x.labels, x.teacher_ids, x.teacher_logits, **_loss_kwargs(x))

        return eager
    if name == "torch_lce":
        native = getattr(torch.nn.functional, "linear_cross_entropy", None)
        if native is None:
            raise Skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (added in 2.13)")
        # options=None: the call as documented and as a user writes it (linear + cross_entropy
        # under one op). The chunked path (options=LinearCrossEntropyOptions()) was slower on
        # CPU in fp32 (bench/README.md, "CPU baseline").
        return lambda x: native(x.hidden, x.weight, x.labels, linear_bias=x.bias, ignore_index=IGNORE_INDEX)
    if name == "liger_flce":
        if device.type != "cuda":
            raise Skip("Liger's Triton kernels need CUDA")
        # The functional API by keyword: Function.apply's positional arguments changed between releases.
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda x: _first_tensor(
            liger_fused_linear_cross_entropy(x.hidden, x.weight, x.labels, bias=x.bias, ignore_index=IGNORE_INDEX)
        )
    if name == "cce":
        if device.type != "cuda":
            raise Skip("Cut Cross-Entropy's kernels need CUDA")
        from cut_cross_entropy import linear_cross_entropy

        def cce(x: LinearInputs) -> Tensor:
            extra = {"bias": x.bias} if x.bias is not None else {}  # older releases have no bias argument
            return _first_tensor(linear_cross_entropy(x.hidden, x.weight, x.labels, ignore_index=IGNORE_INDEX, **extra))

        return cce
    raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


def forward_backward(loss_fn: LossFn, x: LinearInputs) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(loss, gradients to x.params()). autograd.grad returns fresh gradients, so no call pays
    for accumulating into a .grad left by the previous one."""
    loss = loss_fn(x)
    grads = torch.autograd.grad(loss, x.params())
    return loss.detach(), tuple(grads)


GRAD_NAMES = ("hidden", "weight", "bias")


def relative_errors(got: tuple[Tensor, tuple[Tensor, ...]], want: tuple[Tensor, tuple[Tensor, ...]]) -> dict[str, float]:
    """Relative error of the loss and norm-relative error of each gradient."""

    def rel(a: Tensor, b: Tensor) -> float:
        a, b = a.float(), b.float()  # fp32 norms are ample for errors of 1e-7 and up; fp64 copies of a V×H gradient are 4 GiB
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))

    errors = {"loss_rel_err": rel(got[0], want[0])}
    for name, a, b in zip(GRAD_NAMES, got[1], want[1]):
        errors[f"grad_{name}_rel_err"] = rel(a, b)
    return errors


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed provider: `label` goes into the record, `name` picks the implementation."""

    label: str
    name: str
    chunk_rows: int | None = None  # fused/fused_ce only; None = the op's automatic choice


def variants(providers: list[str], chunk_rows: tuple[int, ...]) -> list[Variant]:
    out = []
    for name in providers:
        if name != "fused":
            out.append(Variant(name, name))
            continue
        for c in dict.fromkeys(chunk_rows):  # de-duplicated, in the order given
            out.append(Variant("fused", "fused") if c == 0 else Variant(f"fused_c{c}", "fused", c))
    return out


def chunk_extra(variant: Variant, n: int, v: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The chunk size the fused op will use and the number of chunks (for the record)."""
    if variant.name not in ("fused", "fused_ce"):
        return {}
    rows = variant.chunk_rows
    if rows is None:
        try:
            from fusellm_kernels.fused_linear import default_chunk_rows

            rows = default_chunk_rows(n, v, dtype, device)
        except (ImportError, AttributeError):  # an internal helper: the record loses a note, not the run
            return {"chunk_auto": True}
    rows = min(n, rows)  # a chunk larger than N runs as one chunk of N rows
    return {"chunk_auto": variant.chunk_rows is None, "chunk_rows": rows, "chunks": -(-n // rows)}


@dataclasses.dataclass
class Config:
    device: torch.device
    dtype: torch.dtype
    rows: int
    hidden: int
    vocabs: tuple[int, ...]
    candidates: tuple[int, ...]
    top_k: int
    chunk_rows: tuple[int, ...]  # 0 = automatic
    bias: bool
    warmup_ms: float
    rep_ms: float
    min_reps: int  # CPU only: timed calls at least (do_bench picks its own count on CUDA)
    matmul_rep_ms: float


def bench_provider(
    variant: Variant,
    loss_fn: LossFn,
    rotation: InputRotation[LinearInputs],
    check: tuple[LinearInputs, tuple[Tensor, tuple[Tensor, ...]]] | None,
    cfg: Config,
    reference: str = REFERENCE,
) -> tuple[Timing | None, float | None, dict]:
    """Check, time and measure one provider on one shape: (timing or None, peak extra MiB, extra)."""
    extra: dict = {"inputs_rotated": len(rotation)}
    start = time.perf_counter()
    first = forward_backward(loss_fn, check[0] if check is not None else rotation.sets[0])  # includes any compile
    synchronize(cfg.device)
    extra["first_call_s"] = round(time.perf_counter() - start, 2)
    if check is not None:
        errors = relative_errors(first, check[1])
        grad_err = max(v for k, v in errors.items() if k.startswith("grad_"))
        ok = errors["loss_rel_err"] <= LOSS_RTOL[cfg.dtype] and grad_err <= GRAD_RTOL[cfg.dtype]
        extra.update(checked_against=reference, checked_with_bias=True, **errors, grad_rel_err=grad_err, check_ok=ok)
        print(f"  check {variant.label}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) + f" -> {'ok' if ok else 'WRONG'}", flush=True)
        if not ok:
            return None, None, {**extra, "skipped": f"wrong result: loss rel {errors['loss_rel_err']:.2e}, grad rel {grad_err:.2e}"}
    elif variant.name in CE_ONLY:
        extra["note"] = "CE only (no teacher term): not the same loss, so not checked"
    del first  # gradients as large as the weight: freed before timing
    timing = time_fn(
        lambda: forward_backward(loss_fn, rotation.next()), warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms, device=cfg.device, min_reps=cfg.min_reps
    )

    kept: list[tuple[Tensor, ...]] = []
    x = rotation.sets[0]
    raw = peak_extra_memory(lambda: kept.append(forward_backward(loss_fn, x)[1]), cfg.device)
    peak = None
    if raw is not None:
        # The gradients are the op's output, not its overhead: excluded unless written over an input.
        inputs = {p.data_ptr() for p in x.params()}
        out_mib = sum(g.numel() * g.element_size() for g in kept[0] if g.data_ptr() not in inputs) / MIB
        peak = max(0.0, raw - out_mib)
        extra.update(peak_raw_mib=round(raw, 1), grads_mib=round(out_mib, 1))
    return timing, peak, extra


def run(cfg: Config, providers: list[str], out_file: Path, env: Environment) -> tuple[list[BenchRecord], int]:
    """All shapes × providers; records are appended as they are made, so a run cut short by a
    timeout still leaves its data. Returns (records, number of failures)."""
    matmul = measure_matmul_tflops(cfg.device, rep_ms=cfg.matmul_rep_ms)
    ceilings = Ceilings(matmul_flops_per_s=matmul)
    print(f"card {env.card}: matmul {matmul / 1e12:.3g} TFLOP/s ({'bf16 8192³' if cfg.device.type == 'cuda' else 'fp32 1024³'})", flush=True)

    built: dict[Variant, LossFn | Exception] = {}
    records: list[BenchRecord] = []
    failures = 0
    elem = torch.finfo(cfg.dtype).bits // 8
    n, h, k = cfg.rows, cfg.hidden, cfg.top_k
    for v in cfg.vocabs:
        for s in cfg.candidates:
            shape = {"N": n, "H": h, "V": v, "S": s, "K": k, "seq_len": max(1, n // SEQUENCES)}
            if cfg.bias:
                shape["bias"] = True
            print(f"{OP} {shape_label(shape)} {dtype_name(cfg.dtype)}", flush=True)
            seed = 1_000_003 * v + 101 * s
            set_bytes = (n + v + 1) * h * elem + v * elem + s * n * (8 * k + 4) + 16 * n
            rotation = InputRotation(
                lambda i: make_inputs(n, h, v, s, k, cfg.dtype, cfg.device, seed=seed + i, bias=cfg.bias),
                set_bytes,
                cache=cache_bytes(cfg.device),
            )
            first_set = rotation.sets[0]
            # The check runs with a bias even when timing runs without, so all three gradients are checked.
            check_inputs = first_set if first_set.bias is not None else dataclasses.replace(
                first_set, bias=random_bias(v, cfg.dtype, cfg.device, seed + 7)
            )
            references: dict[str, tuple[Tensor, tuple[Tensor, ...]]] = {}
            chunks_done: dict[int, str] = {}  # resolved rows per chunk -> the fused variant that ran them
            for variant in variants(providers, cfg.chunk_rows):
                if variant not in built:
                    try:
                        built[variant] = build_provider(variant.name, cfg.device, variant.chunk_rows)
                    except (ImportError, Skip) as e:
                        built[variant] = e
                fn = built[variant]
                base = dict(op=OP, provider=variant.label, shape=shape, dtype=cfg.dtype, env=env, flops=6 * n * h * v, ceilings=ceilings)
                notes = chunk_extra(variant, n, v, cfg.dtype, cfg.device)
                same = chunks_done.get(notes.get("chunk_rows", -1)) if variant.name == "fused" else None
                if isinstance(fn, Exception):
                    record = make_record(**base, extra={**notes, "skipped": f"{type(fn).__name__}: {fn}"})
                elif same is not None:  # e.g. --chunk-rows 2048 at N=1024: the same computation again
                    record = make_record(**base, extra={**notes, "skipped": f"same chunk size as {same} ({notes['chunk_rows']} rows)"})
                else:
                    try:
                        check = None
                        ref_name = REFERENCES.get(variant.name)
                        if ref_name is not None:
                            if ref_name not in references:
                                references[ref_name] = forward_backward(build_provider(ref_name, cfg.device), check_inputs)
                            check = (check_inputs, references[ref_name])
                        timing, peak, extra = bench_provider(variant, fn, rotation, check, cfg, ref_name or REFERENCE)
                        if variant.name == "fused" and "chunk_rows" in notes:
                            chunks_done[notes["chunk_rows"]] = variant.label
                        failures += timing is None
                        record = make_record(**base, timing=timing, peak_extra_mib=peak, extra={**notes, **extra})
                    except Exception as e:  # noqa: BLE001 - one broken provider must not lose the others' numbers
                        traceback.print_exc()
                        failures += 1
                        record = make_record(**base, extra={**notes, "skipped": f"failed: {type(e).__name__}: {e}"[:500]})
                append_jsonl(out_file, record)
                records.append(record)
                print("  " + format_table([record]).splitlines()[1], flush=True)
            del rotation, references, first_set, check_inputs
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()
    return records, failures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timing windows (CI smoke test)")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<card>/)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--providers", help=f"comma-separated subset of {','.join(PROVIDERS)} (fused covers every --chunk-rows)")
    p.add_argument("--rows", type=int, help="N (default 8192; quick 64)")
    p.add_argument("--hidden", type=int, help="H (default 4096; quick 32)")
    p.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes V (default 32000 128256; quick 1000 70000)")
    p.add_argument("--candidates", type=int, nargs="+", help="teacher counts S (default 2 3 4; quick 2 4)")
    p.add_argument("--chunk-rows", type=int, nargs="+", default=[0], metavar="C",
                   help="fused provider's rows per chunk, one provider each; 0 = the op's automatic choice (default 0)")
    p.add_argument("--bias", action="store_true", help="time with an lm_head bias (the check always uses one)")
    p.add_argument("--rep-ms", type=float, help="timing window per provider and shape in ms (default 300; quick 20)")
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
        providers = [p for p in PROVIDERS if p in asked]  # canonical order: CE-only baselines last
    if any(c < 0 for c in args.chunk_rows):
        raise SystemExit("--chunk-rows takes positive row counts, or 0 for the automatic choice")
    cfg = Config(
        device=device,
        # bf16 is what training feeds the lm_head on a GPU; CPUs lack fast bf16, and fp32 keeps the check tight.
        dtype=DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32),
        rows=args.rows or (64 if args.quick else 8192),
        hidden=args.hidden or (32 if args.quick else 4096),
        vocabs=tuple(args.vocab or ((1000, 70000) if args.quick else (32000, 128256))),
        candidates=tuple(args.candidates or ((2, 4) if args.quick else (2, 3, 4))),
        top_k=10,
        chunk_rows=tuple(args.chunk_rows),
        bias=args.bias,
        warmup_ms=5.0 if args.quick else 25.0,
        rep_ms=args.rep_ms or (20.0 if args.quick else 300.0),
        min_reps=3 if args.quick else 5,
        matmul_rep_ms=50.0 if args.quick else 200.0,
    )
    env = environment(device)
    out_file = (args.out or results_dir(env.card)) / f"{OP}.jsonl"
    records, failures = run(cfg, providers, out_file, env)
    print(f"\n{OP} on {env.card} (torch {env.torch}, triton {env.triton}, commit {env.commit}) -> {out_file}")
    print(format_table(records))
    if failures:
        print(f"{failures} provider run(s) failed or gave wrong results", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
