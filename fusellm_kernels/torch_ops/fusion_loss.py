"""Fusion loss on given logits in chunked PyTorch: the CPU path (same math as
`ops/fusion_loss.py`, whose header gives the loss and gradient).

Rows are processed in chunks so that the float32 working set is bounded by
`chunk_rows · V · 4` bytes (about 64 MiB), never [N, V]. The forward keeps lse [N] and the
sparse teacher entries; the backward recomputes q chunk by chunk and multiplies by the
upstream gradient directly.
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


class TorchFusionLossFunction(torch.autograd.Function):
    """Inputs: logits [N, V]; labels [N]; entry_ids, entry_p [N, E]; has_teacher, fusion_mask [N];
    ce_coef, f_coef float32 scalars. Outputs row_loss, ce_row, d_row float32 [N].

    A label outside [0, V) that is not ignore_index makes its row's CE, loss and gradient NaN
    (as the kernel does): visible in the loss without a host sync; `validate=True` names it.
    """

    @staticmethod
    def forward(ctx, logits, labels, entry_ids, entry_p, has_teacher, fusion_mask, ce_coef, f_coef, ignore_index: int, kl: bool):
        n, v = logits.shape
        ce_on = labels != ignore_index
        bad_label = ce_on & ((labels < 0) | (labels >= v))
        has_f = fusion_mask & has_teacher
        safe_labels = torch.where(ce_on & ~bad_label, labels, 0).long()
        lse = logits.new_empty(n, dtype=torch.float32)
        ce_row = logits.new_zeros(n, dtype=torch.float32)
        d_row = logits.new_zeros(n, dtype=torch.float32)
        if kl:
            merged = ((entry_ids[:, :, None] == entry_ids[:, None, :]) * entry_p[:, None, :]).sum(-1)
            entropy = torch.xlogy(entry_p, merged).sum(-1)
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
        # a NaN coefficient carries a bad label's NaN into every entry of the row's gradient
        a = torch.where(bad_label, float("nan"), torch.where(ce_on, ce_coef, 0.0))
        b = torch.where(has_f, f_coef, 0.0)
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
        # Merge duplicate ids (and the label) so every position gets one correction: the
        # scatter is then order-independent and the result deterministic.
        same = entry_ids[:, :, None] == entry_ids[:, None, :]
        earlier = torch.ones(same.shape[1:], dtype=torch.bool, device=same.device).tril(-1)  # also for N = 0
        first = ~(same & earlier).any(-1)
        coef = (same * entry_p[:, None, :]).sum(-1) * b[:, None]
        coef = coef + (entry_ids == labels[:, None]) * a[:, None]
        coef = torch.where(first, coef, 0.0)
        label_coef = torch.where((entry_ids == labels[:, None]).any(-1), 0.0, a)
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
