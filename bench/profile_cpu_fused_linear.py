"""Where the fused lm_head's time goes on a CPU, next to torch's linear_cross_entropy.

    python -m bench.profile_cpu_fused_linear                    # N 2048, H 512, V 32 000, fp32, min of 5
    python -m bench.profile_cpu_fused_linear --rows 512 --reps 3

Times, each the minimum over --reps runs: the whole forward + backward of
`fused_linear_fusion_loss` (CE only, λ = 1, and with S teachers, λ = 0.9), of
`torch.nn.functional.linear_cross_entropy` (torch ≥ 2.13) and of eager linear +
cross_entropy; then the fused op's parts replayed alone over the same chunks: the three
matrix products (logits, hidden gradient, weight-gradient accumulation), the loss and its
gradient written over one chunk of logits (`fusion_loss_chunk_`, including a copy that
restores the chunk) and that copy alone; and cross_entropy's forward + backward on the whole
[N, V] logits (what the native op adds to the same products). bench/README.md ("CPU
baseline") holds the measured breakdown.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from fusellm_kernels import fused_linear_fusion_loss
from fusellm_kernels.fused_linear import default_chunk_rows
from fusellm_kernels.torch_ops.fusion_loss import fusion_loss_chunk_


def best(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def profile(n: int, h: int, v: int, s: int, k: int, reps: int) -> dict[str, float]:
    """Seconds per part (see the module docstring), keyed by a readable label."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g) * 0.5
    weight = torch.randn(v, h, generator=g) * 0.05
    labels = torch.randint(0, v, (n,), generator=g)
    teacher_ids = torch.randint(0, v, (s, n, k), generator=g, dtype=torch.int32)
    teacher_logits = torch.randn(s, n, k, generator=g).sort(-1, descending=True).values
    teacher_ce = torch.rand(s, n, generator=g) * 3

    def leaves() -> tuple[torch.Tensor, torch.Tensor]:
        return hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def ours(lam: float) -> Callable[[], None]:
        def run() -> None:
            hh, ww = leaves()
            fused_linear_fusion_loss(hh, ww, labels, teacher_ids, teacher_logits, teacher_ce=teacher_ce, lam=lam).backward()
        return run

    def eager() -> None:
        hh, ww = leaves()
        F.cross_entropy(hh @ ww.T, labels).backward()

    chunk = default_chunk_rows(n, v, torch.float32, torch.device("cpu"))
    starts = range(0, n, chunk)
    z = torch.empty(chunk, v)
    z_saved = torch.randn(chunk, v, generator=g)
    grad_weight = torch.empty(v, h)
    grad_hidden = torch.empty(n, h)
    weights = torch.zeros(s, chunk)
    weights[0] = 1.0

    def logits() -> None:
        for r0 in starts:
            c = min(chunk, n - r0)
            torch.mm(hidden[r0:r0 + c], weight.T, out=z[:c])

    def hidden_grad() -> None:
        for r0 in starts:
            c = min(chunk, n - r0)
            torch.mm(z[:c], weight, out=grad_hidden[r0:r0 + c])

    def weight_grad() -> None:
        for r0 in starts:
            c = min(chunk, n - r0)
            torch.addmm(grad_weight, z[:c].T, hidden[r0:r0 + c], beta=0.0 if r0 == 0 else 1.0, out=grad_weight)

    def restore() -> None:
        for _ in starts:
            z.copy_(z_saved)

    ce_coef, f_coef = torch.tensor(0.9 / n), torch.tensor(0.1 / n)

    def loss_grad() -> None:
        for _ in starts:
            z.copy_(z_saved)
            fusion_loss_chunk_(z, labels[:chunk], teacher_ids[:, :chunk], teacher_logits[:, :chunk], weights,
                               torch.ones(chunk, dtype=torch.bool), ce_coef, f_coef, temperature=1.0, kl=False,
                               ignore_index=-100, grad=True)

    def dense_ce() -> float:
        z_all = torch.randn(n, v, generator=g).requires_grad_()
        t0 = time.perf_counter()
        F.cross_entropy(z_all, labels).backward()
        return time.perf_counter() - t0

    out: dict[str, float] = {}
    native = getattr(F, "linear_cross_entropy", None)
    if native is not None:
        def run_native() -> None:
            hh, ww = leaves()
            native(hh, ww, labels).backward()
        out["torch linear_cross_entropy (CE only)"] = best(run_native, reps)
    out["eager linear + cross_entropy (CE only)"] = best(eager, reps)
    out["ours, CE only (lam = 1)"] = best(ours(1.0), reps)
    out[f"ours, {s} teachers (lam = 0.9)"] = best(ours(0.9), reps)
    n_chunks = len(starts)
    out[f"  logits z = h W^T ({n_chunks} chunks of {chunk} rows)"] = best(logits, reps)
    out["  hidden gradient g W"] = best(hidden_grad, reps)
    out["  weight gradient += g^T h"] = best(weight_grad, reps)
    out["  loss + gradient over the chunk (with the copy below)"] = best(loss_grad, reps)
    out["  chunk copy alone"] = best(restore, reps)
    out["  cross_entropy fwd + bwd on [N, V] (native's extra)"] = min(dense_ce() for _ in range(reps))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_cpu_fused_linear", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2048, help="N (default 2048)")
    p.add_argument("--hidden", type=int, default=512, help="H (default 512)")
    p.add_argument("--vocab", type=int, default=32000, help="V (default 32000)")
    p.add_argument("--candidates", type=int, default=2, help="teachers S (default 2)")
    p.add_argument("--reps", type=int, default=5, help="runs per part; the minimum is reported (default 5)")
    a = p.parse_args(argv)
    for flag, value in (("--rows", a.rows), ("--hidden", a.hidden), ("--vocab", a.vocab), ("--candidates", a.candidates), ("--reps", a.reps)):
        if value < 1:
            p.error(f"{flag} {value}: must be at least 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={a.rows} H={a.hidden} V={a.vocab} "
          f"S={a.candidates} K=10 float32, min of {a.reps}", flush=True)
    for label, seconds in profile(a.rows, a.hidden, a.vocab, a.candidates, 10, a.reps).items():
        print(f"{label:58s} {seconds * 1000:9.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
