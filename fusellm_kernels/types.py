"""Small typed containers that travel between the loss's layers and out to users."""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Strategy = Literal["min_ce", "avg_ce", "softmin_ce", "weights"]
Divergence = Literal["soft_ce", "kl"]
Reduction = Literal["mean", "sum", "none"]
Backend = Literal["auto", "triton", "torch"]
TeacherTail = Literal["renormalize", "bucket"]

STRATEGIES: tuple[str, ...] = ("min_ce", "avg_ce", "softmin_ce", "weights")
DIVERGENCES: tuple[str, ...] = ("soft_ce", "kl")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
TEACHER_TAILS: tuple[str, ...] = ("renormalize", "bucket")


class FusionLossParts(NamedTuple):
    """What `fusion_loss(..., return_parts=True)` returns beside the loss, all device tensors.

    ce, fusion: the two terms before λ-weighting, reduced like the loss (`mean`: ΣCE_n / n_ce
        and ΣD_n / n_fusion; `sum`: the sums; `none`: per row [N], zero where a mask excludes
        the row). loss = λ·ce + (1 − λ)·fusion in every reduction.
    n_ce, n_fusion: int64 scalars, the rows each term counts.
    wins: int64 [S], on how many fusion rows candidate s held the largest weight of the fused
        teacher (ties to the lowest s).
    weight_sums: float32 [S], the sum over fusion rows of candidate s's normalised weight.
    Rows counted for wins/weight_sums are those whose fusion term exists (mask true and at
    least one candidate with a distribution and positive weight).
    """

    ce: torch.Tensor
    fusion: torch.Tensor
    n_ce: torch.Tensor
    n_fusion: torch.Tensor
    wins: torch.Tensor
    weight_sums: torch.Tensor
