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

Finish by ε-scaling and Newton. With λ = 30 and integer costs the problem is nearly
unregularised, and on near-degenerate problems (ties in the cost, two equally good
matchings) Sinkhorn converges sublinearly: on bigram-model top-k of real text a quarter of
the rows are still above 1e-5 after 1000 iterations, and a few need 40 000. So a problem not
converged after `newton_after` iterations (5) is solved again along a ladder of regularisers
(ε-scaling, `_continuation`): λ/27, λ/9 (5 Sinkhorn iterations each), λ/3 (Newton to
100·tol), λ (Newton to tol), each stage starting from the previous stage's potentials times
3 and one Sinkhorn iteration. Newton's method runs on the same dual (in float64 at λ, float32
at λ/3): with
x = (f, g) and P(x) = exp(−λC + f ⊕ g), the concave dual D(x) = <f, a> + <g, b> − Σ P has
gradient (a − P1, b − Pᵀ1) and Hessian −[[diag P1, P], [Pᵀ, diag Pᵀ1]] (singular along
f + t, g − t only; a 1e-12 ridge fixes that gauge); each step solves the system through its
n × n Schur complement and shortens the step until D rises enough (Armijo), so it converges
to the same plan, quadratically near it. Started at λ from Sinkhorn's iterate, Newton's first
steps point along near-flat directions (mass that must cross plan entries of 1e-40) and
need 10-30 halvings each; from the λ/3 solution most take the full step (on bigram top-k of
2048-token documents the finish took 2.6× less time than Newton at λ after 20 Sinkhorn
iterations). Every Sinkhorn iteration and Newton step counts as an iteration; the error is
then the larger of the row and column errors (Newton does not make the columns exact).

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
_PAD_POTENTIAL = -1e30  # Newton's finite stand-in for the −inf potentials of padding
# Newton's line search: the halvings e (step length 2^-e) tried together in each round
_SEARCH_ROUNDS = ((0,), (1, 2, 3), tuple(range(4, 12)), tuple(range(12, 39)))


@dataclass(frozen=True)
class SinkhornResult:
    """log_plan float32 [B, N, M] (−inf on padding); marginal_error float32 [B] (the larger of
    the row and column marginal errors of the returned plan); iterations int32 [B]; converged
    bool [B]."""

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
    rule: Literal["marginal", "authors"] = "marginal", newton_after: int | None = 5,
) -> SinkhornResult:
    """Entropic OT plans of B problems: cost [B, N, M], log_a [B, N], log_b [B, M] (−inf =
    padding; the marginals of a problem sum to 1). Peak extra memory: about 4 × B·N·M floats
    (plus, for the problems handed to Newton, float64 [N, N] systems and
    [R, 27, N, M] line-search trials for the R problems whose step needs more than 12 halvings). Runs on the
    tensors' device. newton_after=None: Sinkhorn only (the `authors` rule never uses Newton);
    otherwise the problems above tol after that many iterations are finished by ε-scaling and
    Newton (module docstring)."""
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
                f_out[ids], g_out[ids] = f[newly].double(), g[newly].double()
                iters_out[ids] = it
                keep = ~newly
                if not bool(keep.any()):
                    break
                idx, wk, wa, wla, wlb = idx[keep], wk[keep], wa[keep], wla[keep], wlb[keep]
                row_lse, f, g, previous = row_lse[keep], f[keep], g[keep], previous[keep]
            if last:
                if switch < max_iter and idx.numel():
                    nf, ng, steps = _continuation(wk, wla, wlb, f, g, lam=lam, tol=tol, budget=max_iter - switch)
                    f_out[idx], g_out[idx] = nf, ng
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


_STAGE_RATIO = 3.0  # λ grows threefold from stage to stage
# Newton at λ / 3 only has to come within 100·tol: float32 does that (its ridge larger, as
# 1e-12 is below float32's resolution) in ~20 % less time than float64
_COARSE_DTYPE = torch.float32
_RIDGE32 = 1e-6
_COARSE_SWEEPS = 5  # Sinkhorn iterations at the stages below λ / 3


