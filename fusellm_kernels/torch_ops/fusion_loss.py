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


class TorchFusionLossFunction(torch.autograd.Function):
    """Inputs: logits [N, V]; labels [N]; entry_ids, entry_p [N, E]; has_teacher, fusion_mask [N];
    ce_coef, f_coef float32 scalars. Outputs row_loss, ce_row, d_row float32 [N].

    A label outside [0, V) that is not ignore_index makes its row's CE, loss and gradient NaN
    (as the kernel does): visible in the loss without a host sync; `validate=True` names it.
    """

    @staticmethod
    def forward(ctx, logits, labels, entry_ids, entry_p, has_teacher, fusion_mask, ce_coef, f_coef, ignore_index: int, kl: bool):
        n, v = logits.shape
        ce_on, bad_label, has_f, safe_labels, a, b = _row_terms(labels, v, ignore_index, fusion_mask, has_teacher, ce_coef, f_coef)
        lse = logits.new_empty(n, dtype=torch.float32)
        ce_row = logits.new_zeros(n, dtype=torch.float32)
        d_row = logits.new_zeros(n, dtype=torch.float32)
        if kl:
            entropy = _entry_entropy(entry_ids, entry_p)
        step = _chunk_rows(v)
        for r0 in range(0, n, step):
            r = slice(r0, min(n, r0 + step))
            z = logits[r].float()
            lse[r] = torch.logsumexp(z, dim=-1)
            ce_row[r] = lse[r] - z.gather(1, safe_labels[r, None])[:, 0]
            d_row[r] = (entry_p[r] * (lse[r, None] - z.gather(1, entry_ids[r]))).sum(-1)
        ce_row = torch.where(ce_on, ce_row, 0.0)
        ce_row = torch.where(bad_label, float("nan"), ce_row)
        if kl:
            d_row = d_row + entropy
        d_row = torch.where(has_f, d_row, 0.0)
        ctx.save_for_backward(logits, lse, safe_labels, entry_ids, entry_p, a, b)
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
        logits, lse, labels, entry_ids, entry_p, a, b = ctx.saved_tensors
        n, v = logits.shape
        grad = torch.empty_like(logits)
        coef, label_coef = _corrections(entry_ids, entry_p, labels, a, b)
        ga = a * g_row_loss
        gb = b * g_row_loss
        step = _chunk_rows(v)
        for r0 in range(0, n, step):
            r = slice(r0, min(n, r0 + step))
            g = torch.exp(logits[r].float() - lse[r, None]) * (ga[r] + gb[r])[:, None]
            g.scatter_add_(1, entry_ids[r], -coef[r] * g_row_loss[r, None])
            g.scatter_add_(1, labels[r, None], -(label_coef[r] * g_row_loss[r])[:, None])
            grad[r] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None, None


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
) -> tuple[Tensor, Tensor, Tensor]:
    """row_loss, ce_row, d_row float32 [N] with gradient to `logits` (see `ops.fusion_loss.fusion_loss_forward`)."""
    entry_ids, entry_p, has_teacher = sparse_teacher(teacher_ids, teacher_logits, weights, logits.shape[1], temperature)
    return TorchFusionLossFunction.apply(
        logits, labels, entry_ids, entry_p, has_teacher, fusion_mask, ce_coef, f_coef, ignore_index, kl
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
) -> tuple[Tensor, Tensor, Tensor]:
    """row_loss, ce_row, d_row float32 [C] of a chunk of logits z [C, V], no autograd.

    The same loss as `fusion_loss_torch`. z is consumed: with `grad`, it is overwritten by
    ∂(Σ_n upstream_n·ℓ_n)/∂z (upstream: [C] float32, None for ones) in its own dtype; without,
    its contents are left undefined. fp32 z is worked on in place; bf16/fp16 z is copied once
    into `work` (fp32, at least [C, V]; allocated when None), worked on there and the gradient
    rounded back into z once, as the unchunked path rounds it.
    """
    c, v = z.shape
    entry_ids, entry_p, has_teacher = sparse_teacher(teacher_ids, teacher_logits, weights, v, temperature)
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
    sum_exp = x.sum(1)
    log_sum = sum_exp.log()
    ce_row = torch.where(ce_on, log_sum - z_label, 0.0)
    ce_row = torch.where(bad_label, float("nan"), ce_row)
    d_row = (entry_p * (log_sum[:, None] - z_entry)).sum(-1)
    if kl:
        d_row = d_row + _entry_entropy(entry_ids, entry_p)
    d_row = torch.where(has_f, d_row, 0.0)
    row_loss = a * ce_row + b * d_row
    if grad:
        up = upstream if upstream is not None else torch.ones_like(a)
        coef, label_coef = _corrections(entry_ids, entry_p, safe_labels, a, b)
        # ∂ℓ/∂z = (a + b)·q − a·[v = label] − b·P: q = exp(z − m) / Σ is already in x
        x.mul_(((a + b) * up / sum_exp)[:, None])
        x.scatter_add_(1, entry_ids, -coef * up[:, None])
        x.scatter_add_(1, safe_labels[:, None], -(label_coef * up)[:, None])
        if x is not z:
            z.copy_(x)
    return row_loss, ce_row, d_row
