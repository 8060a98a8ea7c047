"""fusion_loss on given logits, both backends, against the float64 reference.

The Triton backend runs under the interpreter on CPU (conftest sets it), so Triton cases use
few rows; the PyTorch backend takes the full product of options.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fusellm_kernels import FusionInputError, FusionLoss, fusion_loss
from fusellm_kernels.reference import fusion_loss_reference
from tests.tolerance import assert_close, assert_close_fp32

BACKENDS = ["torch", "triton"]
STRATEGIES = ["min_ce", "avg_ce", "softmin_ce", "weights"]


def make_case(n=13, v=300, s=3, k=5, *, seed=0, dtype=torch.float32, adversarial=True, batch=None):
    """Random inputs with the hard cases planted: duplicates within and across candidates,
    a teacher id equal to the label, empty slots, a candidate empty on a row, a row with no
    candidate at all, an ignored row, a segment whose rows are all ignored, ties in CE."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    ids = torch.randint(-2, v, (s, n, k), generator=g)
    tlog = torch.randn(s, n, k, generator=g) * 2
    tce = torch.rand(s, n, generator=g) * 3
    sw = torch.rand(s, n, generator=g)
    seg = torch.sort(torch.randint(0, max(1, n // 4), (n,), generator=g)).values
    if adversarial and n >= 10:
        ids[0, :, 1] = ids[0, :, 0]  # duplicate within a candidate (the first slot wins)
        ids[1 % s, :, 0] = ids[0, :, 0]  # the same id from another candidate
        ids[s - 1, 2, 1] = labels[2]  # a teacher id equal to the label
        ids[0, 3, :] = -1  # candidate 0 empty on row 3
        ids[:, 4, :] = -1  # no candidate at all on row 4
        labels[5] = -100  # an ignored row
        labels[n - 2 :] = -100  # ...and a whole last segment ignored
        seg[n - 2 :] = seg[n - 3] + 1
        tce[1 % s] = tce[0]  # exact CE ties: min_ce must pick the lowest s
        sw[:, 6] = 0.0  # zero weights on a row: no fusion term there
        tlog[0, 7, 0] = float("nan")  # the value at an empty slot is ignored, whatever it is
        ids[0, 7, 0] = -1
    if batch is not None:
        b, t = batch
        return dict(
            logits=logits.reshape(b, t, v), labels=labels.reshape(b, t), teacher_ids=ids.reshape(s, b, t, k),
            teacher_logits=tlog.reshape(s, b, t, k), teacher_ce=tce.reshape(s, b, t), source_weights=sw.reshape(s, b, t),
        )
    return dict(logits=logits, labels=labels, teacher_ids=ids, teacher_logits=tlog, teacher_ce=tce, segment_ids=seg, source_weights=sw)


def run_both(case, upstream=None, **kw):
    """(our loss, our grad) and (reference loss, reference grad) for one case."""
    logits = case["logits"]
    tensors = {k: v for k, v in case.items() if k != "logits"}
    x = logits.detach().clone().requires_grad_()
    out = fusion_loss(x, **tensors, **kw)
    ref_kw = {k: v for k, v in kw.items() if k not in ("backend", "validate", "inplace_backward")}
    xr = logits.detach().double().requires_grad_()
    ref = fusion_loss_reference(xr, **tensors, **ref_kw)
    if upstream is None:
        upstream = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad(out, x, upstream.to(out.dtype))
    (gr,) = torch.autograd.grad(ref, xr, upstream)
    return out, g, ref, gr


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", ["soft_ce", "kl"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torch_backend_every_option(strategy, divergence, reduction):
    case = make_case(seed=hash((strategy, divergence, reduction)) % 1000)
    out, g, ref, gr = run_both(case, strategy=strategy, divergence=divergence, reduction=reduction,
                               temperature=1.3, ce_temperature=0.7, backend="torch")
    assert_close_fp32(out, ref, what="loss")
    assert_close_fp32(g, gr, what="grad")


@pytest.mark.parametrize("divergence", ["soft_ce", "kl"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_triton_backend_every_strategy(strategy, divergence):
    reduction = {"min_ce": "mean", "avg_ce": "sum", "softmin_ce": "none", "weights": "mean"}[strategy]
    case = make_case(seed=STRATEGIES.index(strategy) * 7 + len(divergence))
    out, g, ref, gr = run_both(case, strategy=strategy, divergence=divergence, reduction=reduction,
                               temperature=0.8, ce_temperature=1.7, backend="triton")
    assert_close_fp32(out, ref, what="loss")
    assert_close_fp32(g, gr, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_triton_reductions_and_unit_upstream(backend, reduction):
    """Upstream gradient exactly 1 skips the rescale; a random one must be applied per row."""
    case = make_case(n=11, seed=3)
    upstream = torch.ones(()) if reduction == "sum" else torch.randn(11).double()
    out, g, ref, gr = run_both(case, upstream=upstream.double(), reduction=reduction, backend=backend)
    assert_close_fp32(out, ref, what="loss")
    assert_close_fp32(g, gr, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    case = make_case(n=6, seed=4)
    case["labels"][:] = -100
    for reduction in ("mean", "sum"):
        x = case["logits"].clone().requires_grad_()
        loss, parts = fusion_loss(x, **{k: v for k, v in case.items() if k != "logits"}, reduction=reduction,
                                  backend=backend, return_parts=True)
        loss.backward()
        assert float(loss.detach()) == 0.0 and not torch.isnan(loss.detach())
        assert bool((x.grad == 0).all())
        assert int(parts.n_ce) == 0 and int(parts.n_fusion) == 0 and int(parts.wins.sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fusion_mask_differs_from_labels(backend):
    """The original counts the fusion term over the attention mask: ignored labels, fusion on."""
    case = make_case(n=12, seed=5)
    mask = torch.ones(12, dtype=torch.bool)
    mask[0] = False
    case["fusion_mask"] = mask
    for strategy in ("min_ce", "weights"):
        out, g, ref, gr = run_both(case, strategy=strategy, backend=backend)
        assert_close_fp32(out, ref, what=f"{strategy} loss")
        assert_close_fp32(g, gr, what=f"{strategy} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_irregular_shape(backend):
    case = make_case(n=5, v=70_003, s=2, k=10, seed=6, adversarial=False)
    case["teacher_ids"][0, :, 0] = 70_002  # the last id of the vocabulary
    out, g, ref, gr = run_both(case, strategy="avg_ce", backend=backend)
    assert_close_fp32(out, ref, what="loss")
    assert_close_fp32(g, gr, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_input_default_segments(backend):
    """[B, T, V] input: one segment per sequence by default, `none` keeps [B, T]."""
    case = make_case(n=12, seed=7, batch=(3, 4))
    for reduction in ("mean", "none"):
        out, g, ref, gr = run_both(case, reduction=reduction, backend=backend)
        assert out.shape == ref.shape == ((3, 4) if reduction == "none" else ())
        assert_close_fp32(out, ref, what="loss")
        assert_close_fp32(g, gr, what="grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_by_policy(backend, dtype):
    case = make_case(n=10, v=500, seed=8, dtype=dtype)
    out, g, ref, gr = run_both(case, strategy="softmin_ce", backend=backend)
    assert g.dtype == dtype
    # PyTorch's own computation in the same dtype, against the same float64 truth
    x_lp = case["logits"].clone().requires_grad_()
    lp = fusion_loss_reference(x_lp, **{k: v for k, v in case.items() if k != "logits"}, strategy="softmin_ce", dtype=dtype)
    upstream = torch.randn((), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (g_lp,) = torch.autograd.grad(lp, x_lp, upstream.to(dtype))
    assert_close(out, ref, lp, what="loss")
    assert_close(g, gr, g_lp, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    case = make_case(n=10, v=200, seed=9)
    wide = torch.randn(10, 260)
    wide[:, :200] = case["logits"]
    case["logits"] = wide[:, :200]  # row stride 260
    case["teacher_ids"] = case["teacher_ids"].transpose(1, 2).contiguous().transpose(1, 2)
    case["teacher_logits"] = case["teacher_logits"].transpose(0, 1).contiguous().transpose(0, 1)
    case["labels"] = torch.stack([case["labels"], case["labels"]], 1)[:, 0]
    case["teacher_ce"] = case["teacher_ce"].T.contiguous().T
    assert not case["teacher_ids"].is_contiguous() and not case["labels"].is_contiguous()
    out, g, ref, gr = run_both(case, strategy="min_ce", divergence="kl", backend=backend)
    assert_close_fp32(out, ref, what="loss")
    assert_close_fp32(g, gr, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_and_parts(backend):
    case = make_case(n=12, seed=10)
    tensors = {k: v for k, v in case.items() if k != "logits"}
    results = []
    for _ in range(2):
        x = case["logits"].clone().requires_grad_()
        loss, parts = fusion_loss(x, **tensors, strategy="min_ce", backend=backend, return_parts=True)
        loss.backward()
        results.append((loss.detach(), x.grad, parts))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    _, ref_parts = fusion_loss_reference(case["logits"].double(), **tensors, strategy="min_ce", return_parts=True)
    parts = results[0][2]
    assert torch.equal(parts.wins, ref_parts.wins)
    assert int(parts.wins.sum()) > 0
    assert_close_fp32(parts.weight_sums, ref_parts.weight_sums, what="weight sums")
    assert_close_fp32(parts.ce, ref_parts.ce, what="ce part")
    assert_close_fp32(parts.fusion, ref_parts.fusion, what="fusion part")
    assert int(parts.n_ce) == int(ref_parts.n_ce) and int(parts.n_fusion) == int(ref_parts.n_fusion)


def test_min_ce_ties_go_to_the_lowest_candidate():
    case = make_case(n=8, s=3, seed=11, adversarial=False)
    case["teacher_ce"][:] = 1.5  # every candidate ties on every segment
    case["teacher_ids"][:, :, :] = torch.arange(3)[:, None, None] * 5 + torch.arange(5)  # disjoint, all valid
    for backend in BACKENDS:
        _, parts = fusion_loss(case["logits"], **{k: v for k, v in case.items() if k != "logits"}, backend=backend, return_parts=True)
        assert parts.wins.tolist() == [8, 0, 0], backend


def test_inplace_backward_writes_the_gradient_over_the_logits():
    case = make_case(n=9, seed=12)
    tensors = {k: v for k, v in case.items() if k != "logits"}
    x = case["logits"].clone().requires_grad_()
    fusion_loss(x, **tensors, backend="triton").backward()
    storage = case["logits"].clone()
    y = storage.clone().requires_grad_()
    loss = fusion_loss(y, **tensors, backend="triton", inplace_backward=True)
    (g,) = torch.autograd.grad(loss * 0.5, y)
    assert torch.equal(g, x.grad * 0.5)
    with pytest.raises(FusionInputError, match="inplace_backward"):
        fusion_loss(case["logits"].clone().requires_grad_(), **tensors, backend="torch", inplace_backward=True)


def test_backward_twice_is_refused():
    case = make_case(n=6, seed=13)
    x = case["logits"].clone().requires_grad_()
    loss = fusion_loss(x, **{k: v for k, v in case.items() if k != "logits"}, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_module_equals_functional():
    case = make_case(n=10, seed=14)
    tensors = {k: v for k, v in case.items() if k != "logits"}
    module = FusionLoss(strategy="softmin_ce", lam=0.7, ce_temperature=0.5, divergence="kl", backend="torch")
    expected = fusion_loss(case["logits"], **tensors, strategy="softmin_ce", lam=0.7, ce_temperature=0.5, divergence="kl", backend="torch")
    assert torch.equal(module(case["logits"], **tensors), expected)
    assert "softmin_ce" in repr(module)


def test_no_grad_forward_matches():
    case = make_case(n=8, seed=15)
    tensors = {k: v for k, v in case.items() if k != "logits"}
    with torch.no_grad():
        a = fusion_loss(case["logits"], **tensors, backend="triton")
    b = fusion_loss(case["logits"].clone().requires_grad_(), **tensors, backend="triton")
    assert torch.equal(a, b.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The loss traces into one graph (custom ops for the Triton path) and gives the eager result."""
    case = make_case(n=8, seed=16)
    tensors = {k: v for k, v in case.items() if k != "logits"}

    def step(logits, labels, teacher_ids, teacher_logits, teacher_ce, segment_ids, source_weights):
        return fusion_loss(logits, labels, teacher_ids, teacher_logits, teacher_ce=teacher_ce,
                           segment_ids=segment_ids, source_weights=source_weights, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = case["logits"].clone().requires_grad_()
    loss = compiled(x, **tensors)
    loss.backward()
    y = case["logits"].clone().requires_grad_()
    expected = step(y, **tensors)
    expected.backward()
    assert_close_fp32(loss.detach(), expected.detach(), what="compiled loss")
    assert_close_fp32(x.grad, y.grad, what="compiled grad")


# ---- bad input ----

def _bad(**changes):
    case = make_case(n=8, v=50, seed=17, adversarial=False)
    case.update(changes)
    return case


@pytest.mark.parametrize(
    "changes, kwargs, message",
    [
        (dict(), dict(strategy="best"), "unknown strategy"),
        (dict(), dict(divergence="js"), "unknown divergence"),
        (dict(), dict(reduction="avg"), "unknown reduction"),
        (dict(), dict(temperature=0.0), "temperature"),
        (dict(), dict(lam=1.5), "lam"),
        (dict(teacher_ce=None), dict(strategy="avg_ce"), "needs teacher_ce"),
        (dict(source_weights=None), dict(strategy="weights"), "needs source_weights"),
        (dict(labels=torch.zeros(7, dtype=torch.long)), dict(), "labels has shape"),
        (dict(teacher_logits=torch.zeros(3, 8, 4)), dict(), "teacher_logits has shape"),
        (dict(teacher_ids=torch.zeros(3, 8, 5)), dict(), "teacher_ids have dtype"),
        (dict(teacher_ce=torch.zeros(2, 8)), dict(), "teacher_ce has shape"),
        (dict(labels=torch.full((8,), 50)), dict(validate=True), "outside"),
        (dict(teacher_ids=torch.full((3, 8, 5), 50)), dict(validate=True), ">= vocabulary size 50"),
        (dict(segment_ids=torch.tensor([0, 0, 1, 1, 0, 2, 2, 2])), dict(validate=True), "non-decreasing"),
        (dict(teacher_ce=torch.full((3, 8), float("nan"))), dict(validate=True), "teacher_ce.*NaN"),
        (dict(source_weights=-torch.ones(3, 8)), dict(validate=True, strategy="weights"), "source_weights"),
    ],
)
def test_bad_input_is_named(changes, kwargs, message):
    case = _bad(**changes)
    with pytest.raises(FusionInputError, match=message):
        fusion_loss(case.pop("logits"), **case, backend="torch", **kwargs)


def test_nan_in_a_filled_teacher_slot_is_named():
    case = _bad()
    case["teacher_ids"][1, 2, 3] = 7
    case["teacher_logits"][1, 2, 3] = float("inf")
    with pytest.raises(FusionInputError, match=r"teacher_logits\[1, 2, 3\]"):
        fusion_loss(case.pop("logits"), **case, validate=True)


def test_import_is_light():
    code = "import sys, fusellm_kernels; print(sorted(m for m in ('triton', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


# ---- CUDA (bench/gpu_check.sh runs these on a lent GPU) ----

@pytest.mark.cuda
@pytest.mark.parametrize("v", [32_000, 128_256])
def test_cuda_matches_reference_without_host_sync(v):
    case = make_case(n=256, v=v, s=3, k=10, seed=20, dtype=torch.bfloat16)
    case = {k: t.cuda() for k, t in case.items()}
    tensors = {k: t for k, t in case.items() if k != "logits"}
    x = case["logits"].clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fusion_loss(x, **tensors)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    xr = case["logits"].double().requires_grad_()
    ref = fusion_loss_reference(xr, **tensors)
    ref.backward()
    x_lp = case["logits"].clone().requires_grad_()
    lp = fusion_loss_reference(x_lp, **tensors, dtype=torch.bfloat16)
    lp.backward()
    assert_close(loss.detach(), ref.detach(), lp.detach(), what="loss")
    assert_close(x.grad, xr.grad, x_lp.grad, what="grad")
    again = case["logits"].clone().requires_grad_()
    fusion_loss(again, **tensors).backward()
    assert torch.equal(again.grad, x.grad)
