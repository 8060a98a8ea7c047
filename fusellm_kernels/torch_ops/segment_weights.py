"""Candidate weights per row from segment CE scores, in PyTorch (same math as
`ops/segment_weights.py`; see there). Vectorised with no host sync.

Segment sums come from a segmented scan (log2 N doubling steps, each adding a row's partial
sum only to rows of the same segment), never from differences of global prefix sums: those
turn a +inf score into inf − inf = NaN for every later segment, and a huge score (1e17) in
one segment swallows the digits of the segments after it. The order of the additions is
fixed by the shapes, so the result is bit-identical run to run on any device.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _segment_totals(x: Tensor, segment_ids: Tensor, end: Tensor) -> Tensor:
    """x [..., N] → the sum over each row's segment, at every row of the segment."""
    n = x.shape[-1]
    d = 1
    while d < n:
        # after this step row i holds the sum over rows max(start_i, i − 2d + 1) … i
        same = segment_ids[d:] == segment_ids[:-d]
        x = torch.cat([x[..., :d], x[..., d:] + torch.where(same, x[..., :-d], 0.0)], dim=-1)
        d *= 2
    return x[..., end]


def weights_from_scores(mean_ce: Tensor, strategy: str, ce_temperature: float) -> Tensor:
    """w [S, ...] from the segment scores CE_s [S, ...] (float32); the strategies' rules for +inf:
    `min_ce` and `softmin_ce` give a +inf candidate weight 0, and all weights 0 (no fusion
    term) when every candidate scores +inf; `avg_ce` follows softmax(exp(−CE)) (exp(−inf) = 0)."""
    s = mean_ce.shape[0]
    if strategy == "min_ce":
        w = torch.nn.functional.one_hot(torch.argmin(mean_ce, dim=0), s).movedim(-1, 0).float()  # first minimum
        return torch.where(mean_ce.amin(0) < float("inf"), w, 0.0)
    if strategy == "avg_ce":
        return torch.softmax(torch.exp(-mean_ce), dim=0)
    if strategy == "softmin_ce":
        score = -mean_ce / ce_temperature
        top = score.amax(0)
        # all scores −inf: softmax would be 0/0; such a segment has no fusion term
        return torch.where(top > float("-inf"), torch.softmax(torch.where(top > float("-inf"), score, 0.0), dim=0), 0.0)
    raise ValueError(f"unknown strategy {strategy!r}")


def segment_weights_torch(
    teacher_ce: Tensor, labels: Tensor, segment_ids: Tensor, *, strategy: str, ce_temperature: float, ignore_index: int
) -> Tensor:
    """Weights w [S, N] float32; teacher_ce [S, N], labels [N], segment_ids [N] non-decreasing.
    Extra memory: O(S·N) float64 (a few [S, N] buffers live at once)."""
    s, n = teacher_ce.shape
    if n == 0:
        return teacher_ce.new_zeros(s, 0, dtype=torch.float32)
    scored = labels != ignore_index
    ce = torch.where(scored, teacher_ce.double(), 0.0)  # where, not multiply: NaN on ignored rows stays out
    rows = torch.arange(n, device=labels.device)
    is_end = torch.cat([segment_ids[1:] != segment_ids[:-1], scored.new_ones(1)])
    end = torch.cummin(torch.where(is_end, rows, n - 1).flip(0), 0).values.flip(0)
    totals = _segment_totals(torch.cat([ce, scored.double()[None]]), segment_ids, end)  # one scan: S sums, the count
    count = totals[-1]
    mean_ce = (totals[:-1] / count.clamp_min(1)).float()
    return torch.where(count > 0, weights_from_scores(mean_ce, strategy, ce_temperature), 0.0)
