"""Fusion loss on given logits in chunked PyTorch: the CPU path (same math as
`ops/fusion_loss.py`, whose header gives the loss and gradient).

Rows are processed in chunks so that the float32 working set is bounded by
`chunk_rows · V · 4` bytes (about 64 MiB), never [N, V]. The forward keeps lse [N] and the
sparse teacher entries; the backward recomputes q chunk by chunk and multiplies by the
upstream gradient directly.

`fusion_loss_chunk_` is the fused lm_head's CPU path: the loss of one chunk of logits that
it owns, with the gradient written over those logits in closed form (no autograd), as the
Triton kernel does: max, exp in place, row sums, one scale by (a + b)/Σ, then the ≤ S·K + 1
sparse corrections scattered in. Four passes over the chunk and no [C, V] temporary besides
an fp32 copy for bf16/fp16 logits (see bench/README.md, "CPU baseline", for what it saves).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fusellm_kernels.validation import second_backward_error

_CHUNK_BYTES = 64 << 20


def sparse_teacher(teacher_ids: Tensor, teacher_logits: Tensor, weights: Tensor, vocab_size: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """The fused teacher as entries per row: ids [N, S·K] int64 (0 at unused entries),
    P [N, S·K] float32 (0 at unused entries) and has_teacher [N] bool."""
    s, n, k = teacher_ids.shape
    ids = teacher_ids.long()
    valid = (ids >= 0) & (ids < vocab_size)
    same = ids[..., :, None] == ids[..., None, :]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
    keep = valid & ~(same & earlier & valid[..., None, :]).any(-1)
    x = torch.where(keep, teacher_logits.float() / temperature, float("-inf"))
    has_s = keep.any(-1)
    p = torch.softmax(torch.where(has_s[..., None], x, 0.0), dim=-1)
    p = torch.where(keep, p, 0.0)
    w = torch.where(has_s, weights.float(), 0.0)
    total = w.sum(0)
    has_teacher = total > 0
    entries = w[..., None] * p / torch.where(has_teacher, total, 1.0)[None, :, None]
    to_rows = lambda t: t.permute(1, 0, 2).reshape(n, s * k)  # noqa: E731
    return to_rows(torch.where(keep, ids, 0)), to_rows(entries), has_teacher


@dataclass(frozen=True)
class BucketTeacher:
    """The candidates' sparse distributions with their tails (`teacher_tail="bucket"`), as
    entries per row (E = S·K, entry e belongs to candidate e // K):

    ids [N, E] int64 (0 at unused entries); p [N, E] float32, w̄_s·p_s at each slot (duplicate
    slots keep their own mass, so sums over entries add them); used [N, E] (valid slots);
    first_in_cand [N, E] (the first slot of its id within its candidate: one per member of I_s);
    cand [E] the candidate of each entry;
    member [N, E, S] (entry e's id is in I_s); merged [N, E] = Σ_s w̄_s p_s(id_e), the fused
    teacher at the entry's id; merged_same [N, E] = w̄_s p_s(id_e) for the entry's own s;
    wbar, tail, mass [N, S]: normalised weights, t_s and Σ_u p_s(u) + t_s; has_teacher [N].
    """

    ids: Tensor
    p: Tensor
    used: Tensor
    first_in_cand: Tensor
    member: Tensor
    merged: Tensor
    merged_same: Tensor
    cand: Tensor
    wbar: Tensor
    tail: Tensor
    mass: Tensor
    has_teacher: Tensor


def bucket_teacher(teacher_ids: Tensor, teacher_logits: Tensor, teacher_lse: Tensor, weights: Tensor, vocab_size: int) -> BucketTeacher:
    """p_sj = exp(x_sj − lse_s) over the valid slots; t_s = max(0, 1 − Σ_j p_sj); a NaN lse_s
    renormalises the candidate's row over its slots, with no tail (one-hot fallbacks)."""
    s, n, k = teacher_ids.shape
    ids = teacher_ids.long()
    valid = (ids >= 0) & (ids < vocab_size)
    x = torch.where(valid, teacher_logits.float(), float("-inf"))
    has_s = valid.any(-1)
    lse = teacher_lse.float()
    renorm = torch.isnan(lse)
    lse = torch.where(renorm, torch.where(has_s, torch.logsumexp(x, -1), 0.0), lse)
    p = torch.where(valid, torch.exp(x - lse[..., None]), 0.0)
    tail = torch.where(renorm | ~has_s, 0.0, (1 - p.sum(-1)).clamp_min(0))
    w = torch.where(has_s, weights.float(), 0.0)
    total = w.sum(0)
    has_teacher = total > 0
    wbar = w / torch.where(has_teacher, total, 1.0)
    to_rows = lambda t: t.permute(1, 0, 2).reshape(n, s * k)  # noqa: E731
    e_ids = to_rows(torch.where(valid, ids, -1))
    e_p = to_rows(wbar[..., None] * p)
    e_used = e_ids >= 0
    cand = torch.arange(s * k, device=ids.device) // k
    same = (e_ids[:, :, None] == e_ids[:, None, :]) & e_used[:, :, None]  # [N, e, j]
    same_cand = same & (cand[:, None] == cand[None, :])
    earlier = torch.ones(s * k, s * k, dtype=torch.bool, device=ids.device).tril(-1)
    first_in_cand = e_used & ~(same_cand & earlier).any(-1)
    member = (same[:, :, :, None] & (cand[None, None, :, None] == torch.arange(s, device=ids.device))).any(2)
    return BucketTeacher(
        ids=torch.where(e_used, e_ids, 0), p=e_p, used=e_used, first_in_cand=first_in_cand, member=member,
        merged=(same * e_p[:, None, :]).sum(-1), merged_same=(same_cand * e_p[:, None, :]).sum(-1),
        cand=cand, wbar=wbar.T, tail=tail.T, mass=(p.sum(-1) + tail).T, has_teacher=has_teacher,
    )


def bucket_out_mass(x: Tensor, bt: BucketTeacher, r: slice) -> tuple[Tensor, Tensor]:
    """log Q_s [C, S] for rows r from x [C, V] = exp(z − m) (any m, fp32): the student's mass
    outside each candidate's ids; and log Σ_v x [C] (so lse = m + it). Σ_v x and the in-set
    terms are summed in float64 from the very same fp32 values, so the difference is exact up
    to fp64 rounding: Q_s down to about 1e-12 keeps its digits where 1 − Σ_{I_s} q in fp32
    would cancel to 0."""
    total = x.sum(1, dtype=torch.float64)
    inset = torch.where(bt.first_in_cand[r], x.gather(1, bt.ids[r]), 0.0).double()  # [C, E]
    own = bt.cand[:, None] == torch.arange(bt.wbar.shape[1], device=x.device)  # [E, S]
    inset = inset @ own.double()  # [C, S]: each id of I_s once
    out = (total[:, None] - inset).clamp_min(0)
    log_total = torch.log(total)
    return (torch.log(out) - log_total[:, None]).float(), log_total.float()


def bucket_terms(bt: BucketTeacher, log_q_out: Tensor, r: slice, kl: bool) -> tuple[Tensor, Tensor, Tensor]:
    """For rows r: the tail part of D [C] (and the entropies for kl), the dense gradient
    coefficient's β [C] and each entry's own β_e [C, E] (see `ops/fusion_loss.py`)."""
    wbar, tail, mass = bt.wbar[r], bt.tail[r], bt.mass[r]
    has_tail = tail > 0
    d = -torch.where(has_tail, wbar * tail * log_q_out, 0.0).sum(-1)
    if kl:
        ent = torch.where(bt.first_in_cand[r] & (bt.merged_same[r] > 0), bt.merged_same[r], 0.0)
        e_w = wbar[:, bt.cand]  # each entry's own w̄_s
        d = d + (ent * torch.log(torch.where(ent > 0, ent / torch.where(e_w > 0, e_w, 1.0), 1.0))).sum(-1)
        d = d + (wbar * torch.xlogy(tail, tail)).sum(-1)
    ratio = torch.where(has_tail, wbar * tail * torch.exp(-log_q_out), 0.0)  # r_s = w̄_s t_s / Q_s
    w_mass = (wbar * mass).sum(-1)
    beta = w_mass - ratio.sum(-1)
    beta_e = w_mass[:, None] - (ratio[:, None, :] * ~bt.member[r]).sum(-1)  # Σ over s with id_e ∉ I_s, no cancellation
    return d, beta, beta_e


def _chunk_rows(v: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * max(v, 1)))


def _row_terms(labels: Tensor, v: int, ignore_index: int, fusion_mask: Tensor, has_teacher: Tensor, ce_coef: Tensor, f_coef: Tensor):
    """ce_on, bad_label, has_f, safe_labels (int64) and the coefficients a, b [N] of each row."""
    ce_on = labels != ignore_index
    bad_label = ce_on & ((labels < 0) | (labels >= v))
    has_f = fusion_mask & has_teacher
    safe_labels = torch.where(ce_on & ~bad_label, labels, 0).long()
    # a NaN coefficient carries a bad label's NaN into every entry of the row's gradient
    a = torch.where(bad_label, float("nan"), torch.where(ce_on, ce_coef, 0.0))
    b = torch.where(has_f, f_coef, 0.0)
    return ce_on, bad_label, has_f, safe_labels, a, b


def _entry_entropy(entry_ids: Tensor, entry_p: Tensor) -> Tensor:
    """Σ_e P_e log P_{id_e} per row (the kl divergence's extra term)."""
    merged = ((entry_ids[:, :, None] == entry_ids[:, None, :]) * entry_p[:, None, :]).sum(-1)
    return torch.xlogy(entry_p, merged).sum(-1)


def _corrections(entry_ids: Tensor, entry_p: Tensor, labels: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The sparse part of the gradient, −coef at entry_ids and −label_coef at labels.

    Duplicate ids (and the label) are merged so every position gets one correction: the
    scatter is then order-independent and the result deterministic.
    """
    same = entry_ids[:, :, None] == entry_ids[:, None, :]
    earlier = torch.ones(same.shape[1:], dtype=torch.bool, device=same.device).tril(-1)  # also for N = 0
    first = ~(same & earlier).any(-1)
    coef = (same * entry_p[:, None, :]).sum(-1) * b[:, None]
    coef = coef + (entry_ids == labels[:, None]) * a[:, None]
    coef = torch.where(first, coef, 0.0)
    label_coef = torch.where((entry_ids == labels[:, None]).any(-1), 0.0, a)
    return coef, label_coef


def _bucket_entry_grad_(g: Tensor, q_e: Tensor, bt: BucketTeacher, r: slice, labels: Tensor, a: Tensor, b: Tensor, beta_e: Tensor) -> None:
    """Write the bucket gradient's value at every entry id of rows r directly:
    (a + b·β_e)·q_e − b·P(id_e) − a·[id_e = label]. Adding corrections to the dense value
    instead would cancel: with a small Q_s, b·β·q is huge where the exact value is O(1).
    Duplicate ids write equal values, so the unordered index_put is deterministic."""
    used = bt.used[r]
    ids = bt.ids[r]
    val = (a[:, None] + b[:, None] * beta_e) * q_e - b[:, None] * bt.merged[r] - torch.where(ids == labels[:, None], a[:, None], 0.0)
    rows = torch.arange(g.shape[0], device=g.device)[:, None].expand_as(ids)
    g.index_put_((rows[used], ids[used]), val[used])


def _label_not_in(bt: BucketTeacher, labels: Tensor) -> Tensor:
    return ~(bt.used & (bt.ids == labels[:, None])).any(-1)


def _teacher_entries(
    teacher_ids: Tensor, teacher_logits: Tensor, weights: Tensor, vocab_size: int, temperature: float, teacher_lse: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, BucketTeacher | None]:
    """entry_ids, entry_p, has_teacher and the bucket teacher (None: renormalised entries)."""
    if teacher_lse is None:
        return (*sparse_teacher(teacher_ids, teacher_logits, weights, vocab_size, temperature), None)
    bt = bucket_teacher(teacher_ids, teacher_logits, teacher_lse, weights, vocab_size)
    return bt.ids, bt.p, bt.has_teacher, bt


class TorchFusionLossFunction(torch.autograd.Function):
    """Inputs: logits [N, V]; labels [N]; entry_ids, entry_p [N, E]; has_teacher, fusion_mask [N];
    ce_coef, f_coef float32 scalars; bt: the bucket teacher or None (renormalised entries).
    Outputs row_loss, ce_row, d_row float32 [N].

    A label outside [0, V) that is not ignore_index makes its row's CE, loss and gradient NaN
    (as the kernel does): visible in the loss without a host sync; `validate=True` names it.
    """

    @staticmethod
    def forward(ctx, logits, labels, entry_ids, entry_p, has_teacher, fusion_mask, ce_coef, f_coef, ignore_index: int, kl: bool,
                bt: BucketTeacher | None = None):
        n, v = logits.shape
        ce_on, bad_label, has_f, safe_labels, a, b = _row_terms(labels, v, ignore_index, fusion_mask, has_teacher, ce_coef, f_coef)
        lse = logits.new_empty(n, dtype=torch.float32)
        ce_row = logits.new_zeros(n, dtype=torch.float32)
        d_row = logits.new_zeros(n, dtype=torch.float32)
        beta = beta_e = None
        if bt is not None:
            beta = logits.new_empty(n, dtype=torch.float32)
            beta_e = logits.new_empty(entry_ids.shape, dtype=torch.float32)
        elif kl:
            d_row += _entry_entropy(entry_ids, entry_p)
        step = _chunk_rows(v)
        for r0 in range(0, n, step):
            r = slice(r0, min(n, r0 + step))
            z = logits[r].float()
            if bt is None:
                lse[r] = torch.logsumexp(z, dim=-1)
            else:
                # one exp pass serves lse and Q_s: lse = m + log Σ exp(z − m), the sum in float64
                m = z.amax(1, keepdim=True)
                m = torch.where(m.isfinite(), m, 0.0)  # as torch.logsumexp treats an all −inf row
                log_q_out, log_total = bucket_out_mass((z - m).exp_(), bt, r)
                lse[r] = m[:, 0] + log_total
                d_tail, beta[r], beta_e[r] = bucket_terms(bt, log_q_out, r, kl)
                d_row[r] += d_tail
            ce_row[r] = lse[r] - z.gather(1, safe_labels[r, None])[:, 0]
            d_row[r] += (entry_p[r] * (lse[r, None] - z.gather(1, entry_ids[r]))).sum(-1)
        ce_row = torch.where(ce_on, ce_row, 0.0)
        ce_row = torch.where(bad_label, float("nan"), ce_row)
        d_row = torch.where(has_f, d_row, 0.0)
        ctx.save_for_backward(logits, lse, safe_labels, entry_ids, entry_p, a, b, beta, beta_e)
        ctx.bt = bt
        ctx.mark_non_differentiable(ce_row, d_row)
        ctx.spent = False
        return a * ce_row + b * d_row, ce_row, d_row

    @staticmethod
    def backward(ctx, g_row_loss, g_ce, g_d):
        # The gradient is one pass like the Triton path's, and refused twice alike, so that
        # code tested on CPU behaves the same on CUDA.
        if ctx.spent:
            raise second_backward_error("fusion_loss")
        ctx.spent = True
        logits, lse, labels, entry_ids, entry_p, a, b, beta, beta_e = ctx.saved_tensors
        bt = ctx.bt
        n, v = logits.shape
        grad = torch.empty_like(logits)
        ga = a * g_row_loss
        gb = b * g_row_loss
        if bt is None:
            coef, label_coef = _corrections(entry_ids, entry_p, labels, a, b)
        else:
            label_coef = torch.where(_label_not_in(bt, labels), ga, 0.0)
        step = _chunk_rows(v)
        for r0 in range(0, n, step):
            r = slice(r0, min(n, r0 + step))
            q = torch.exp(logits[r].float() - lse[r, None])
            if bt is None:
                g = q * (ga[r] + gb[r])[:, None]
                g.scatter_add_(1, entry_ids[r], -coef[r] * g_row_loss[r, None])
                g.scatter_add_(1, labels[r, None], -(label_coef[r] * g_row_loss[r])[:, None])
            else:
                g = q * (ga[r] + gb[r] * beta[r])[:, None]
                _bucket_entry_grad_(g, q.gather(1, bt.ids[r]), bt, r, labels[r], ga[r], gb[r], beta_e[r])
                g.scatter_add_(1, labels[r, None], -label_coef[r, None])
            grad[r] = g.to(grad.dtype)
        return (grad,) + (None,) * 10


def fusion_loss_torch(
    logits: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    weights: Tensor,
    fusion_mask: Tensor,
    ce_coef: Tensor,
    f_coef: Tensor,
    *,
    temperature: float,
    kl: bool,
    ignore_index: int,
    teacher_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """row_loss, ce_row, d_row float32 [N] with gradient to `logits` (see `ops.fusion_loss.fusion_loss_forward`).
    `teacher_lse` [S, N] selects the bucketed tail (temperature must be 1)."""
    entry_ids, entry_p, has_teacher, bt = _teacher_entries(
        teacher_ids, teacher_logits, weights, logits.shape[1], temperature, teacher_lse
    )
    return TorchFusionLossFunction.apply(
        logits, labels, entry_ids, entry_p, has_teacher, fusion_mask, ce_coef, f_coef, ignore_index, kl, bt
    )


def fusion_loss_chunk_(
    z: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    weights: Tensor,
    fusion_mask: Tensor,
    ce_coef: Tensor,
    f_coef: Tensor,
    *,
    temperature: float,
    kl: bool,
    ignore_index: int,
    grad: bool,
    upstream: Tensor | None = None,
    work: Tensor | None = None,
    teacher_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """row_loss, ce_row, d_row float32 [C] of a chunk of logits z [C, V], no autograd.

    The same loss as `fusion_loss_torch`. z is consumed: with `grad`, it is overwritten by
    ∂(Σ_n upstream_n·ℓ_n)/∂z (upstream: [C] float32, None for ones) in its own dtype; without,
    its contents are left undefined. fp32 z is worked on in place; bf16/fp16 z is copied once
    into `work` (fp32, at least [C, V]; allocated when None), worked on there and the gradient
    rounded back into z once, as the unchunked path rounds it.
    """
    c, v = z.shape
    entry_ids, entry_p, has_teacher, bt = _teacher_entries(teacher_ids, teacher_logits, weights, v, temperature, teacher_lse)
    ce_on, bad_label, has_f, safe_labels, a, b = _row_terms(labels, v, ignore_index, fusion_mask, has_teacher, ce_coef, f_coef)
    if z.dtype == torch.float32:
        x = z
    else:
        x = (work[:c] if work is not None else torch.empty(c, v, dtype=torch.float32, device=z.device)).copy_(z)
    # lse = m + log Σ exp(z − m); a non-finite row max is replaced by 0, as torch.logsumexp does
    m = x.amax(1, keepdim=True) if v else x.new_zeros(c, 1)
    m = torch.where(m.isfinite(), m, 0.0)
    z_label = x.gather(1, safe_labels[:, None])[:, 0] - m[:, 0]  # shifted by m, read before the exp
    z_entry = x.gather(1, entry_ids) - m
    x.sub_(m).exp_()
    rows = slice(0, c)
    if bt is None:
        sum_exp = x.sum(1)
        log_sum = sum_exp.log()
    else:  # the float64 sum that Q_s needs serves the lse too
        log_q_out, log_sum = bucket_out_mass(x, bt, rows)
        sum_exp = log_sum.exp()
    ce_row = torch.where(ce_on, log_sum - z_label, 0.0)
    ce_row = torch.where(bad_label, float("nan"), ce_row)
    d_row = (entry_p * (log_sum[:, None] - z_entry)).sum(-1)
    if bt is not None:
        d_tail, beta, beta_e = bucket_terms(bt, log_q_out, rows, kl)
        d_row = d_row + d_tail
    elif kl:
        d_row = d_row + _entry_entropy(entry_ids, entry_p)
    d_row = torch.where(has_f, d_row, 0.0)
    row_loss = a * ce_row + b * d_row
    if grad:
        up = upstream if upstream is not None else torch.ones_like(a)
        if bt is None:
            coef, label_coef = _corrections(entry_ids, entry_p, safe_labels, a, b)
            # ∂ℓ/∂z = (a + b)·q − a·[v = label] − b·P: q = exp(z − m) / Σ is already in x
            x.mul_(((a + b) * up / sum_exp)[:, None])
            x.scatter_add_(1, entry_ids, -coef * up[:, None])
            x.scatter_add_(1, safe_labels[:, None], -(label_coef * up)[:, None])
        else:
            # ∂ℓ/∂z = (a + b·β)·q off the entries, written directly at them (ops/fusion_loss.py)
            q_e = x.gather(1, entry_ids) / sum_exp[:, None]
            x.mul_(((a + b * beta) * up / sum_exp)[:, None])
            _bucket_entry_grad_(x, q_e, bt, rows, safe_labels, a * up, b * up, beta_e)
            x.scatter_add_(1, safe_labels[:, None], -torch.where(_label_not_in(bt, safe_labels), a * up, 0.0)[:, None])
        if x is not z:
            z.copy_(x)
    return row_loss, ce_row, d_row
