"""Segment CE scores → candidate weights, both backends, against the reference's per-segment loop."""
from __future__ import annotations

import pytest
import torch

from fusellm_kernels.functional import candidate_row_weights
from fusellm_kernels.reference import candidate_weights
from tests.tolerance import assert_close_fp32


def _segments(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)) * 3, torch.tensor(lengths))  # gaps in the ids too


@pytest.mark.parametrize("strategy", ["min_ce", "avg_ce", "softmin_ce"])
@pytest.mark.parametrize("use_triton", [False, True])
def test_segments_longer_than_a_block(strategy, use_triton):
    """Segment lengths straddle the kernel's 32-row blocks: exactly one block, one more, one row."""
    lengths = [32, 33, 1, 64, 7, 2]
    seg = _segments(lengths)
    n, s = len(seg), 3
    g = torch.Generator().manual_seed(0)
    tce = torch.rand(s, n, generator=g) * 4
    labels = torch.randint(0, 10, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    labels[32 + 33] = -100  # the one-row segment is entirely ignored: weights 0
    tce[:, labels == -100] = float("nan")  # scores of ignored rows never count
    tce[2, :32] = tce[0, :32]  # an exact tie in the first segment
    w = candidate_row_weights(tce, labels, seg, None, strategy=strategy, ce_temperature=0.6, ignore_index=-100, use_triton=use_triton)
    ref = candidate_weights(tce, labels, seg, strategy=strategy, ce_temperature=0.6)
    assert w.dtype == torch.float32 and w.shape == (s, n)
    assert_close_fp32(w, ref, what=strategy)
    assert bool((w[:, 65] == 0).all())
    if strategy == "min_ce":
        assert torch.equal(w, ref.float())


def test_triton_and_torch_agree_on_many_random_segmentations():
    g = torch.Generator().manual_seed(1)
    for trial in range(3):
        n = 40
        seg = torch.sort(torch.randint(0, 6, (n,), generator=g)).values
        tce = torch.rand(4, n, generator=g)
        labels = torch.where(torch.rand(n, generator=g) < 0.2, -100, 1)
        a = candidate_row_weights(tce, labels, seg, None, strategy="softmin_ce", ce_temperature=0.3, ignore_index=-100, use_triton=True)
        b = candidate_row_weights(tce, labels, seg, None, strategy="softmin_ce", ce_temperature=0.3, ignore_index=-100, use_triton=False)
        assert_close_fp32(a, b, what=f"trial {trial}")
