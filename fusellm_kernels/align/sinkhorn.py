"""Batched log-domain Sinkhorn: entropic optimal transport for many small problems at once.

Problem b of a batch (n_b × m_b, padded to N × M): marginals a (rows) and b (columns), both
summing to 1, a cost C, and the inverse regularisation λ. Its entropic transport plan

    P = argmin { <P, C> − H(P) / λ  :  P ≥ 0,  P 1 = a,  Pᵀ 1 = b },   H(P) = −Σ P log P,

is P = diag(u) K diag(v) with the kernel K = exp(−λ C) and the scalings the Sinkhorn
iteration finds, rows first (the order of the PTA authors' code):

    u ← a / (K v),   v ← b / (Kᵀ u),   starting from v = 1.

Here in log space, f = log u and g = log v, so nothing underflows (λ = 30 puts exp(−λ C)
below float32's range from a cost of 3 on):

    f ← log a − LSE_q(−λ C + g),   g ← log b − LSE_p(−λ C + f),   log P = −λ C + f ⊕ g.

After a column update the column marginals are exact, so the error of an iterate is its row
marginal error e = max_p |Σ_q P_pq − a_p|, which the next row update computes for free. A
problem stops at the first iterate with e ≤ tol: its plan, error and iteration count (column
updates done) are recorded then and never touched again, so a problem's result does not
depend on the batch it ran in. A problem still above tol after `max_iter` iterations keeps
its last iterate, `converged` False.

`rule="authors"` reproduces the PTA authors' loop instead: the plan starts as K / ΣK; before
dividing, row and column sums below 1e-10 count as 1e-10 (f ← f + log a − max(f + LSE, log
1e-10), likewise g), and a problem stops when its row sums moved by at most tol since the
previous iterate, whatever its marginal error (still at most max_iter iterations here; the
authors have no cap).

Padding: log a = −inf on absent rows and log b = −inf on absent columns (their potentials
stay −inf and their plan entries are 0); every problem needs at least one row and one
column. The solved problems leave the working set as they converge, so the long tail of slow
problems runs on a small batch. fp32 throughout; the log-sum-exp clamps exponents at −87
(float32's smallest normal): an entry that small is below 1e-37 of its row's largest and
cannot move a sum, while denormal arithmetic would slow the CPU tenfold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

_EXP_FLOOR = -87.0


@dataclass(frozen=True)
class SinkhornResult:
    """log_plan float32 [B, N, M] (−inf on padding); marginal_error float32 [B] (row marginal
    error of the returned plan, columns exact); iterations int32 [B]; converged bool [B]."""

    log_plan: Tensor
    marginal_error: Tensor
    iterations: Tensor
    converged: Tensor


def _lse(x: Tensor, dim: int) -> Tensor:
    """log Σ exp along `dim` for rows with at least one finite entry."""
    top = x.amax(dim, keepdim=True)
    return (x - top).clamp_min_(_EXP_FLOOR).exp_().sum(dim).log_() + top.squeeze(dim)


_LOG_SUM_FLOOR = math.log(1e-10)  # the authors' clamp of row and column sums


def sinkhorn_log(
    cost: Tensor, log_a: Tensor, log_b: Tensor, *, lam: float = 30.0, tol: float = 1e-5, max_iter: int = 1000,
    rule: Literal["marginal", "authors"] = "marginal",
) -> SinkhornResult:
    """Entropic OT plans of B problems: cost [B, N, M], log_a [B, N], log_b [B, M] (−inf =
    padding; the marginals of a problem sum to 1). Peak extra memory: about 4 × B·N·M floats.
    Runs on the tensors' device."""
    if cost.dim() != 3 or log_a.shape != cost.shape[:2] or log_b.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(f"sinkhorn_log: cost {tuple(cost.shape)}, log_a {tuple(log_a.shape)} and log_b "
                         f"{tuple(log_b.shape)} do not describe [B, N, M], [B, N], [B, M]")
    if rule not in ("marginal", "authors"):
        raise ValueError(f"sinkhorn_log: rule must be 'marginal' or 'authors', got {rule!r}")
    if not lam > 0 or not tol > 0 or max_iter < 1:
        raise ValueError(f"sinkhorn_log: need lam > 0, tol > 0 and max_iter >= 1 (got {lam}, {tol}, {max_iter})")
    batch = cost.shape[0]
    log_k = (-lam * cost.float()).contiguous()
    log_a, log_b = log_a.float(), log_b.float()
    if batch and not (torch.isfinite(log_a).any(1).all() and torch.isfinite(log_b).any(1).all()):
        raise ValueError("sinkhorn_log: every problem needs at least one row and one column with mass")
    a = log_a.exp()
    f_out = torch.full_like(log_a, float("-inf"))
    g_out = torch.full_like(log_b, float("-inf"))
    error_out = torch.full((batch,), float("inf"), device=cost.device)
    iters_out = torch.full((batch,), max_iter, dtype=torch.int32, device=cost.device)
    done_out = torch.zeros(batch, dtype=torch.bool, device=cost.device)

    # the working set: problems not yet converged
    idx = torch.arange(batch, device=cost.device)
    wk, wa, wla, wlb = log_k, a, log_a, log_b
    authors = rule == "authors"
    g = torch.where(torch.isfinite(log_b), 0.0, float("-inf"))  # v = 1 on the columns that exist
    f = torch.zeros_like(log_a)
    if authors:  # P = K / ΣK over the entries that exist
        f = torch.where(torch.isfinite(log_a), -_lse(_lse(log_k + g[:, None, :], 2), 1)[:, None], float("-inf"))
    previous = torch.zeros_like(log_a)
    for it in range(max_iter + 1):
        row_lse = _lse(wk + g[:, None, :], 2)
        if it > 0 or authors:
            row_sums = torch.where(torch.isfinite(wla), (f + row_lse).exp(), 0.0)
            error = (row_sums - wa).abs().amax(1)
            newly = ((row_sums - previous).abs().amax(1) <= tol) if authors else error <= tol
            if it == 0:
                newly = torch.zeros_like(newly)
            previous = row_sums
            last = it == max_iter
            if last:
                newly = torch.ones_like(newly)
            if bool(newly.any()):
                ids = idx[newly]
                f_out[ids], g_out[ids], error_out[ids] = f[newly], g[newly], error[newly]
                iters_out[ids] = it
                done_out[ids] = error[newly] <= tol
                keep = ~newly
                if last or not bool(keep.any()):
                    break
                idx, wk, wa, wla, wlb = idx[keep], wk[keep], wa[keep], wla[keep], wlb[keep]
                row_lse, f, g, previous = row_lse[keep], f[keep], g[keep], previous[keep]
        if authors:
            f = f + wla - torch.clamp_min(f + row_lse, _LOG_SUM_FLOOR)
            g = g + wlb - torch.clamp_min(g + _lse(wk + f[:, :, None], 1), _LOG_SUM_FLOOR)
        else:
            f = wla - row_lse
            g = wlb - _lse(wk + f[:, :, None], 1)
    log_plan = log_k + f_out[:, :, None] + g_out[:, None, :]
    return SinkhornResult(log_plan, error_out, iters_out, done_out)
