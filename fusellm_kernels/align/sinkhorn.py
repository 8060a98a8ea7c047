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

Newton finish. With λ = 30 and integer costs the problem is nearly unregularised, and on
near-degenerate problems (ties in the cost, two equally good matchings) Sinkhorn converges
sublinearly: on bigram-model top-k of real text a quarter of the rows are still above 1e-5
after 1000 iterations, and a few need 40 000. So a problem not converged after
`newton_after` iterations (20) continues with Newton's method on the same dual, in float64:
with x = (f, g) and P(x) = exp(−λC + f ⊕ g), the concave dual D(x) = <f, a> + <g, b> − Σ P
has gradient (a − P1, b − Pᵀ1) and Hessian −[[diag P1, P], [Pᵀ, diag Pᵀ1]] (singular along
f + t, g − t only; a 1e-12 ridge fixes that gauge); each step solves the n + m linear system
and halves its length until D rises (Armijo), so it converges to the same plan, quadratically
near it. Newton steps count as iterations; the error is then the larger of the row and
column errors (Newton does not make the columns exact).

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
    rule: Literal["marginal", "authors"] = "marginal", newton_after: int | None = 20,
) -> SinkhornResult:
    """Entropic OT plans of B problems: cost [B, N, M], log_a [B, N], log_b [B, M] (−inf =
    padding; the marginals of a problem sum to 1). Peak extra memory: about 4 × B·N·M floats
    (plus, for the problems handed to Newton, float64 [N + M, N + M] systems). Runs on the
    tensors' device. newton_after=None: Sinkhorn only (the `authors` rule never uses Newton)."""
    if cost.dim() != 3 or log_a.shape != cost.shape[:2] or log_b.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(f"sinkhorn_log: cost {tuple(cost.shape)}, log_a {tuple(log_a.shape)} and log_b "
                         f"{tuple(log_b.shape)} do not describe [B, N, M], [B, N], [B, M]")
    if rule not in ("marginal", "authors"):
        raise ValueError(f"sinkhorn_log: rule must be 'marginal' or 'authors', got {rule!r}")
    if not lam > 0 or not tol > 0 or max_iter < 1:
        raise ValueError(f"sinkhorn_log: need lam > 0, tol > 0 and max_iter >= 1 (got {lam}, {tol}, {max_iter})")
    batch = cost.shape[0]
    log_a, log_b = log_a.float(), log_b.float()
    if batch and not (torch.isfinite(log_a).any(1).all() and torch.isfinite(log_b).any(1).all()):
        raise ValueError("sinkhorn_log: every problem needs at least one row and one column with mass")
    # the authors' early-stopped iterates depend on the cost as given (their start K / ΣK and
    # clamp see it), the converged plan does not
    cost = cost.float() if rule == "authors" else _reduced(cost.float(), torch.isfinite(log_a), torch.isfinite(log_b))
    log_k = -lam * cost
    a = log_a.exp()
    # potentials kept in float64: Newton's are, and the plan is formed from them in float64 and
    # rounded once (summing float32 potentials of magnitude ~100 would cost ~1e-5 relative)
    f_out = torch.full_like(log_a, float("-inf"), dtype=torch.float64)
    g_out = torch.full_like(log_b, float("-inf"), dtype=torch.float64)
    error_out = torch.full((batch,), float("inf"), device=cost.device)
    iters_out = torch.full((batch,), max_iter, dtype=torch.int32, device=cost.device)

    # the working set: problems not yet converged
    idx = torch.arange(batch, device=cost.device)
    wk, wa, wla, wlb = log_k, a, log_a, log_b
    authors = rule == "authors"
    g = torch.where(torch.isfinite(log_b), 0.0, float("-inf"))  # v = 1 on the columns that exist
    f = torch.zeros_like(log_a)
    if authors:  # P = K / ΣK over the entries that exist
        f = torch.where(torch.isfinite(log_a), -_lse(_lse(log_k + g[:, None, :], 2), 1)[:, None], float("-inf"))
    previous = torch.zeros_like(log_a)
    switch = max_iter if authors or newton_after is None else min(max_iter, newton_after)
    for it in range(switch + 1):
        row_lse = _lse(wk + g[:, None, :], 2)
        if it > 0 or authors:
            row_sums = torch.where(torch.isfinite(wla), (f + row_lse).exp(), 0.0)
            error = (row_sums - wa).abs().amax(1)
            newly = ((row_sums - previous).abs().amax(1) <= tol) if authors else error <= tol
            if it == 0:
                newly = torch.zeros_like(newly)
            previous = row_sums
            last = it == switch
            if last and switch == max_iter:
                newly = torch.ones_like(newly)
            if bool(newly.any()):
                ids = idx[newly]
                f_out[ids], g_out[ids], error_out[ids] = f[newly].double(), g[newly].double(), error[newly]
                iters_out[ids] = it
                keep = ~newly
                if not bool(keep.any()):
                    break
                idx, wk, wa, wla, wlb = idx[keep], wk[keep], wa[keep], wla[keep], wlb[keep]
                row_lse, f, g, previous = row_lse[keep], f[keep], g[keep], previous[keep]
            if last:
                if switch < max_iter:
                    nf, ng, error, steps = _newton(wk, wla, wlb, f, g, tol=tol, max_steps=max_iter - switch)
                    f_out[idx], g_out[idx], error_out[idx] = nf, ng, error
                    iters_out[idx] = switch + steps
                break
        if authors:
            f = f + wla - torch.clamp_min(f + row_lse, _LOG_SUM_FLOOR)
            g = g + wlb - torch.clamp_min(g + _lse(wk + f[:, :, None], 1), _LOG_SUM_FLOOR)
        else:
            f = wla - row_lse
            g = wlb - _lse(wk + f[:, :, None], 1)
    log_plan = (log_k.double() + f_out[:, :, None] + g_out[:, None, :]).float()
    # the error of the plan returned, measured in float64
    plan = log_plan.double().exp()
    a64, b64 = log_a.double().exp(), log_b.double().exp()
    error_out = torch.maximum((plan.sum(2) - a64).abs().amax(1), (plan.sum(1) - b64).abs().amax(1)).float()
    if batch == 0:
        error_out = torch.zeros(0, device=cost.device)
    # converged: the returned plan is within tol, allowing as much again for its float32 rounding
    return SinkhornResult(log_plan, error_out, iters_out, error_out <= 2 * tol)


