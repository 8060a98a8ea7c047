"""Candidate weights per row from segment CE scores, in PyTorch (same math as
`ops/segment_weights.py`; see there). Vectorised with no host sync: segment sums come from
float64 prefix sums read at each row's segment start and end."""
from __future__ import annotations

import torch
from torch import Tensor


def segment_weights_torch(
    teacher_ce: Tensor, labels: Tensor, segment_ids: Tensor, *, strategy: str, ce_temperature: float, ignore_index: int
) -> Tensor:
    """Weights w [S, N] float32; teacher_ce [S, N], labels [N], segment_ids [N] non-decreasing."""
    s, n = teacher_ce.shape
    if n == 0:
        return teacher_ce.new_zeros(s, 0, dtype=torch.float32)
    scored = labels != ignore_index
    ce = torch.where(scored, teacher_ce.double(), 0.0)
    rows = torch.arange(n, device=labels.device)
    boundary = segment_ids[1:] != segment_ids[:-1]
    is_start = torch.cat([boundary.new_ones(1), boundary])
    is_end = torch.cat([boundary, boundary.new_ones(1)])
    start = torch.cummax(torch.where(is_start, rows, 0), 0).values
    end = torch.cummin(torch.where(is_end, rows, n - 1).flip(0), 0).values.flip(0)

    def segment_sum(x: Tensor) -> Tensor:  # x [..., N] → the sum over each row's segment
        prefix = torch.cumsum(x, dim=-1)
        return prefix[..., end] - prefix[..., start] + x[..., start]

    count = segment_sum(scored.double())
    mean_ce = (segment_sum(ce) / count.clamp_min(1)).float()
    if strategy == "min_ce":
        w = torch.nn.functional.one_hot(torch.argmin(mean_ce, dim=0), s).T.float()  # first minimum
    elif strategy == "avg_ce":
        w = torch.softmax(torch.exp(-mean_ce), dim=0)
    elif strategy == "softmin_ce":
        w = torch.softmax(-mean_ce / ce_temperature, dim=0)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return torch.where(count > 0, w, 0.0)
