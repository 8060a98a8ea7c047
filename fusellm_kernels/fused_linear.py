"""Fused lm_head + fusion loss: the loss of `hidden @ weight.T + bias` without the [N, V] logits.

Scheme (per call; H hidden size, V vocabulary, C rows per chunk):
    for each chunk of C rows:
        z      = hidden_c @ weight.T + bias             [C, V], hidden's dtype (cuBLAS, fp32 accumulate)
        loss_c, ∂ℓ/∂z written over z                      (the fusion-loss kernel, gradient in place)
        grad_hidden_c  = z @ weight                       [C, H]
        grad_weight   += z.T @ hidden_c                   [V, H], fp32 accumulator
        grad_bias     += Σ_rows z                         [V], fp32
All three products happen in the forward (6·N·H·V FLOPs in all, the minimum); the backward
only multiplies the stored gradients by the upstream gradient when it is not exactly 1.

Chunk size: C = min(N, ⌊budget / (V · bytes per logit)⌋), rounded down to a multiple of 128,
with a 1 GiB budget on CUDA (C = 4096 at V = 128 256 in bf16, so N = 8192 runs as two chunks
and the V×H fp32 weight gradient is written once and accumulated into once) and 64 MiB
elsewhere. Liger's fused linear cross entropy loses its time by re-reading and re-writing the
whole V×H gradient for every small token chunk; here the chunk is as large as the budget
allows, so that traffic happens ⌈N / C⌉ times, and the first chunk writes instead of adding.
Peak extra memory: one chunk of logits (C·V elements) plus the fp32 weight-gradient
accumulator (which is the weight gradient itself; it is cast to the weight's dtype at the
end), updated in place by cuBLAS (or in ≤ 256 MiB vocabulary slices), and O(N·S) floats.

`reduction="none"` cannot fold its per-row upstream gradient before the backward, so its
forward computes only the loss and its backward recomputes the chunks (2·N·H·V FLOPs more).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fusellm_kernels.functional import PreparedLoss, finish_loss, prepare_loss
from fusellm_kernels.types import Backend, Divergence, FusionLossParts, Reduction, Strategy, TeacherTail
from fusellm_kernels.validation import FusionInputError, second_backward_error

_CUDA_CHUNK_BYTES = 1 << 30
_CPU_CHUNK_BYTES = 64 << 20


def default_chunk_rows(n: int, v: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: the largest multiple of 128 (at least 1 chunk row) whose logits fit the budget."""
    budget = _CUDA_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
    rows = budget // max(1, v * torch.finfo(dtype).bits // 8)
    if rows >= 128:
        rows -= rows % 128
    return int(max(1, min(n, rows)))


