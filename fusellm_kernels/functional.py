"""The public functional API of the fusion loss; dispatches to Triton (`ops/`) or PyTorch (`torch_ops/`)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fusellm_kernels.types import Backend, Divergence, FusionLossParts, Reduction, Strategy, TeacherTail
from fusellm_kernels.validation import (
    FusionInputError,
    FusionInputs,
    check_options,
    check_strategy_inputs,
    prepare_fusion_inputs,
)


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise FusionInputError(
            f"backend='triton' on a {device.type} tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before anything imports triton, move the tensors to CUDA, or use backend='torch'"
        )
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise FusionInputError("backend='triton' needs the triton package; install it or use backend='torch'") from err
    return True


def candidate_row_weights(
    teacher_ce: Tensor | None,
    labels: Tensor,
    segment_ids: Tensor,
    source_weights: Tensor | None,
    *,
    strategy: str,
    ce_temperature: float,
    ignore_index: int,
    use_triton: bool,
) -> Tensor:
    """Candidate weights per row [S, N] float32 for a strategy (see `fusion_loss`)."""
    if strategy == "weights":
        assert source_weights is not None
        return source_weights.float()
    assert teacher_ce is not None
    if use_triton:
        from fusellm_kernels.ops.segment_weights import segment_weights_op

        return segment_weights_op(teacher_ce, labels, segment_ids, strategy, float(ce_temperature), int(ignore_index))
    from fusellm_kernels.torch_ops.segment_weights import segment_weights_torch

    return segment_weights_torch(teacher_ce, labels, segment_ids, strategy=strategy, ce_temperature=ce_temperature, ignore_index=ignore_index)


def fusion_parts(
    weights: Tensor, teacher_ids: Tensor, vocab_size: int, fusion_rows: Tensor
) -> tuple[Tensor, Tensor]:
    """wins [S] int64 and weight_sums [S] float32 over `fusion_rows` [N] (rows whose fusion term exists)."""
    has_s = ((teacher_ids >= 0) & (teacher_ids < vocab_size)).any(-1)
    w = torch.where(has_s, weights, 0.0)
    total = w.sum(0)
    norm = torch.where(fusion_rows & (total > 0), w / torch.where(total > 0, total, 1.0), 0.0)
    winner = torch.nn.functional.one_hot(torch.argmax(norm, dim=0), w.shape[0]).T  # ties to the lowest s
    wins = (winner * (fusion_rows & (total > 0))).sum(1)
    return wins, norm.sum(1)


def fusion_loss(
    logits: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    *,
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
) -> Tensor | tuple[Tensor, FusionLossParts]:
    """λ·CE + (1 − λ)·divergence to the CE-weighted fusion of sparse teacher distributions.

    Args:
        logits: [N, V] or [B, T, V] bf16/fp16/fp32 student logits; row n predicts labels[n].
        labels: [N] or [B, T] int next-token targets; `ignore_index` marks rows without one.
            A label outside [0, V) makes its row's loss and gradient NaN (`validate` names it).
        teacher_ids: [S, N, K] (or [S, B, T, K]) int target-vocabulary ids of each candidate's
            top-k; a negative id marks an empty slot; the first slot holding an id wins.
        teacher_logits: [S, N, K] float raw teacher logits (ignored at empty slots).
        teacher_ce: [S, N] per-row CE scores of the candidates (`min_ce`, `avg_ce`, `softmin_ce`);
            +inf is allowed (`min_ce` and `softmin_ce` give it weight 0), NaN and −inf are not.
        segment_ids: [N] non-decreasing; rows with equal ids share one weighting decision.
            Default: one segment per sequence for [B, T, V] input, one for [N, V].
        source_weights: [S, N] non-negative weights per row (`strategy="weights"`).
        fusion_mask: [N] bool, rows counted by the fusion term (default: labels ≠ ignore_index).
        teacher_lse: [S, N] float, each candidate's full-vocabulary log-sum-exp of the row's
            logits (`teacher_tail="bucket"` only); NaN marks a row without one (renormalised).
        strategy: `min_ce` | `avg_ce` (softmax of exp(−CE), the original) | `softmin_ce`
            (softmax of −CE / ce_temperature) | `weights`.
        lam: weight of the CE term; the fusion term gets 1 − lam.
        temperature: teacher temperature (teacher only, no T² factor).
        divergence: `soft_ce` (−Σ P log q, the original) or `kl` (Σ P (log P − log q)).
        teacher_tail: `renormalize` (each candidate renormalised over its ≤ K entries, the
            original) or `bucket` (the mass outside them, 1 − Σ exp(x − lse), kept as one
            bucket against the student's mass outside them; needs teacher_lse and temperature 1;
            duplicate ids of a candidate are summed). See the README, "The top-k tail".
        reduction: `mean` (each term over the rows its mask admits), `sum`, `none` ([N] or [B, T]).
        return_parts: also return `FusionLossParts` (device tensors, no host sync).
        validate: inspect values too (ids/labels in range, finite teachers, ...); syncs.
        backend: `auto` (Triton on CUDA, PyTorch otherwise), `triton`, `torch`.
        inplace_backward: Triton only, eager only: write the gradient over `logits` during the
            forward, saving an [N, V] buffer; `logits` must not be used afterwards.

    The gradient flows to `logits` only.
    """
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FusionInputError(f"logits have dtype {logits.dtype}; use bfloat16, float16 or float32")
    prep = prepare_loss(
        tuple(logits.shape[:-1]), logits.shape[-1], logits.device, labels, teacher_ids, teacher_logits,
        teacher_ce=teacher_ce, segment_ids=segment_ids, source_weights=source_weights, fusion_mask=fusion_mask,
        strategy=strategy, lam=lam, temperature=temperature, ce_temperature=ce_temperature, divergence=divergence,
        ignore_index=ignore_index, reduction=reduction, validate=validate, backend=backend,
        teacher_lse=teacher_lse, teacher_tail=teacher_tail,
    )
    if inplace_backward and not prep.use_triton:
        raise FusionInputError("inplace_backward=True needs the Triton backend (CUDA tensors or backend='triton')")
    z = logits.reshape(-1, prep.inputs.vocab_size)
    if z.numel() and z.stride(1) != 1:
        z = z.contiguous()  # the kernels stream rows; a strided vocabulary axis is copied once
    inp = prep.inputs
    if prep.use_triton:
        from fusellm_kernels.ops import fusion_loss as triton_ops

        fmask = inp.fusion_mask.to(torch.uint8)
        if inplace_backward:
            row_loss, ce_rows, d_rows = triton_ops.InplaceFusionLossFunction.apply(
                z, inp.labels, inp.teacher_ids, inp.teacher_logits, prep.weights, fmask, prep.ce_coef, prep.f_coef,
                prep.temperature, prep.kl, prep.ignore_index, inp.teacher_lse,
            )
        else:
            compute_grad = torch.is_grad_enabled() and z.requires_grad
            row_loss, ce_rows, d_rows, *_ = triton_ops.fusion_loss_fwd_op(
                z, inp.labels, inp.teacher_ids, inp.teacher_logits, prep.weights, fmask, prep.ce_coef, prep.f_coef,
                prep.temperature, prep.kl, prep.ignore_index, compute_grad, inp.teacher_lse,
            )
    else:
        from fusellm_kernels.torch_ops.fusion_loss import fusion_loss_torch

        row_loss, ce_rows, d_rows = fusion_loss_torch(
            z, inp.labels, inp.teacher_ids, inp.teacher_logits, prep.weights, inp.fusion_mask, prep.ce_coef, prep.f_coef,
            temperature=prep.temperature, kl=prep.kl, ignore_index=prep.ignore_index, teacher_lse=inp.teacher_lse,
        )
    return finish_loss(prep, row_loss, ce_rows, d_rows, return_parts)


@dataclass(frozen=True)
class PreparedLoss:
    """Everything a loss needs besides the student logits, computed once per call.

    weights [S, N] float32: the candidates' weights per row (strategy applied).
    ce_coef, f_coef: float32 device scalars folding λ, 1 − λ and the mean's counts, so the
        kernels' row loss a·CE_n + b·D_n sums to the reduced loss with no host sync.
    """

    inputs: FusionInputs
    weights: Tensor
    n_ce: Tensor
    n_fusion: Tensor
    ce_coef: Tensor
    f_coef: Tensor
    temperature: float
    kl: bool
    ignore_index: int
    reduction: str
    use_triton: bool


def prepare_loss(
    row_shape: tuple[int, ...],
    vocab_size: int,
    device: torch.device,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    *,
    teacher_ce: Tensor | None,
    segment_ids: Tensor | None,
    source_weights: Tensor | None,
    fusion_mask: Tensor | None,
    strategy: str,
    lam: float,
    temperature: float,
    ce_temperature: float,
    divergence: str,
    ignore_index: int,
    reduction: str,
    validate: bool,
    backend: str,
    teacher_lse: Tensor | None = None,
    teacher_tail: str = "renormalize",
) -> PreparedLoss:
    """Check the inputs (the shared validator) and compute the per-row weights and coefficients."""
    check_options(
        strategy=strategy, divergence=divergence, reduction=reduction, backend=backend, lam=lam,
        temperature=temperature, ce_temperature=ce_temperature, teacher_tail=teacher_tail,
    )
    check_strategy_inputs(strategy, teacher_ce, source_weights)
    inp = prepare_fusion_inputs(
        row_shape, vocab_size, device, labels, teacher_ids, teacher_logits,
        teacher_ce=teacher_ce, segment_ids=segment_ids, source_weights=source_weights, fusion_mask=fusion_mask,
        ignore_index=ignore_index, validate=validate, teacher_lse=teacher_lse, teacher_tail=teacher_tail,
    )
    use_triton = _use_triton(backend, device)
    weights = candidate_row_weights(
        inp.teacher_ce, inp.labels, inp.segment_ids, inp.source_weights, strategy=strategy,
        ce_temperature=ce_temperature, ignore_index=ignore_index, use_triton=use_triton,
    )
    n_ce = (inp.labels != ignore_index).sum()
    n_fusion = inp.fusion_mask.sum()
    if reduction == "mean":
        ce_coef = lam / n_ce.clamp_min(1).float()
        f_coef = (1.0 - lam) / n_fusion.clamp_min(1).float()
    else:
        ce_coef = torch.full((), lam, dtype=torch.float32, device=device)
        f_coef = torch.full((), 1.0 - lam, dtype=torch.float32, device=device)
    return PreparedLoss(
        inp, weights, n_ce, n_fusion, ce_coef, f_coef, float(temperature), divergence == "kl", int(ignore_index), reduction, use_triton
    )


def finish_loss(
    prep: PreparedLoss, row_loss: Tensor, ce_rows: Tensor, d_rows: Tensor, return_parts: bool
) -> Tensor | tuple[Tensor, FusionLossParts]:
    """Reduce the row losses [N] (already weighted by the coefficients) and build the parts."""
    row_shape = prep.inputs.batch_shape
    if prep.reduction == "none":
        loss = row_loss.reshape(row_shape)
        ce_part, fusion_part = ce_rows.detach().reshape(row_shape), d_rows.detach().reshape(row_shape)
    else:
        loss = row_loss.sum()
        ce_part, fusion_part = ce_rows.detach().sum(), d_rows.detach().sum()
        if prep.reduction == "mean":
            ce_part = ce_part / prep.n_ce.clamp_min(1)
            fusion_part = fusion_part / prep.n_fusion.clamp_min(1)
    if not return_parts:
        return loss
    inp = prep.inputs
    wins, weight_sums = fusion_parts(prep.weights, inp.teacher_ids, inp.vocab_size, inp.fusion_mask)
    return loss, FusionLossParts(ce_part, fusion_part, prep.n_ce, prep.n_fusion, wins, weight_sums)


def gather_teacher_rows(
    topk_ids: Sequence[Tensor],
    topk_logits: Sequence[Tensor],
    source_rows: Tensor,
    fallback_id: Tensor,
    vocab_maps: Sequence[Tensor | None],
    *,
    k: int | None = None,
    logits_dtype: torch.dtype = torch.float32,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Build the loss's teacher_ids / teacher_logits for the rows of a batch.

    For each candidate s: topk_ids[s] [R_s, k_s] (source vocabulary ids) and topk_logits[s]
    [R_s, k_s], the stored rows of the documents in the batch; vocab_maps[s] [V_src] int32
    source → target id (−1 unmapped), or None for a candidate already in the target
    vocabulary (the target model itself). source_rows [S, N] int64: the table row whose top-k
    target row n takes, or −1; fallback_id [S, N] int32: the one-hot fallback's target id for
    rows with source_rows = −1 (−1: no teacher at that row).
    Returns teacher_ids int32 [S, N, K] and teacher_logits `logits_dtype` [S, N, K] with
    K = k or max_s k_s; unmapped ids, missing slots and empty rows hold −1.
    """
    s_count, n = source_rows.shape
    if not (len(topk_ids) == len(topk_logits) == len(vocab_maps) == s_count):
        raise FusionInputError(
            f"{len(topk_ids)} top-k id tables, {len(topk_logits)} logit tables and {len(vocab_maps)} vocab maps "
            f"for source_rows of {s_count} candidates; give one of each per candidate"
        )
    if tuple(fallback_id.shape) != (s_count, n):
        raise FusionInputError(f"fallback_id has shape {tuple(fallback_id.shape)}; expected {(s_count, n)}")
    k_out = k if k is not None else max(t.shape[1] for t in topk_ids)
    device = source_rows.device
    ids = torch.empty(s_count, n, k_out, dtype=torch.int32, device=device)
    logits = torch.empty(s_count, n, k_out, dtype=logits_dtype, device=device)
    if _use_triton(backend, device):
        from fusellm_kernels.ops.teacher_gather import teacher_gather_triton as gather
    else:
        from fusellm_kernels.torch_ops.teacher_gather import teacher_gather_torch as gather
    for s in range(s_count):
        if topk_ids[s].shape != topk_logits[s].shape:
            raise FusionInputError(f"candidate {s}: topk_ids {tuple(topk_ids[s].shape)} and topk_logits {tuple(topk_logits[s].shape)} differ")
        gather(topk_ids[s], topk_logits[s], source_rows[s], fallback_id[s], vocab_maps[s], ids[s], logits[s])
    return ids, logits