def _continuation(log_k: Tensor, log_a: Tensor, log_b: Tensor, f: Tensor, g: Tensor, *, lam: float, tol: float,
                  budget: int) -> tuple[Tensor, Tensor, Tensor]:
    """The problems Sinkhorn did not finish, solved again by ε-scaling (module docstring):
    λ_s = λ / 3^s for the s ≥ 1 with λ_s ≥ 1, smallest first, then λ. The one Sinkhorn
    iteration after scaling puts the mass back where the scaled potentials moved it (without
    it Newton at λ needed about twice the steps). log_k = −λ·cost of the working set; returns
    float64 f, g at λ and the iterations plus steps each problem took (at most `budget`). A
    budget too small for the ladder's Sinkhorn iterations goes to Newton at λ from Sinkhorn's
    iterate (f, g) instead."""
    stages = [lam / _STAGE_RATIO ** s for s in range(1, 64) if lam / _STAGE_RATIO ** s >= 1.0][::-1] + [lam]
    if budget <= _COARSE_SWEEPS * max(len(stages) - 2, 0) + 2:
        return _newton(log_k, log_a, log_b, f, g, tol=tol, max_steps=budget)
    f = torch.where(torch.isfinite(log_a), 0.0, float("-inf"))
    g = torch.where(torch.isfinite(log_b), 0.0, float("-inf"))
    used = torch.zeros(log_a.shape[0], dtype=torch.int32, device=log_k.device)
    for k, lam_s in enumerate(stages):
        if k:
            f, g = f * (lam_s / stages[k - 1]), g * (lam_s / stages[k - 1])  # −inf stays −inf
        lk = log_k * (lam_s / lam)
        fine = lam_s * _STAGE_RATIO >= lam * (1 - 1e-9)  # λ / 3 and λ: Newton
        sweeps = 1 if fine else _COARSE_SWEEPS
        for _ in range(sweeps):
            f = log_a - _lse(lk + g[:, None, :], 2)
            g = log_b - _lse(lk + f[:, :, None], 1)
        used += sweeps
        if fine:
            last = k == len(stages) - 1
            left = budget - int(used.max()) - (0 if last else 1)  # keep λ's own Sinkhorn iteration
            f, g, steps = _newton(lk, log_a, log_b, f, g, tol=tol if last else 100 * tol, max_steps=max(left, 0),
                                  dtype=torch.float64 if last else _COARSE_DTYPE)
            used += steps
            if not last:
                f, g = f.float(), g.float()
    return f, g, used


