"""Readable references of the fusion loss: the definition the kernels are tested against.

Two forms of the same function:
- `fusion_loss_reference` builds the dense fused teacher P [N, V] (as the original trainer
  does, by scatter) and differentiates through `log_softmax` with autograd. In float64 it is
  the ground truth of the test suite; in float32 it is the "reference-style" benchmark row.
- `fusion_loss_gather` never builds P: it gathers log q at the teacher ids. It is the
  "log_softmax + gather" benchmark row (eager and `torch.compile`).

Semantics (see the README): candidate s's distribution at row n is softmax(logits / T) over
its valid slots (id in [0, V), first occurrence of each id); the fused teacher is
P = Σ_{s∈A} w_s p_s / Σ_{s∈A} w_s over the candidates A that have a distribution;
CE_n = −log q[label_n]; D_n = −Σ_v P_v log q_v (soft_ce) or Σ_v P_v (log P_v − log q_v) (kl);
ℓ_n = λ·CE_n·[label_n ≠ ignore] + (1 − λ)·D_n·[fusion_mask_n and the row has a teacher].

With `teacher_tail="bucket"` each candidate keeps the mass outside its entries (the README's
"The top-k tail"): p_s(u) = Σ_{j: id_sj = u} exp(x_sj − lse_s) over its valid slots (duplicates
summed), tail t_s = max(0, 1 − Σ_u p_s(u)), student mass outside its ids Q_s = Σ_{v∉I_s} q_v,
and D_n = Σ_s w̄_s [Σ_u p_s(u)(log p_s(u) − log q_u) + t_s(log t_s − log Q_s)] (soft_ce drops
the p log p and t log t terms); a NaN lse_s renormalises that candidate's row with no tail.
These functions are for clarity and testing; they materialise [N, V] tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fusellm_kernels.types import FusionLossParts


def candidate_distributions(
    teacher_ids: Tensor, teacher_logits: Tensor, vocab_size: int, temperature: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Per-candidate sparse distributions.

    Returns p [S, N, K] (`dtype`, 0 at removed slots) and keep [S, N, K] bool: the slots that
    hold a valid id for the first time within their candidate's row.
    """
    k = teacher_ids.shape[-1]
    valid = (teacher_ids >= 0) & (teacher_ids < vocab_size)
    same = teacher_ids[..., :, None] == teacher_ids[..., None, :]  # [.., slot j, slot i]
    earlier = torch.ones(k, k, dtype=torch.bool, device=teacher_ids.device).tril(-1)  # i < j
    duplicate = (same & earlier & valid[..., None, :]).any(-1)
    keep = valid & ~duplicate
    x = torch.where(keep, teacher_logits.to(dtype) / temperature, torch.tensor(float("-inf"), dtype=dtype, device=keep.device))
    has = keep.any(-1, keepdim=True)
    p = torch.where(has, torch.softmax(torch.where(has, x, 0.0), dim=-1), 0.0)
    return torch.where(keep, p, 0.0), keep


