"""The one input validator of every loss in the library.

`prepare_fusion_inputs` always runs the checks that need no look at the data (shapes, dtypes,
devices, options, temperature > 0) and flattens [B, T, ...] inputs to rows. With
`validate=True` it also inspects values (ids and labels in range, non-decreasing segments,
finite teacher values, ...); those checks synchronise with the device, so they are opt-in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fusellm_kernels.types import BACKENDS, DIVERGENCES, REDUCTIONS, STRATEGIES, TEACHER_TAILS


class FusionInputError(ValueError):
    """A bad input to a fusion loss; the message says what is wrong and what to change."""


@dataclass(frozen=True)
class FusionInputs:
    """Loss inputs flattened to rows.

    logits: [N, V] or None (fused-linear losses pass hidden/weight instead).
    labels: [N] int64.  teacher_ids, teacher_logits: [S, N, K].
    teacher_ce: [S, N] or None.  segment_ids: [N] int64 (defaults filled in).
    source_weights: [S, N] or None.  fusion_mask: [N] bool (defaults filled in).
    teacher_lse: [S, N] float32 or None (read by `teacher_tail="bucket"` only).
    batch_shape: the leading shape of the input rows, (N,) or (B, T), for `reduction="none"`.
    """

    labels: Tensor
    teacher_ids: Tensor
    teacher_logits: Tensor
    teacher_ce: Tensor | None
    segment_ids: Tensor
    source_weights: Tensor | None
    fusion_mask: Tensor
    batch_shape: tuple[int, ...]
    vocab_size: int
    teacher_lse: Tensor | None = None


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _fail(msg: str) -> None:
    raise FusionInputError(msg)


def second_backward_error(loss: str) -> RuntimeError:
    """The one error of every loss backend for a second backward through the same forward
    (`retain_graph=True`): the gradient is made (and on the Triton paths finished in place)
    once, so a second pass would return a spent or doubled gradient."""
    return RuntimeError(
        f"{loss}: the backward can run only once per forward; recompute the loss instead of "
        "calling backward again with retain_graph=True"
    )


def _rows(name: str, x: Tensor, batch_shape: tuple[int, ...], n: int, device: torch.device) -> Tensor:
    if tuple(x.shape) not in (batch_shape, (n,)):
        _fail(f"{name} has shape {tuple(x.shape)}; expected {batch_shape} (one value per logits row)")
    if x.device != device:
        _fail(f"{name} is on {x.device} but logits are on {device}; move it to the same device")
    return x.reshape(n)


def _per_candidate(name: str, x: Tensor, s: int, batch_shape: tuple[int, ...], n: int, device: torch.device) -> Tensor:
    if tuple(x.shape) not in ((s, *batch_shape), (s, n)):
        _fail(f"{name} has shape {tuple(x.shape)}; expected {(s, *batch_shape)} ([S, rows], S = teacher_ids.shape[0])")
    if x.device != device:
        _fail(f"{name} is on {x.device} but logits are on {device}; move it to the same device")
    if x.dtype not in _FLOATS:
        _fail(f"{name} has dtype {x.dtype}; use a floating dtype")
    return x.reshape(s, n)


def check_options(
    *,
    strategy: str,
    divergence: str,
    reduction: str,
    backend: str,
    lam: float,
    temperature: float,
    ce_temperature: float,
    teacher_tail: str = "renormalize",
) -> None:
    """Options that need no tensor; every loss and module constructor runs these."""
    if strategy not in STRATEGIES:
        _fail(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if divergence not in DIVERGENCES:
        _fail(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if reduction not in REDUCTIONS:
        _fail(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    if backend not in BACKENDS:
        _fail(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if not 0.0 <= float(lam) <= 1.0:
        _fail(f"lam={lam} is outside [0, 1]; it weighs CE (lam) against the fusion term (1 - lam)")
    if not float(temperature) > 0.0:
        _fail(f"temperature={temperature} must be > 0")
    if not float(ce_temperature) > 0.0:
        _fail(f"ce_temperature={ce_temperature} must be > 0")
    if teacher_tail not in TEACHER_TAILS:
        _fail(f"unknown teacher_tail {teacher_tail!r}; choose one of {TEACHER_TAILS}")
    if teacher_tail == "bucket" and float(temperature) != 1.0:
        _fail(f"teacher_tail='bucket' needs temperature=1 (got {temperature}): the stored log-sum-exp is that of "
              "the teacher's logits at T = 1; use teacher_tail='renormalize' to sharpen or soften the teacher")


def check_strategy_inputs(strategy: str, teacher_ce: Tensor | None, source_weights: Tensor | None) -> None:
    if strategy in ("min_ce", "avg_ce", "softmin_ce") and teacher_ce is None:
        _fail(f"strategy={strategy!r} needs teacher_ce [S, rows]; pass it, or use strategy='weights' with source_weights")
    if strategy == "weights" and source_weights is None:
        _fail("strategy='weights' needs source_weights [S, rows]")


def prepare_fusion_inputs(
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
    ignore_index: int,
    validate: bool,
    teacher_lse: Tensor | None = None,
    teacher_tail: str = "renormalize",
) -> FusionInputs:
    """Check and flatten the inputs of a loss whose rows have shape `row_shape` ((N,) or (B, T))."""
    if len(row_shape) not in (1, 2):
        _fail(f"logits must be [N, V] or [B, T, V]; got {len(row_shape) + 1} dimensions")
    if vocab_size < 1:
        _fail(f"the vocabulary is empty (V = {vocab_size}); logits need at least one column (lm_head weight at least one row)")
    n = 1
    for d in row_shape:
        n *= d
    if labels.dtype not in _INTS:
        _fail(f"labels have dtype {labels.dtype}; use an integer dtype (int64)")
    labels = _rows("labels", labels, row_shape, n, device)
    if teacher_ids.dim() not in (3, len(row_shape) + 2):
        _fail(f"teacher_ids has shape {tuple(teacher_ids.shape)}; expected [S, {', '.join(map(str, row_shape))}, K]")
    s, k = teacher_ids.shape[0], teacher_ids.shape[-1]
    if tuple(teacher_ids.shape) not in ((s, *row_shape, k), (s, n, k)):
        _fail(f"teacher_ids has shape {tuple(teacher_ids.shape)}; expected {(s, *row_shape, k)} ([S, rows, K])")
    if s < 1 or k < 1:
        _fail(f"teacher_ids has shape {tuple(teacher_ids.shape)}; S and K must be at least 1")
    if teacher_ids.dtype not in _INTS:
        _fail(f"teacher_ids have dtype {teacher_ids.dtype}; use int32 or int64")
    if tuple(teacher_logits.shape) != tuple(teacher_ids.shape):
        _fail(f"teacher_logits has shape {tuple(teacher_logits.shape)} but teacher_ids has {tuple(teacher_ids.shape)}; they must match")
    if teacher_logits.dtype not in _FLOATS:
        _fail(f"teacher_logits have dtype {teacher_logits.dtype}; use a floating dtype")
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logits", teacher_logits)):
        if x.device != device:
            _fail(f"{name} is on {x.device} but logits are on {device}; move it to the same device")
    ids = teacher_ids.reshape(s, n, k)
    tlog = teacher_logits.reshape(s, n, k)
    tce = None if teacher_ce is None else _per_candidate("teacher_ce", teacher_ce, s, row_shape, n, device)
    sw = None if source_weights is None else _per_candidate("source_weights", source_weights, s, row_shape, n, device)
    if teacher_tail == "bucket" and teacher_lse is None:
        _fail("teacher_tail='bucket' needs teacher_lse [S, rows], each candidate's full-vocabulary log-sum-exp "
              "(`fusellm teacher --store-lse` stores it); pass it, or use teacher_tail='renormalize'")
    if teacher_tail != "bucket" and teacher_lse is not None:
        _fail("teacher_lse is given but teacher_tail='renormalize' ignores it; pass teacher_tail='bucket' to use it, or drop it")
    tlse = None if teacher_lse is None else _per_candidate("teacher_lse", teacher_lse, s, row_shape, n, device).float().contiguous()

    if segment_ids is None:
        seg = torch.zeros(n, dtype=torch.int64, device=device)
        if len(row_shape) == 2:
            seg = torch.arange(row_shape[0], device=device).repeat_interleave(row_shape[1])
    else:
        if segment_ids.dtype not in _INTS:
            _fail(f"segment_ids have dtype {segment_ids.dtype}; use an integer dtype")
        seg = _rows("segment_ids", segment_ids, row_shape, n, device).long()
    if fusion_mask is None:
        fmask = labels != ignore_index
    else:
        fmask = _rows("fusion_mask", fusion_mask, row_shape, n, device).bool()

    if validate:
        _check_values(labels, ids, tlog, tce, seg, sw, vocab_size, ignore_index)
        if tlse is not None:
            _check_lse(ids, tlog, tlse, vocab_size)
    return FusionInputs(labels.long(), ids, tlog, tce, seg, sw, fmask, tuple(row_shape), vocab_size, tlse)


def _check_values(
    labels: Tensor, ids: Tensor, tlog: Tensor, tce: Tensor | None, seg: Tensor, sw: Tensor | None, v: int, ignore_index: int
) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        _fail(f"labels[{row}] = {int(labels[row])} is outside [0, {v}) and is not ignore_index={ignore_index}")
    if bool((ids >= v).any()):
        s, row, slot = (int(i) for i in (ids >= v).nonzero()[0])
        _fail(f"teacher_ids[{s}, {row}, {slot}] = {int(ids[s, row, slot])} >= vocabulary size {v}; map ids to the target vocabulary, or mark the slot empty with -1")
    filled = ids >= 0
    if bool((filled & ~torch.isfinite(tlog)).any()):
        s, row, slot = (int(i) for i in (filled & ~torch.isfinite(tlog)).nonzero()[0])
        _fail(f"teacher_logits[{s}, {row}, {slot}] is {float(tlog[s, row, slot])} in a filled slot; teacher logits must be finite")
    if seg.numel() > 1 and bool((seg[1:] < seg[:-1]).any()):
        row = int((seg[1:] < seg[:-1]).nonzero()[0, 0]) + 1
        _fail(f"segment_ids must be non-decreasing: segment_ids[{row}] = {int(seg[row])} < segment_ids[{row - 1}] = {int(seg[row - 1])}")
    scored = labels != ignore_index
    # +inf is a legal score (each strategy's formula decides its weight); NaN and -inf have no meaning
    bad_ce = None if tce is None else (torch.isnan(tce) | (tce == float("-inf"))) & scored
    if bad_ce is not None and bool(bad_ce.any()):
        s, row = (int(i) for i in bad_ce.nonzero()[0])
        value = "NaN" if bool(torch.isnan(tce[s, row])) else "-inf"
        _fail(f"teacher_ce[{s}, {row}] is {value}; CE scores must be numbers or +inf (mask the row with ignore_index instead)")
    if sw is not None and bool((~torch.isfinite(sw) | (sw < 0)).any()):
        s, row = (int(i) for i in (~torch.isfinite(sw) | (sw < 0)).nonzero()[0])
        _fail(f"source_weights[{s}, {row}] = {float(sw[s, row])}; weights must be finite and >= 0")


def _check_lse(ids: Tensor, tlog: Tensor, lse: Tensor, v: int) -> None:
    """A stored lse is the log-sum-exp of the whole row, so it is at least the row's largest
    logit; 16-bit stored logits may round up by half an ulp (2^-8 relative, bf16), hence the slack."""
    if bool(torch.isinf(lse).any()):
        s, row = (int(i) for i in torch.isinf(lse).nonzero()[0])
        _fail(f"teacher_lse[{s}, {row}] is {float(lse[s, row])}; it must be finite (NaN marks a row without one)")
    valid = (ids >= 0) & (ids < v)
    top = torch.where(valid, tlog.float(), float("-inf")).amax(-1)
    low = (valid.any(-1) & ~torch.isnan(lse)) & (lse < top - top.abs() * 2.0 ** -8 - 1e-6)
    if bool(low.any()):
        s, row = (int(i) for i in low.nonzero()[0])
        _fail(f"teacher_lse[{s}, {row}] = {float(lse[s, row]):.6g} is below that row's largest stored logit "
              f"{float(top[s, row]):.6g}; a log-sum-exp over the full vocabulary cannot be: the lse and the "
              "logits come from different rows, models or temperatures")