def _newton(log_k: Tensor, log_a: Tensor, log_b: Tensor, f: Tensor, g: Tensor, *, tol: float,
            max_steps: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Damped Newton on the dual from (f, g) in `dtype`; returns f, g in it and the steps each
    problem took. With x = (f, g) and the plan P(x) = exp(log_k + f ⊕ g), the dual
    D = <f, a> + <g, b> − Σ P has gradient (a − P1, b − Pᵀ1) and Hessian −[[Dr, P], [Pᵀ, Dc]]
    (Dr = diag P1, Dc = diag Pᵀ1). The system is solved through its Schur complement on the
    rows, (Dr − P Dc⁻¹ Pᵀ) x_f = u − P Dc⁻¹ v, x_g = Dc⁻¹ (v − Pᵀ x_f): batched n × n
    solves cost ~8× less than (n + m) × (n + m) ones. A ridge (1e-12 in float64) fixes the
    gauge f + t, g − t (the only exact null direction). Armijo line search on D: the full step for every
    problem, then, for those it fails, several halvings in one batched evaluation per round
    (rounds of 3, 8 and 27 lengths down to 2⁻³⁹): near-flat directions can need 10-30
    halvings, and one Python pass per halving made the search most of the time. D(t) needs
    only Σ P(t), since the linear part is known. Problems leave the working set once both
    marginal errors are ≤ tol, or when no step improves D (as close as `dtype` gets)."""
    rows, cols = torch.isfinite(log_a), torch.isfinite(log_b)
    a, b = log_a.to(dtype).exp(), log_b.to(dtype).exp()  # 0 on padding
    # a finite stand-in for the −inf potentials of padding keeps f·a = 0 and exp(...) = 0
    # without masks; their gradient and step are 0, so they never move
    f_all = torch.where(rows, f.to(dtype), _PAD_POTENTIAL)
    g_all = torch.where(cols, g.to(dtype), _PAD_POTENTIAL)
    n = log_a.shape[1]
    dev = log_k.device
    ridge = 1e-12 if dtype == torch.float64 else _RIDGE32
    fix = torch.cat([(~rows).to(dtype), (~cols).to(dtype)], 1) + ridge  # padding's unit diagonal, the ridge
    steps = torch.zeros(log_a.shape[0], dtype=torch.int32, device=dev)
    # the working set, compacted as problems leave
    idx = torch.arange(log_a.shape[0], device=dev)
    f, g, wa, wb, wfix = f_all.clone(), g_all.clone(), a, b, fix
    log_plan = log_k.to(dtype) + f[:, :, None] + g[:, None, :]
    plan = log_plan.exp()
    for _ in range(max_steps):
        r, c = plan.sum(2), plan.sum(1)
        active = torch.maximum((r - wa).abs().amax(1), (c - wb).abs().amax(1)) > tol
        if not bool(active.all()):
            done = ~active
            f_all[idx[done]], g_all[idx[done]] = f[done], g[done]
            idx, f, g, wa, wb, wfix = idx[active], f[active], g[active], wa[active], wb[active], wfix[active]
            log_plan, plan, r, c = log_plan[active], plan[active], r[active], c[active]
            if idx.numel() == 0:
                break
        u, v = wa - r, wb - c  # the gradient; 0 on padding
        inv_dc = 1.0 / (c + wfix[:, n:])
        pc = plan * inv_dc[:, None, :]
        schur = torch.diag_embed(r + wfix[:, :n]) - pc @ plan.transpose(1, 2)
        sf, info = torch.linalg.solve_ex(schur, u - (pc * v[:, None, :]).sum(2))
        sg = inv_dc * (v - (plan * sf[:, :, None]).sum(1))
        # a system the ridge could not keep regular gives no step (the problem then leaves)
        bad = (info != 0) | ~(torch.isfinite(sf).all(1) & torch.isfinite(sg).all(1))
        sf, sg = sf.masked_fill(bad[:, None], 0.0), sg.masked_fill(bad[:, None], 0.0)
        lin = (sf * wa).sum(1) + (sg * wb).sum(1)  # D(t) − D(0) = t·lin − (Σ P(t) − Σ P(0))
        slope = (sf * u).sum(1) + (sg * v).sum(1)
        mass = plan.sum((1, 2))
        move = sf[:, :, None] + sg[:, None, :]
        steps[idx] += 1
        length = torch.zeros_like(lin)  # the accepted step length, 0: none
        todo: Tensor | None = None  # None: every problem
        for halvings in _SEARCH_ROUNDS:
            t = torch.tensor([0.5 ** e for e in halvings], dtype=dtype, device=dev)
            sel = (lambda x: x) if todo is None else (lambda x, todo=todo: x[todo])
            trial = sel(log_plan)[:, None] + t[None, :, None, None] * sel(move)[:, None]  # [R, L, n, m]
            trial_plan = trial.exp()
            gain = t[None, :] * sel(lin)[:, None] - (trial_plan.sum((2, 3)) - sel(mass)[:, None])
            ok = gain >= 1e-4 * t[None, :] * sel(slope)[:, None]
            found = ok.any(1)
            first = ok.int().argmax(1)  # the longest acceptable step
            if bool(found.any()):
                at = found.nonzero()[:, 0]
                k = at if todo is None else todo[at]
                length[k] = t[first[at]]
                log_plan[k], plan[k] = trial[at, first[at]], trial_plan[at, first[at]]
            rest = (~found).nonzero()[:, 0]
            todo = rest if todo is None else todo[rest]
            if todo.numel() == 0:
                break
        f = f + length[:, None] * sf
        g = g + length[:, None] * sg
        moved = length > 0
        if not bool(moved.all()):  # no step improves D: as close as `dtype` gets
            stuck = ~moved
            f_all[idx[stuck]], g_all[idx[stuck]] = f[stuck], g[stuck]
            idx, f, g, wa, wb, wfix = idx[moved], f[moved], g[moved], wa[moved], wb[moved], wfix[moved]
            log_plan, plan = log_plan[moved], plan[moved]
    f_all[idx], g_all[idx] = f, g
    return torch.where(rows, f_all, float("-inf")), torch.where(cols, g_all, float("-inf")), steps
