"""Candidate weights per row from segment CE scores: Triton kernel → launcher → custom op.

Math (g a segment of rows with equal segment id, m_n = [label_n ≠ ignore_index]):
    CE_s(g) = Σ_{n∈g} m_n · teacher_ce[s, n] / Σ_{n∈g} m_n
    min_ce:      w_s(g) = 1 for the first s with the lowest CE_s(g), else 0
    avg_ce:      w_s(g) = softmax_s(exp(−CE_s(g)))          (the original's formula)
    softmin_ce:  w_s(g) = softmax_s(−CE_s(g) / ce_temperature)
A segment with no labelled row gets w = 0 (no fusion term). Every row of g receives w(g).
A +inf score gets weight 0 under min_ce and softmin_ce, and when every candidate scores +inf
both give w = 0 (no fusion term); avg_ce follows its formula (exp(−inf) = 0, a weight > 0).
No gradient: the weights are a function of the teachers' scores only.

One program owns one segment: the program whose row starts a segment walks it block by block
(sums in a fixed order, so the result is bit-identical run to run), then writes the weights
to every row of the segment. Programs whose row does not start a segment exit at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusellm_kernels.ops.launch_config import device_spec, segment_weights_launch

STRATEGY_CODES = {"min_ce": 0, "avg_ce": 1, "softmin_ce": 2}


@triton.jit
def _segment_weights_kernel(
    ce_ptr, labels_ptr, seg_ptr, w_ptr,
    stride_cs, stride_cn, stride_ws, stride_wn,
    N, S,
    ignore_index, inv_ce_temperature,
    STRATEGY: tl.constexpr, S_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    my_seg = tl.load(seg_ptr + row)
    prev_seg = tl.load(seg_ptr + tl.maximum(row - 1, 0))
    if (row == 0) | (prev_seg != my_seg):
        s_idx = tl.arange(0, S_P)
        s_ok = s_idx < S
        r_off = tl.arange(0, BLOCK_R)
        total = tl.zeros([S_P], dtype=tl.float32)
        count = tl.zeros([BLOCK_R], dtype=tl.float32)
        start = row
        more = 1
        # Segments are contiguous runs (segment ids are non-decreasing), so the walk stops
        # at the first block that contains a row of another segment or runs off the end.
        while more > 0:
            rows = start + r_off
            in_seg = (rows < N) & (tl.load(seg_ptr + rows, mask=rows < N, other=0) == my_seg)
            lab = tl.load(labels_ptr + rows, mask=in_seg, other=ignore_index)
            scored = in_seg & (lab != ignore_index)
            ce = tl.load(ce_ptr + s_idx[:, None] * stride_cs + rows[None, :] * stride_cn,
                         mask=s_ok[:, None] & scored[None, :], other=0.0).to(tl.float32)
            # where, not multiply: a NaN score on an ignored row must not leak into the sum
            total += tl.sum(tl.where(scored[None, :], ce, 0.0), axis=1)
            count += scored.to(tl.float32)
            more = (tl.sum(in_seg.to(tl.int32), axis=0) == BLOCK_R).to(tl.int32)
            start += BLOCK_R
        n_scored = tl.sum(count, axis=0)
        mean_ce = total / tl.maximum(n_scored, 1.0)
        if STRATEGY == 0:
            best = tl.min(tl.where(s_ok, mean_ce, float("inf")), axis=0)
            first = tl.min(tl.where(s_ok & (mean_ce == best), s_idx, S_P), axis=0)
            w = (s_idx == first).to(tl.float32)
            w = tl.where(best < float("inf"), w, 0.0)  # every candidate +inf: nothing to pick
        else:
            if STRATEGY == 1:
                score = tl.exp(-mean_ce)
            else:
                score = -mean_ce * inv_ce_temperature
            score = tl.where(s_ok, score, float("-inf"))
            top = tl.max(score, axis=0)
            # every candidate +inf (softmin): all e are 0 and so is w, the segment has no fusion term
            e = tl.exp(score - tl.where(top > float("-inf"), top, 0.0))
            total = tl.sum(e, axis=0)
            w = e / tl.where(total > 0, total, 1.0)
        w = tl.where(s_ok, w, 0.0)
        w = tl.where(n_scored > 0, w, 0.0)
        start = row
        more = 1
        while more > 0:
            rows = start + r_off
            in_seg = (rows < N) & (tl.load(seg_ptr + rows, mask=rows < N, other=0) == my_seg)
            tl.store(w_ptr + s_idx[:, None] * stride_ws + rows[None, :] * stride_wn,
                     w[:, None] + tl.zeros([S_P, BLOCK_R], dtype=tl.float32),
                     mask=s_ok[:, None] & in_seg[None, :])
            more = (tl.sum(in_seg.to(tl.int32), axis=0) == BLOCK_R).to(tl.int32)
            start += BLOCK_R


def segment_weights_triton(
    teacher_ce: Tensor, labels: Tensor, segment_ids: Tensor, *, strategy: str, ce_temperature: float, ignore_index: int
) -> Tensor:
    """Weights w [S, N] float32 for the `min_ce`, `avg_ce` and `softmin_ce` strategies.

    teacher_ce [S, N] any float dtype and strides; labels [N] int; segment_ids [N] int,
    non-decreasing. Extra memory: the output only (4·S·N bytes).
    """
    s, n = teacher_ce.shape
    w = torch.empty(s, n, dtype=torch.float32, device=teacher_ce.device)
    if n == 0:
        return w
    cfg = segment_weights_launch(n, device_spec(teacher_ce.device))
    _segment_weights_kernel[(cfg.grid,)](
        teacher_ce, labels, segment_ids, w,
        teacher_ce.stride(0), teacher_ce.stride(1), w.stride(0), w.stride(1),
        n, s,
        ignore_index, 1.0 / ce_temperature,
        STRATEGY=STRATEGY_CODES[strategy], S_P=triton.next_power_of_2(s), BLOCK_R=cfg.block,
        num_warps=cfg.num_warps, maxnreg=cfg.maxnreg,
    )
    return w


@torch.library.custom_op("fusellm::segment_weights", mutates_args=())
def segment_weights_op(
    teacher_ce: Tensor, labels: Tensor, segment_ids: Tensor, strategy: str, ce_temperature: float, ignore_index: int
) -> Tensor:
    return segment_weights_triton(
        teacher_ce, labels, segment_ids, strategy=strategy, ce_temperature=ce_temperature, ignore_index=ignore_index
    )


@segment_weights_op.register_fake
def _(teacher_ce: Tensor, labels: Tensor, segment_ids: Tensor, strategy: str, ce_temperature: float, ignore_index: int) -> Tensor:
    return teacher_ce.new_empty(teacher_ce.shape, dtype=torch.float32)
