"""Edge rules of the loss API on both backends (the README's contract): CE scores that are not
finite, no rows, no vocabulary, labels out of range, and a second backward.

Values are checked against the float64 reference (`fusellm_kernels.reference`) or a closed form.
"""
from __future__ import annotations

import pytest
import torch

from fusellm_kernels import FusionInputError, fused_linear_fusion_loss, fusion_loss
from fusellm_kernels.functional import candidate_row_weights
from fusellm_kernels.reference import candidate_weights, fusion_loss_reference
from tests.test_fusion_loss import make_case
from tests.tolerance import assert_close_fp32

BACKENDS = ["torch", "triton"]
INF = float("inf")


def _tensors(case):
    return {k: v for k, v in case.items() if k != "logits"}


# ---- point 7: CE scores that are not finite ----

def _scores_with_inf(seed: int):
    """Six segments over 40 rows, 3 candidates; planted: a +inf score on one row of an early
    segment (the sum of every later segment must not see it), a segment where every candidate
    scores +inf, a +inf on an ignored row (never counted), and a 1e17 score before small ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 9, 3, 33, 6, 4])
    seg = torch.repeat_interleave(torch.arange(6) * 2, lengths)
    n = len(seg)
    tce = torch.rand(3, n, generator=g) * 3
    labels = torch.randint(0, 9, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    labels[[0, 5, 14, 17, 50]] = 1  # the rows planted below are scored
    tce[1, 0] = INF  # candidate 1 is +inf on segment 0
    tce[:, 5] = INF  # segment 1: every candidate +inf
    tce[0, 14:17] = INF  # segment 2: candidate 0 +inf, 1 and 2 finite
    tce[2, 17] = 1e17  # segment 3: a huge finite score (softmin gives it 0, the others must keep their digits)
    labels[20] = -100
    tce[:, 20] = INF  # an ignored row's +inf never counts
    tce[:, 51:55] = tce[:, 51:55] * 1e-3 + 2.0  # a late segment of close scores: absolute error shows
    return tce, labels, seg


@pytest.mark.parametrize("strategy", ["min_ce", "avg_ce", "softmin_ce"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_and_huge_scores_give_the_formulas_weights(strategy, backend):
    tce, labels, seg = _scores_with_inf(seed=3)
    w = candidate_row_weights(tce, labels, seg, None, strategy=strategy, ce_temperature=0.01, ignore_index=-100,
                              use_triton=backend == "triton")
    ref = candidate_weights(tce, labels, seg, strategy=strategy, ce_temperature=0.01)
    # closed forms, independent of the reference: +inf never weighs under min_ce / softmin_ce,
    # and a segment of +inf only has no fusion term; avg_ce's exp(−inf) = 0 is a plain score
    if strategy == "avg_ce":
        assert torch.allclose(w[:, 5], torch.full((3,), 1 / 3))
        rows = torch.arange(14, 17)[labels[14:17] != -100]  # segment 2's scored rows
        mean = tce[:, rows].double().mean(1)
        assert mean[0] == INF and torch.allclose(w[:, 14].double(), torch.softmax(torch.exp(-mean), 0), rtol=1e-6)
    else:
        assert bool((w[:, 5] == 0).all()) and bool((w[1, 0] == 0) & (w[0, 14] == 0) & (w[2, 17] == 0))
    if strategy == "min_ce":
        assert torch.equal(w, ref.float())
    assert_close_fp32(w, ref, what=strategy)


@pytest.mark.parametrize("strategy", ["avg_ce", "softmin_ce"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_score_leaves_later_segments_exact(strategy, backend):
    """A finite 1e17 in the first segment; the later segments' close scores keep every digit."""
    g = torch.Generator().manual_seed(4)
    seg = torch.repeat_interleave(torch.arange(5), torch.tensor([3, 8, 8, 8, 8]))
    tce = 2.0 + torch.rand(3, len(seg), generator=g) * 0.05
    tce[:, 1] = 1e17
    labels = torch.zeros(len(seg), dtype=torch.long)
    w = candidate_row_weights(tce, labels, seg, None, strategy=strategy, ce_temperature=0.01, ignore_index=-100,
                              use_triton=backend == "triton")
    ref = candidate_weights(tce, labels, seg, strategy=strategy, ce_temperature=0.01)
    assert_close_fp32(w, ref, what=strategy)