def _chunk_loss_grad(
    z: Tensor, r: slice, prep: PreparedLoss, want_grad: bool, upstream: Tensor | None, work: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Row losses of a chunk of logits and, if wanted, ∂(Σ upstream·ℓ)/∂z, written over z."""
    inp = prep.inputs
    args = (inp.labels[r], inp.teacher_ids[:, r], inp.teacher_logits[:, r], prep.weights[:, r])
    tlse = None if inp.teacher_lse is None else inp.teacher_lse[:, r]
    if prep.use_triton:
        from fusellm_kernels.ops.fusion_loss import fusion_loss_forward

        row_loss, ce_rows, d_rows, _ = fusion_loss_forward(
            z, *args, inp.fusion_mask[r].to(torch.uint8), prep.ce_coef, prep.f_coef,
            temperature=prep.temperature, kl=prep.kl, ignore_index=prep.ignore_index,
            grad=z if want_grad else None, upstream=upstream, teacher_lse=tlse,
        )
        return row_loss, ce_rows, d_rows, (z if want_grad else None)
    from fusellm_kernels.torch_ops.fusion_loss import fusion_loss_chunk_

    # The gradient in closed form, in place (bench/README.md, "CPU baseline"): autograd here
    # cost a logsumexp, an exp and three [C, V] temporaries per chunk.
    row_loss, ce_rows, d_rows = fusion_loss_chunk_(
        z, *args, inp.fusion_mask[r], prep.ce_coef, prep.f_coef,
        temperature=prep.temperature, kl=prep.kl, ignore_index=prep.ignore_index,
        grad=want_grad, upstream=upstream, work=work, teacher_lse=tlse,
    )
    return row_loss, ce_rows, d_rows, (z if want_grad else None)


def _run_chunks(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, prep: PreparedLoss, chunk: int,
    need: tuple[bool, bool, bool], upstream: Tensor | None,
):
    """One pass over the chunks: row losses and the gradients asked for by `need` (hidden, weight, bias)."""
    n = hidden.shape[0]
    v = weight.shape[0]
    rows = [torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    grad_hidden = torch.empty_like(hidden) if need[0] else None
    grad_weight = None
    grad_bias = torch.zeros(v, dtype=torch.float32, device=hidden.device) if need[2] else None
    want_grad = any(need)
    # CPU path: one chunk buffer (and, for bf16/fp16, one fp32 work buffer) reused by every
    # chunk; a fresh 64 MiB block per chunk costs page faults on every chunk.
    zbuf = work = None
    if not prep.use_triton and n > 0:
        rows_max = min(n, chunk)
        zbuf = torch.empty(rows_max, v, dtype=hidden.dtype, device=hidden.device)
        if hidden.dtype != torch.float32:
            work = torch.empty(rows_max, v, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n, chunk):
        r = slice(r0, min(n, r0 + chunk))
        h = hidden[r]
        if zbuf is not None:
            z = zbuf[: h.shape[0]]
            if bias is not None:
                torch.addmm(bias, h, weight.T, out=z)
            else:
                torch.mm(h, weight.T, out=z)
        else:
            z = torch.addmm(bias, h, weight.T) if bias is not None else h @ weight.T
        up = None if upstream is None else upstream[r]
        row_loss, ce_rows, d_rows, g = _chunk_loss_grad(z, r, prep, want_grad, up, work)
        for out, x in zip(rows, (row_loss, ce_rows, d_rows)):
            out[r] = x
        if g is None:
            continue
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[r])
        if need[1]:
            if grad_weight is None:
                grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            _accumulate_weight_grad(grad_weight, g, h, first=r0 == 0)
        if grad_bias is not None:
            grad_bias += g.sum(0, dtype=torch.float32)
    if need[1] and grad_weight is None:  # no rows at all
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return rows, grad_hidden, grad_weight, grad_bias


_WGRAD_SLICE_BYTES = 256 << 20


def _accumulate_weight_grad(grad_weight: Tensor, g: Tensor, h: Tensor, *, first: bool) -> None:
    """grad_weight (fp32 [V, H]) = (or +=) g.T @ h, in place, with no [V, H] temporary.

    fp32 inputs: one addmm into the accumulator. bf16/fp16 on CUDA: addmm with an fp32
    output (cuBLAS accumulates in fp32 and adds into the accumulator in its epilogue). Where
    that is unavailable, vocabulary slices whose low-precision product is at most 256 MiB
    are added one by one.
    """
    beta = 0.0 if first else 1.0
    if g.dtype == torch.float32:
        torch.addmm(grad_weight, g.T, h, beta=beta, out=grad_weight)
        return
    if g.is_cuda:
        try:
            torch.addmm(grad_weight, g.T, h, beta=beta, out_dtype=torch.float32, out=grad_weight)
            return
        except (TypeError, RuntimeError):  # a torch without addmm(out_dtype=)
            pass
    v, hdim = grad_weight.shape
    step = max(1, _WGRAD_SLICE_BYTES // max(1, hdim * g.element_size()))
    for v0 in range(0, v, step):
        part = g[:, v0:v0 + step].T @ h
        if first:
            grad_weight[v0:v0 + step].copy_(part)
        else:
            grad_weight[v0:v0 + step].add_(part)


def _scale_(grad: Tensor, upstream: Tensor) -> Tensor:
    """grad *= upstream (a scalar); skipped on the device when upstream is exactly 1."""
    if grad.is_cuda:
        from fusellm_kernels.ops.fusion_loss import scale_rows_

        flat = grad.view(-1, grad.shape[-1]) if grad.dim() > 1 else grad.view(1, -1)
        scale_rows_(flat, upstream.reshape(1).float().expand(flat.shape[0]))
        return grad
    # A Python scalar keeps the upstream in fp32 inside a bf16/fp16 multiply (one rounding, as
    # on CUDA); a tensor cast to the gradient's dtype would round it first (bf16: 0.37 -> 0.3691).
    # .item() is free here: the tensor is on the CPU.
    return grad.mul_(upstream.item())


class FusedLinearFusionLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, prep: PreparedLoss, chunk: int):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.prep, ctx.chunk, ctx.need, ctx.spent = prep, chunk, need, False
        if prep.reduction == "none":
            rows, *_ = _run_chunks(hidden, weight, bias, prep, chunk, (False, False, False), None)
            ctx.save_for_backward(hidden, weight, bias)
        else:
            rows, g_hidden, g_weight, g_bias = _run_chunks(hidden, weight, bias, prep, chunk, need, None)
            if g_weight is not None:
                g_weight = g_weight.to(weight.dtype)
            if g_bias is not None:
                g_bias = g_bias.to(bias.dtype)
            ctx.grads = (g_hidden, g_weight, g_bias)
        row_loss, ce_rows, d_rows = rows
        ctx.mark_non_differentiable(ce_rows, d_rows)
        return row_loss, ce_rows, d_rows

    @staticmethod
    def backward(ctx, g_row_loss: Tensor, g_ce, g_d):
        if ctx.spent:
            raise second_backward_error("fused_linear_fusion_loss")
        ctx.spent = True
        if ctx.prep.reduction == "none":
            hidden, weight, bias = ctx.saved_tensors
            _, g_hidden, g_weight, g_bias = _run_chunks(hidden, weight, bias, ctx.prep, ctx.chunk, ctx.need, g_row_loss.float())
            g_weight = None if g_weight is None else g_weight.to(weight.dtype)
            g_bias = None if g_bias is None else g_bias.to(bias.dtype)
        else:
            # mean/sum: every row's upstream gradient is the same scalar (the loss is a sum of rows)
            g_hidden, g_weight, g_bias = ctx.grads
            ctx.grads = None
            if g_row_loss.numel() == 0:
                return g_hidden, g_weight, g_bias, None, None
            up = g_row_loss.reshape(-1)[:1]
            g_hidden, g_weight, g_bias = (None if t is None else _scale_(t, up) for t in (g_hidden, g_weight, g_bias))
        return g_hidden, g_weight, g_bias, None, None


def fused_linear_fusion_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    *,
    bias: Tensor | None = None,
    teacher_ce: Tensor | None = None,
    segment_ids: Tensor | None = None,
    source_weights: Tensor | None = None,
    fusion_mask: Tensor | None = None,
    teacher_lse: Tensor | None = None,
    strategy: Strategy = "min_ce",
    lam: float = 0.9,
    temperature: float = 1.0,
    ce_temperature: float = 1.0,
    divergence: Divergence = "soft_ce",
    teacher_tail: TeacherTail = "renormalize",
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    return_parts: bool = False,
    validate: bool = False,
    backend: Backend = "auto",
    inplace_backward: bool = False,
    chunk_rows: int | None = None,
) -> Tensor | tuple[Tensor, FusionLossParts]:
    """`fusion_loss(hidden @ weight.T + bias, ...)` without materialising the logits.

    hidden [N, H] or [B, T, H] and weight [V, H] (bias [V]) in bf16/fp16/fp32, same dtype;
    every other argument as in `fusion_loss`. Gradients flow to hidden, weight and bias.
    `chunk_rows` overrides the automatic chunk size (see the module docstring);
    `inplace_backward` has no effect: the chunk logits are always overwritten by their gradient.
    """
    if hidden.dim() not in (2, 3):
        raise FusionInputError(f"hidden must be [N, H] or [B, T, H]; got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise FusionInputError(f"weight has shape {tuple(weight.shape)}; expected [V, {hidden.shape[-1]}] (V, hidden size)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise FusionInputError(f"bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise FusionInputError(f"{name} is {t.dtype} on {t.device} but hidden is {hidden.dtype} on {hidden.device}; they must match")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FusionInputError(f"hidden has dtype {hidden.dtype}; use bfloat16, float16 or float32")
    v = weight.shape[0]
    prep = prepare_loss(
        tuple(hidden.shape[:-1]), v, hidden.device, labels, teacher_ids, teacher_logits,
        teacher_ce=teacher_ce, segment_ids=segment_ids, source_weights=source_weights, fusion_mask=fusion_mask,
        strategy=strategy, lam=lam, temperature=temperature, ce_temperature=ce_temperature, divergence=divergence,
        ignore_index=ignore_index, reduction=reduction, validate=validate, backend=backend,
        teacher_lse=teacher_lse, teacher_tail=teacher_tail,
    )
    h = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_rows if chunk_rows is not None else default_chunk_rows(h.shape[0], v, hidden.dtype, hidden.device)
    if chunk < 1:
        raise FusionInputError(f"chunk_rows={chunk_rows} must be at least 1")
    row_loss, ce_rows, d_rows = FusedLinearFusionLossFunction.apply(h, weight, bias, prep, chunk)
    return finish_loss(prep, row_loss, ce_rows, d_rows, return_parts)