def _reduced(cost: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The cost less its row minima, then its column minima (over the entries that exist).
    The plan does not change (<P, α ⊕ β> is fixed by the marginals), but the potentials stay
    near 0, where float32 resolves them finely: they absorb λ·cost, and λ = 30 makes that
    hundreds."""
    inf = torch.tensor(float("inf"), device=cost.device)
    live = rows[:, :, None] & cols[:, None, :]
    cost = cost - torch.where(live, cost, inf).amin(2, keepdim=True).masked_fill(~rows[:, :, None], 0.0)
    cost = cost - torch.where(live, cost, inf).amin(1, keepdim=True).masked_fill(~cols[:, None, :], 0.0)
    return torch.where(live, cost, 0.0).contiguous()


def _newton(log_k: Tensor, log_a: Tensor, log_b: Tensor, f: Tensor, g: Tensor, *, tol: float,
            max_steps: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Damped Newton on the dual from (f, g), float64; returns float64 f, g, the error (max of
    row and column errors) and the steps each problem took. Problems leave the working set
    as they converge; the line search halves only the steps not yet accepted."""
    lk, la, lb = log_k.double(), log_a.double(), log_b.double()
    f, g = f.double().clone(), g.double().clone()
    rows, cols = torch.isfinite(la), torch.isfinite(lb)
    a, b = la.exp(), lb.exp()
    n, m = la.shape[1], lb.shape[1]
    dev = lk.device
    ridge = 1e-12 * torch.eye(n + m, dtype=torch.float64, device=dev)
    pad = torch.diag_embed(torch.cat([~rows, ~cols], 1).double())  # padding keeps its −inf potentials

    def state(i: Tensor, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        plan = (lk[i] + f[:, :, None] + g[:, None, :]).exp()
        dual = (torch.where(rows[i], f * a[i], 0.0).sum(1) + torch.where(cols[i], g * b[i], 0.0).sum(1)
                - plan.sum((1, 2)))
        return plan, plan.sum(2), plan.sum(1), dual

    def error_of(i: Tensor, r: Tensor, c: Tensor) -> Tensor:
        return torch.maximum((r - a[i]).abs().amax(1), (c - b[i]).abs().amax(1))

    steps = torch.zeros(la.shape[0], dtype=torch.int32, device=dev)
    idx = torch.arange(la.shape[0], device=dev)
    plan, r, c, dual = state(idx, f, g)
    for _ in range(max_steps):
        active = error_of(idx, r, c) > tol
        idx, plan, r, c, dual = idx[active], plan[active], r[active], c[active], dual[active]
        if idx.numel() == 0:
            break
        hess = torch.diag_embed(torch.cat([r, c], 1)) + pad[idx] + ridge
        hess[:, :n, n:] = plan
        hess[:, n:, :n] = plan.transpose(1, 2)
        grad = torch.cat([torch.where(rows[idx], a[idx] - r, 0.0), torch.where(cols[idx], b[idx] - c, 0.0)], 1)
        step = torch.linalg.solve(hess, grad)
        slope = (grad * step).sum(1)
        steps[idx] += 1
        # Armijo: halve each step until the dual rises enough
        todo = torch.arange(idx.numel(), device=dev)
        t = torch.ones(idx.numel(), dtype=torch.float64, device=dev)
        moved = torch.zeros(idx.numel(), dtype=torch.bool, device=dev)
        for _ in range(40):  # a problem no step down to 2^-39 improves has stalled
            j = idx[todo]
            tf = torch.where(rows[j], f[j] + t[todo, None] * step[todo, :n], f[j])
            tg = torch.where(cols[j], g[j] + t[todo, None] * step[todo, n:], g[j])
            new = state(j, tf, tg)
            ok = new[3] >= dual[todo] + 1e-4 * t[todo] * slope[todo]
            k = todo[ok]
            f[j[ok]], g[j[ok]] = tf[ok], tg[ok]
            plan[k], r[k], c[k], dual[k] = new[0][ok], new[1][ok], new[2][ok], new[3][ok]
            moved[k] = True
            todo = todo[~ok]
            if todo.numel() == 0:
                break
            t[todo] /= 2
        # a problem no step improves is as close as float64 gets
        idx, plan, r, c, dual = idx[moved], plan[moved], r[moved], c[moved], dual[moved]
    i_all = torch.arange(la.shape[0], device=dev)
    _, r, c, _ = state(i_all, f, g)
    return f, g, error_of(i_all, r, c).float(), steps