@pytest.mark.parametrize("strategy", ["min_ce", "avg_ce", "softmin_ce"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_with_infinite_scores_matches_the_reference(strategy, backend):
    case = make_case(n=12, v=64, seed=31)
    case["teacher_ce"][0, : case["teacher_ce"].shape[1] // 2] = INF  # candidate 0 +inf on the first half
    case["teacher_ce"][:, -4] = INF
    x = case["logits"].clone().requires_grad_()
    loss = fusion_loss(x, **_tensors(case), strategy=strategy, ce_temperature=0.5, backend=backend)
    loss.backward()
    xr = case["logits"].double().requires_grad_()
    ref = fusion_loss_reference(xr, **_tensors(case), strategy=strategy, ce_temperature=0.5)
    ref.backward()
    assert_close_fp32(loss, ref, what="loss")
    assert_close_fp32(x.grad, xr.grad, what="grad")


@pytest.mark.parametrize(
    "field, value, strategy, message",
    [
        ("teacher_ce", float("-inf"), "min_ce", r"teacher_ce\[2, 3\] is -inf"),
        ("teacher_ce", float("nan"), "softmin_ce", r"teacher_ce\[2, 3\] is NaN"),
        ("source_weights", INF, "weights", r"source_weights\[2, 3\] = inf"),
    ],
)
def test_validate_names_scores_and_weights_without_meaning(field, value, strategy, message):
    case = make_case(n=8, v=50, seed=17, adversarial=False)
    case[field][2, 3] = value
    with pytest.raises(FusionInputError, match=message):
        fusion_loss(case.pop("logits"), **case, strategy=strategy, validate=True, backend="torch")


def test_validate_accepts_plus_inf_scores_and_ignores_bad_scores_on_ignored_rows():
    case = make_case(n=8, v=50, seed=18, adversarial=False)
    case["teacher_ce"][1, 2] = INF
    case["labels"][4] = -100
    case["teacher_ce"][:, 4] = float("nan")
    loss = fusion_loss(case.pop("logits"), **case, validate=True, backend="torch")
    assert bool(torch.isfinite(loss))


# ---- point 8: edges ----

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend, reduction):
    case = make_case(n=0, v=40, seed=40)
    x = case["logits"].clone().requires_grad_()
    out = fusion_loss(x, **_tensors(case), reduction=reduction, backend=backend)
    assert out.shape == (() if reduction != "none" else (0,))
    out.sum().backward()
    assert x.grad.shape == (0, 40)
    if reduction != "none":
        assert out.item() == 0.0
    # batched, B × 0 rows
    xb = torch.zeros(2, 0, 40, requires_grad=True)
    outb = fusion_loss(xb, torch.zeros(2, 0, dtype=torch.long), torch.zeros(3, 2, 0, 5, dtype=torch.long),
                       torch.zeros(3, 2, 0, 5), teacher_ce=torch.zeros(3, 2, 0), reduction=reduction, backend=backend)
    outb.sum().backward()
    assert xb.grad.shape == (2, 0, 40) and (reduction == "none" or outb.item() == 0.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_no_rows(backend, reduction):
    case = make_case(n=0, v=40, seed=41)
    case.pop("logits")
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    out = fused_linear_fusion_loss(hidden, weight, **case, bias=bias, reduction=reduction, backend=backend)
    out.sum().backward()
    assert hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros(40, 8)) and torch.equal(bias.grad, torch.zeros(40))
    if reduction == "mean":
        assert out.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_vocabulary_is_named(backend):
    n, s, k = 3, 2, 4
    tensors = dict(labels=torch.zeros(n, dtype=torch.long), teacher_ids=torch.full((s, n, k), -1),
                   teacher_logits=torch.zeros(s, n, k), teacher_ce=torch.zeros(s, n))
    with pytest.raises(FusionInputError, match="vocabulary is empty"):
        fusion_loss(torch.zeros(n, 0), **tensors, backend=backend)
    with pytest.raises(FusionInputError, match="vocabulary is empty"):
        fused_linear_fusion_loss(torch.zeros(n, 8), torch.zeros(0, 8), **tensors, backend=backend)


def _bad_label_case(seed):
    case = make_case(n=10, v=48, seed=seed)
    bad = {1: 48, 6: -1}  # one past the vocabulary, and a negative id that is not ignore_index
    good_labels = case["labels"].clone()
    for row, label in bad.items():
        case["labels"][row] = label
    # the reference cannot take a bad label: give it a valid one; nothing else depends on its value
    # (segment scores and the default fusion mask only ask whether a row is ignored)
    ref_case = dict(case, labels=good_labels)
    return case, ref_case, list(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_out_of_range_is_nan_in_its_row_only(backend):
    case, ref_case, bad = _bad_label_case(seed=50)
    ok = torch.ones(10, dtype=torch.bool)
    ok[bad] = False
    # a random upstream: on Triton the rows are recomputed in the backward, the path a NaN must survive
    upstream = torch.randn(10, generator=torch.Generator().manual_seed(2)).double()
    x = case["logits"].clone().requires_grad_()
    rows, parts = fusion_loss(x, **_tensors(case), reduction="none", backend=backend, return_parts=True)
    (g,) = torch.autograd.grad(rows, x, upstream.float())
    xr = case["logits"].double().requires_grad_()
    ref = fusion_loss_reference(xr, **_tensors(ref_case), reduction="none")
    (gr,) = torch.autograd.grad(ref, xr, upstream)
    assert bool(rows[bad].isnan().all()) and bool(parts.ce[bad].isnan().all()) and bool(g[bad].isnan().all())
    assert_close_fp32(rows[ok], ref[ok], what="good rows")
    assert_close_fp32(g[ok], gr[ok], what="good rows' gradient")
    mean = fusion_loss(case["logits"], **_tensors(case), backend=backend)
    assert bool(mean.isnan())
    with pytest.raises(FusionInputError, match=r"labels\[1\] = 48 is outside \[0, 48\)"):
        fusion_loss(case["logits"], **_tensors(case), backend=backend, validate=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_label_out_of_range(backend):
    case, ref_case, bad = _bad_label_case(seed=51)
    case.pop("logits"), ref_case.pop("logits")
    g = torch.Generator().manual_seed(5)
    h = torch.randn(10, 8, generator=g)
    w = torch.randn(48, 8, generator=g)
    ok = torch.ones(10, dtype=torch.bool)
    ok[bad] = False
    hidden = h.clone().requires_grad_()
    rows = fused_linear_fusion_loss(hidden, w, **case, reduction="none", backend=backend)
    rows.sum().backward()
    hr = h.double().requires_grad_()
    ref = fusion_loss_reference(hr @ w.double().T, **ref_case, reduction="none")
    ref.sum().backward()
    assert bool(rows[bad].isnan().all()) and bool(hidden.grad[bad].isnan().all())
    assert_close_fp32(rows[ok], ref[ok], what="good rows")
    assert_close_fp32(hidden.grad[ok], hr.grad[ok], what="good rows' hidden gradient")
    with pytest.raises(FusionInputError, match="outside"):
        fused_linear_fusion_loss(h, w, **case, backend=backend, validate=True)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_is_refused_alike(backend, inplace):
    if inplace and backend == "torch":
        pytest.skip("inplace_backward is Triton only")
    case = make_case(n=6, v=40, seed=60)
    x = case["logits"].clone().requires_grad_()
    loss = fusion_loss(x, **_tensors(case), backend=backend, inplace_backward=inplace)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="backward can run only once per forward"):
        loss.backward()
    assert torch.equal(x.grad, first)  # nothing was added


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_second_backward_is_refused_alike(backend, reduction):
    case = make_case(n=6, v=40, seed=61)
    case.pop("logits")
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(40, 8)
    loss = fused_linear_fusion_loss(hidden, weight, **case, reduction=reduction, backend=backend).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once per forward"):
        loss.backward()