def candidate_weights(
    teacher_ce: Tensor | None,
    labels: Tensor,
    segment_ids: Tensor,
    *,
    strategy: str,
    ce_temperature: float = 1.0,
    source_weights: Tensor | None = None,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Candidate weights per row, w [S, N]: one decision per segment (rows of equal segment id).

    A segment's CE score per candidate is the mean of `teacher_ce` over its labelled rows; a
    segment without a labelled row gets all-zero weights (it has no fusion term). A +inf score
    gets weight 0 from `min_ce` (never the minimum unless all are +inf) and `softmin_ce`
    (softmax of −inf); `avg_ce` gives it softmax's weight of exp(−inf) = 0, which is not 0.
    """
    if strategy == "weights":
        assert source_weights is not None
        return source_weights.to(dtype)
    assert teacher_ce is not None
    s_count, n = teacher_ce.shape
    w = torch.zeros(s_count, n, dtype=dtype, device=teacher_ce.device)
    labelled = labels != ignore_index
    for g in torch.unique(segment_ids):
        rows = segment_ids == g
        scored = rows & labelled
        if not bool(scored.any()):
            continue
        ce = teacher_ce[:, scored].to(dtype).mean(dim=1)  # [S]
        if strategy in ("min_ce", "softmin_ce") and bool((ce == float("inf")).all()):
            continue  # every candidate scores +inf: none is preferred, the segment has no fusion term
        if strategy == "min_ce":
            ws = torch.zeros_like(ce)
            ws[torch.argmin(ce)] = 1.0  # argmin returns the first minimum: ties to the lowest s
        elif strategy == "avg_ce":
            ws = torch.softmax(torch.exp(-ce), dim=0)  # the original's formula
        elif strategy == "softmin_ce":
            ws = torch.softmax(-ce / ce_temperature, dim=0)
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        w[:, rows] = ws[:, None]
    return w


def dense_fused_teacher(
    teacher_ids: Tensor, teacher_logits: Tensor, weights: Tensor, vocab_size: int, temperature: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The fused teacher as a dense matrix P [N, V] and has_teacher [N] bool (rows where it exists)."""
    p, keep = candidate_distributions(teacher_ids, teacher_logits, vocab_size, temperature, dtype)
    w = weights.to(dtype) * keep.any(-1)  # candidates without a distribution weigh nothing
    total = w.sum(0)
    has_teacher = total > 0
    n = teacher_ids.shape[1]
    dense = torch.zeros(n, vocab_size, dtype=dtype, device=teacher_ids.device)
    for s in range(teacher_ids.shape[0]):
        idx = torch.where(keep[s], teacher_ids[s], 0).long()
        dense.scatter_add_(1, idx, w[s, :, None] * p[s])
    dense = torch.where(has_teacher[:, None], dense / torch.where(has_teacher, total, 1.0)[:, None], 0.0)
    return dense, has_teacher


def bucket_divergence(
    logq: Tensor, teacher_ids: Tensor, teacher_logits: Tensor, teacher_lse: Tensor, weights: Tensor, *, kl: bool
) -> tuple[Tensor, Tensor]:
    """Per-row bucketed divergence D [N] and has_teacher [N], densely in logq's dtype.

    logq [N, V] = log_softmax of the student; teacher_ids/teacher_logits [S, N, K];
    teacher_lse [S, N] (NaN: that candidate's row is renormalised over its entries, no tail).
    """
    dtype = logq.dtype
    s_count, n, _ = teacher_ids.shape
    v = logq.shape[1]
    valid = (teacher_ids >= 0) & (teacher_ids < v)
    x = torch.where(valid, teacher_logits.to(dtype), float("-inf"))
    own = torch.logsumexp(x, dim=-1)  # the candidate's entries alone (duplicates included)
    lse = teacher_lse.to(dtype)
    renorm = torch.isnan(lse)
    lse = torch.where(renorm, own, lse)
    has_s = valid.any(-1)
    w = torch.where(has_s, weights.to(dtype), 0.0)
    total = w.sum(0)
    has_teacher = total > 0
    wbar = w / torch.where(has_teacher, total, 1.0)
    d = torch.zeros(n, dtype=dtype, device=logq.device)
    q = logq.exp()
    for s in range(s_count):
        idx = torch.where(valid[s], teacher_ids[s], 0).long()
        p = torch.zeros(n, v, dtype=dtype, device=logq.device)
        p.scatter_add_(1, idx, torch.where(valid[s], torch.exp(x[s] - lse[s, :, None]), 0.0))
        member = torch.zeros(n, v, dtype=torch.bool, device=logq.device)
        member.scatter_(1, idx, valid[s])
        tail = torch.where(renorm[s] | ~has_s[s], 0.0, (1 - p.sum(-1)).clamp_min(0))
        q_out = torch.where(member, 0.0, q).sum(-1)  # Σ_{v∉I_s} q_v, summed directly (no 1 − Σ)
        d_s = -(p * logq).sum(-1) - torch.where(tail > 0, tail * torch.log(q_out), 0.0)
        if kl:
            d_s = d_s + torch.xlogy(p, p).sum(-1) + torch.xlogy(tail, tail)
        d = d + torch.where(wbar[s] > 0, wbar[s] * d_s, 0.0)
    return d, has_teacher


def _per_candidate(x: Tensor | None, s: int, n: int) -> Tensor | None:
    return None if x is None else x.reshape(s, n)


def _fusion_parts(weights: Tensor, keep: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """wins [S] and weight_sums [S] over the rows in `rows` (fusion rows with a teacher)."""
    w = weights * keep.any(-1)
    total = w.sum(0)
    norm = torch.where(total > 0, w / torch.where(total > 0, total, 1.0), 0.0) * rows
    winner = torch.argmax(norm, dim=0)  # first maximum: ties to the lowest s
    wins = torch.zeros(w.shape[0], dtype=torch.int64, device=w.device)
    wins.scatter_add_(0, winner[rows], torch.ones_like(winner[rows]))
    return wins, norm.sum(1).float()


def _prepare(
    logits: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    teacher_ce: Tensor | None,
    segment_ids: Tensor | None,
    source_weights: Tensor | None,
    fusion_mask: Tensor | None,
    ignore_index: int,
):
    v = logits.shape[-1]
    n = logits.numel() // v
    s = teacher_ids.shape[0]
    default_seg = torch.zeros(n, dtype=torch.long, device=logits.device)
    if logits.dim() == 3:
        default_seg = torch.arange(logits.shape[0], device=logits.device).repeat_interleave(logits.shape[1])
    labels = labels.reshape(n)
    return (
        logits.reshape(n, v),
        labels,
        teacher_ids.reshape(s, n, -1),
        teacher_logits.reshape(s, n, -1),
        _per_candidate(teacher_ce, s, n),
        default_seg if segment_ids is None else segment_ids.reshape(n),
        _per_candidate(source_weights, s, n),
        (labels != ignore_index) if fusion_mask is None else fusion_mask.reshape(n).bool(),
    )


def _reduce(
    ce_rows: Tensor, d_rows: Tensor, ce_on: Tensor, f_on: Tensor, lam: float, reduction: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ce part, fusion part) for one reduction; a term with no rows contributes 0."""
    if reduction == "none":
        return lam * ce_rows + (1 - lam) * d_rows, ce_rows, d_rows
    ce, fusion = ce_rows.sum(), d_rows.sum()
    if reduction == "mean":
        ce = ce / ce_on.sum().clamp_min(1)
        fusion = fusion / f_on.sum().clamp_min(1)
    return lam * ce + (1 - lam) * fusion, ce, fusion


def fusion_loss_reference(
    logits: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    *,
    teacher_ce: Tensor | None = None,
    segment_ids: Tensor | None = None,
    source_weights: Tensor | None = None,
    fusion_mask: Tensor | None = None,
    strategy: str = "min_ce",
    lam: float = 0.9,
    temperature: float = 1.0,
    ce_temperature: float = 1.0,
    divergence: str = "soft_ce",
    ignore_index: int = -100,
    reduction: str = "mean",
    return_parts: bool = False,
    teacher_lse: Tensor | None = None,
    teacher_tail: str = "renormalize",
    dtype: torch.dtype = torch.float64,
) -> Tensor | tuple[Tensor, FusionLossParts]:
    """The fusion loss, computed densely in `dtype` (float64 by default); same keywords as `fusion_loss`."""
    z, labels, ids, tlog, tce, seg, sw, fmask = _prepare(
        logits, labels, teacher_ids, teacher_logits, teacher_ce, segment_ids, source_weights, fusion_mask, ignore_index
    )
    v = z.shape[1]
    logq = torch.log_softmax(z.to(dtype), dim=-1)
    ce_on = labels != ignore_index
    ce_rows = torch.where(ce_on, -logq.gather(1, torch.where(ce_on, labels, 0)[:, None])[:, 0], 0.0)

    weights = candidate_weights(
        tce, labels, seg, strategy=strategy, ce_temperature=ce_temperature, source_weights=sw, ignore_index=ignore_index, dtype=dtype
    )
    if divergence not in ("soft_ce", "kl"):
        raise ValueError(f"unknown divergence {divergence!r}")
    if teacher_tail == "bucket":
        assert teacher_lse is not None and temperature == 1.0
        d_rows, has_teacher = bucket_divergence(
            logq, ids, tlog, teacher_lse.reshape(ids.shape[0], -1), weights, kl=divergence == "kl"
        )
    else:
        teacher, has_teacher = dense_fused_teacher(ids, tlog, weights, v, temperature, dtype)
        d_rows = -(teacher * logq).sum(-1)
        if divergence == "kl":
            d_rows = d_rows + torch.xlogy(teacher, teacher).sum(-1)
    d_rows = torch.where(fmask & has_teacher, d_rows, 0.0)

    loss, ce_part, fusion_part = _reduce(ce_rows, d_rows, ce_on, fmask, lam, reduction)
    if reduction == "none":
        batch_shape = logits.shape[:-1]
        loss, ce_part, fusion_part = (t.reshape(batch_shape) for t in (loss, ce_part, fusion_part))
    if not return_parts:
        return loss
    _, keep = candidate_distributions(ids, tlog, v, temperature, dtype)
    wins, weight_sums = _fusion_parts(weights, keep, fmask & has_teacher)
    return loss, FusionLossParts(ce_part, fusion_part, ce_on.sum(), fmask.sum(), wins, weight_sums)


def fusion_loss_gather(
    logits: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    *,
    teacher_ce: Tensor | None = None,
    segment_ids: Tensor | None = None,
    source_weights: Tensor | None = None,
    fusion_mask: Tensor | None = None,
    strategy: str = "min_ce",
    lam: float = 0.9,
    temperature: float = 1.0,
    ce_temperature: float = 1.0,
    divergence: str = "soft_ce",
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The same loss as a log_softmax over fp32 logits and a gather at the S·K teacher ids.

    The benchmark's "log_softmax + gather" row; no dense teacher, but an fp32 [N, V] log q.
    """
    z, labels, ids, tlog, tce, seg, sw, fmask = _prepare(
        logits, labels, teacher_ids, teacher_logits, teacher_ce, segment_ids, source_weights, fusion_mask, ignore_index
    )
    s, n, k = ids.shape
    v = z.shape[1]
    logq = torch.log_softmax(z.float(), dim=-1)
    ce_on = labels != ignore_index
    ce_rows = torch.where(ce_on, -logq.gather(1, torch.where(ce_on, labels, 0)[:, None])[:, 0], 0.0)

    weights = candidate_weights(
        tce, labels, seg, strategy=strategy, ce_temperature=ce_temperature, source_weights=sw, ignore_index=ignore_index, dtype=torch.float32
    )
    p, keep = candidate_distributions(ids, tlog, v, temperature, torch.float32)
    w = weights * keep.any(-1)
    total = w.sum(0)
    has_teacher = total > 0
    entries = (w[..., None] * p / torch.where(has_teacher, total, 1.0)[None, :, None]).permute(1, 0, 2).reshape(n, s * k)
    entry_ids = torch.where(keep, ids, 0).long().permute(1, 0, 2).reshape(n, s * k)
    d_rows = -(entries * logq.gather(1, entry_ids)).sum(-1)
    if divergence == "kl":
        merged = ((entry_ids[:, :, None] == entry_ids[:, None, :]) * entries[:, None, :]).sum(-1)
        d_rows = d_rows + torch.xlogy(entries, merged).sum(-1)
    d_rows = torch.where(fmask & has_teacher, d_rows, 0.0)
    loss = _reduce(ce_rows, d_rows, ce_on, fmask, lam, reduction)[0]
    return loss.reshape(logits.shape[:-1]) if reduction == "none" else loss
