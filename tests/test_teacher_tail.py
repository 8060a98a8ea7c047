"""teacher_tail="bucket": each candidate's top-k tail kept as one bucket, against the float64
reference (which builds p_s, t_s and Q_s densely, Q_s by masking, never as 1 − Σ)."""
from __future__ import annotations

import os

import pytest
import torch

from fusellm_kernels import FusionInputError, FusionLoss, fused_linear_fusion_loss, fusion_loss
from fusellm_kernels.reference import fusion_loss_reference
from tests.tolerance import assert_close, assert_close_fp32

BACKENDS = ["torch", "triton"]


def bucket_case(n=12, v=300, s=3, k=5, *, seed=0, scale=None, dtype=torch.float32, plant=True):
    """Teachers with a real tail: each candidate's row is a full random distribution over V,
    of which the top-k (ids, logits) and the full log-sum-exp are kept, as the teacher pass
    stores them. `scale` [S, N] sets each row's sharpness (large: tail near 0; small: near 1)."""
    g = torch.Generator().manual_seed(seed)
    if scale is None:
        scale = torch.rand(s, n, generator=g) * 6
    full = torch.randn(s, n, v, generator=g) * scale[..., None]
    top = torch.topk(full, k, dim=-1)
    ids, tlog = top.indices.clone(), top.values.clone()
    lse = torch.logsumexp(full, -1)
    logits = (torch.randn(n, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    tce = torch.rand(s, n, generator=g) * 3
    if plant and n >= 8:
        ids[0, :, 1] = ids[0, :, 0]  # a duplicate id within a candidate: its mass is summed
        ids[1 % s, 0, 0] = ids[0, 0, 2]  # the same id from two candidates
        ids[s - 1, 1, 2:] = -1  # unmapped ids: their mass goes to the tail
        ids[0, 2, :] = -1  # candidate 0 has nothing on row 2
        ids[s - 1, 3, :] = -1  # a one-hot fallback row: one id, logit 1, no lse
        ids[s - 1, 3, 0] = labels[3]
        tlog[s - 1, 3, 0] = 1.0
        lse[s - 1, 3] = float("nan")
        ids[:, 4, :] = -1  # no candidate at all
        labels[5] = -100
        ids[0, 6, 3] = labels[6]  # a teacher id equal to the label
    return dict(logits=logits, labels=labels, teacher_ids=ids, teacher_logits=tlog, teacher_ce=tce, teacher_lse=lse)


def tails(case) -> torch.Tensor:
    ids, tlog, lse = case["teacher_ids"], case["teacher_logits"], case["teacher_lse"]
    p = torch.where(ids >= 0, torch.exp(tlog.double() - lse.double()[..., None]), 0.0).sum(-1)
    return (1 - p).clamp_min(0)[~torch.isnan(lse) & (ids >= 0).any(-1)]


def run(case, upstream_seed=1, **kw):
    tensors = {k: v for k, v in case.items() if k != "logits"}
    x = case["logits"].detach().clone().requires_grad_()
    out = fusion_loss(x, **tensors, teacher_tail="bucket", **kw)
    ref_kw = {k: v for k, v in kw.items() if k not in ("backend", "validate", "inplace_backward")}
    xr = case["logits"].detach().double().requires_grad_()
    ref = fusion_loss_reference(xr, **tensors, teacher_tail="bucket", **ref_kw)
    up = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(upstream_seed))
    (g,) = torch.autograd.grad(out, x, up.to(out.dtype))
    (gr,) = torch.autograd.grad(ref, xr, up)
    return out, g, ref, gr


@pytest.mark.parametrize("divergence", ["soft_ce", "kl"])
@pytest.mark.parametrize("strategy", ["min_ce", "avg_ce"])
@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_torch_matches_reference(s, strategy, divergence):
    case = bucket_case(s=s, seed=s * 10 + len(strategy) + len(divergence))
    for reduction in ("mean", "none"):
        out, g, ref, gr = run(case, strategy=strategy, divergence=divergence, reduction=reduction, backend="torch")
        assert_close_fp32(out, ref, what=f"{reduction} loss")
        assert_close_fp32(g, gr, what=f"{reduction} grad")


@pytest.mark.parametrize("s,strategy,divergence,reduction", [
    (1, "min_ce", "kl", "mean"), (2, "avg_ce", "soft_ce", "none"), (3, "min_ce", "soft_ce", "sum"), (4, "avg_ce", "kl", "none"),
])
def test_triton_matches_reference(s, strategy, divergence, reduction):
    """`none` with a random upstream runs the kernel's BACKWARD variant, which reads the saved log Q_s."""
    case = bucket_case(n=10, v=200, s=s, seed=s)
    out, g, ref, gr = run(case, strategy=strategy, divergence=divergence, reduction=reduction, backend="triton")
    assert_close_fp32(out, ref, what="loss")
    assert_close_fp32(g, gr, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tails_from_0_to_099(backend):
    n = 12
    scale = torch.linspace(0.02, 12.0, n).expand(2, n).clone()  # flat rows (tail 0.99) to peaked (tail ~0)
    case = bucket_case(n=n, v=600, s=2, k=4, seed=3, scale=scale, plant=False)
    t = tails(case)
    assert float(t.min()) < 1e-3 and float(t.max()) > 0.99  # the range this test is about is really there
    out, g, ref, gr = run(case, strategy="avg_ce", divergence="kl", backend=backend)
    assert_close_fp32(out, ref, what="loss")
    assert_close_fp32(g, gr, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_mass_outside_near_0_and_near_1(backend):
    """Q_s near 0 (the student sure of candidate 0's ids: 1 − Σ would cancel in fp32) and near 1
    (the student puts almost nothing on them)."""
    case = bucket_case(n=8, v=256, s=2, k=4, seed=4, scale=torch.full((2, 8), 0.5), plant=False)
    z = torch.zeros(8, 256)
    ids0 = case["teacher_ids"][0]
    peak = torch.tensor([8.0, 14.0, 20.0, 26.0, -8.0, -14.0, -20.0, -26.0])[:, None].expand(8, 4)
    z.scatter_(1, ids0, peak)  # rows 0-3: Q_0 from 1e-2 down to 1e-10; rows 4-7: Q_0 within 1e-10 of 1
    case["logits"] = z
    case["labels"][:] = torch.arange(8) + 100
    q = torch.softmax(z.double(), -1)
    q_out = 1 - q.gather(1, ids0).sum(-1)
    assert float(q_out[3]) < 1e-9 and float(q_out[4:].min()) > 1 - 1e-3
    for strategy in ("min_ce", "avg_ce"):
        out, g, ref, gr = run(case, strategy=strategy, reduction="none", backend=backend)
        assert_close_fp32(out, ref, what=f"{strategy} loss")
        assert_close_fp32(g, gr, what=f"{strategy} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_are_summed_and_unmapped_go_to_the_tail(backend):
    """Property, independent of the reference: two slots of one id weigh like one slot holding
    the log-sum-exp of their logits; an unmapped slot weighs like a slot that was never there."""
    case = bucket_case(n=6, v=100, s=1, k=4, seed=5, plant=False)
    ids, tlog = case["teacher_ids"].clone(), case["teacher_logits"].clone()
    dup = dict(case, teacher_ids=ids.clone(), teacher_logits=tlog.clone())
    dup["teacher_ids"][0, :, 1] = ids[0, :, 0]
    merged = dict(case, teacher_ids=ids.clone(), teacher_logits=tlog.clone())
    merged["teacher_ids"][0, :, 1] = -1
    merged["teacher_logits"][0, :, 0] = torch.logaddexp(tlog[0, :, 0], tlog[0, :, 1])
    unmapped = dict(case, teacher_ids=ids.clone())
    unmapped["teacher_ids"][0, :, 3] = -1
    truncated = dict(case, teacher_ids=ids[..., :3].clone(), teacher_logits=tlog[..., :3].clone())
    for a, b in ((dup, merged), (unmapped, truncated)):
        la = fusion_loss({**a}.pop("logits"), **{k: v for k, v in a.items() if k != "logits"}, teacher_tail="bucket",
                         divergence="kl", reduction="none", backend=backend)
        lb = fusion_loss({**b}.pop("logits"), **{k: v for k, v in b.items() if k != "logits"}, teacher_tail="bucket",
                         divergence="kl", reduction="none", backend=backend)
        assert_close_fp32(la, lb, what="loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_renormalize_is_unchanged_and_differs(backend):
    """The default stays the original's rule; the bucket changes the loss wherever tails exist."""
    case = bucket_case(n=8, v=120, s=2, seed=6)
    tensors = {k: v for k, v in case.items() if k not in ("logits", "teacher_lse")}
    base = fusion_loss(case["logits"], **tensors, backend=backend)
    ref = fusion_loss_reference(case["logits"].double(), **tensors)
    assert_close_fp32(base, ref, what="renormalize")
    bucket = fusion_loss(case["logits"], **tensors, teacher_lse=case["teacher_lse"], teacher_tail="bucket", backend=backend)
    assert abs(float(bucket) - float(base)) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_by_policy(backend):
    case = bucket_case(n=10, v=240, s=2, seed=7, dtype=torch.bfloat16)
    out, g, ref, gr = run(case, strategy="avg_ce", divergence="kl", backend=backend)
    assert g.dtype == torch.bfloat16
    tensors = {k: v for k, v in case.items() if k != "logits"}
    x = case["logits"].clone().requires_grad_()
    lp = fusion_loss_reference(x, **tensors, strategy="avg_ce", divergence="kl", teacher_tail="bucket", dtype=torch.bfloat16)
    up = torch.randn((), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (g_lp,) = torch.autograd.grad(lp, x, up.to(torch.bfloat16))
    assert_close(out, ref, lp, what="loss")
    assert_close(g, gr, g_lp, what="grad")


def test_triton_inplace_backward():
    case = bucket_case(n=8, v=128, s=2, seed=8)
    tensors = {k: v for k, v in case.items() if k != "logits"}
    x = case["logits"].clone().requires_grad_()
    loss = fusion_loss(x * 1.0, **tensors, teacher_tail="bucket", backend="triton", inplace_backward=True)
    loss.backward()
    xr = case["logits"].double().requires_grad_()
    fusion_loss_reference(xr, **tensors, teacher_tail="bucket").backward()
    assert_close_fp32(x.grad, xr.grad, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_equals_loss_on_logits(backend):
    g = torch.Generator().manual_seed(9)
    case = bucket_case(n=10, v=160, s=2, seed=9)
    hidden = torch.randn(10, 16, generator=g).requires_grad_()
    weight = torch.randn(160, 16, generator=g).requires_grad_()
    tensors = {k: v for k, v in case.items() if k != "logits"}
    loss = fused_linear_fusion_loss(hidden, weight, **tensors, teacher_tail="bucket", divergence="kl", backend=backend, chunk_rows=4)
    loss.backward()
    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = fusion_loss_reference(h2 @ w2.T, **tensors, teacher_tail="bucket", divergence="kl")
    ref.backward()
    assert_close_fp32(loss, ref, what="loss")
    assert_close_fp32(hidden.grad, h2.grad, what="grad hidden")
    assert_close_fp32(weight.grad, w2.grad, what="grad weight")


def test_refusals():
    case = bucket_case(n=8, v=50, s=2, seed=10)
    tensors = {k: v for k, v in case.items() if k not in ("logits", "teacher_lse")}
    z = case["logits"]
    lse = case["teacher_lse"]
    with pytest.raises(FusionInputError, match="teacher_lse"):
        fusion_loss(z, **tensors, teacher_tail="bucket", backend="torch")
    with pytest.raises(FusionInputError, match="temperature=1"):
        fusion_loss(z, **tensors, teacher_lse=lse, teacher_tail="bucket", temperature=2.0, backend="torch")
    with pytest.raises(FusionInputError, match="ignores it"):
        fusion_loss(z, **tensors, teacher_lse=lse, backend="torch")
    with pytest.raises(FusionInputError, match="unknown teacher_tail"):
        fusion_loss(z, **tensors, teacher_lse=lse, teacher_tail="tail", backend="torch")
    with pytest.raises(FusionInputError, match="shape"):
        fusion_loss(z, **tensors, teacher_lse=lse[:, :3], teacher_tail="bucket", backend="torch")
    with pytest.raises(FusionInputError, match="temperature=1"):
        FusionLoss(teacher_tail="bucket", temperature=0.5)
    low = lse.clone()
    low[1, 0] = case["teacher_logits"][1, 0].max() - 1.0  # an lse below the row's largest logit
    with pytest.raises(FusionInputError, match=r"teacher_lse\[1, 0\].*below"):
        fusion_loss(z, **tensors, teacher_lse=low, teacher_tail="bucket", validate=True, backend="torch")
    inf = lse.clone()
    inf[0, 1] = float("inf")
    with pytest.raises(FusionInputError, match=r"teacher_lse\[0, 1\] is inf"):
        fusion_loss(z, **tensors, teacher_lse=inf, teacher_tail="bucket", validate=True, backend="torch")
    # 16-bit rounding of a stored logit above its lse is not an error (the tail is clamped at 0)
    tight = case["teacher_logits"].clone()
    tight[0, 0, 0] = lse[0, 0] * (1 + 2.0 ** -10) + 1e-7
    fusion_loss(z, **{**tensors, "teacher_logits": tight}, teacher_lse=lse, teacher_tail="bucket", validate=True, backend="torch")


# ---- on the GPU (bench/gpu_check.sh), with a CPU twin through the interpreter ----

def check_bucket_device(device: torch.device, *, n: int, v: int, dtype: torch.dtype, seed: int = 11) -> None:
    """The bucket loss without a host sync, rows 0-3 with the student sure of candidate 0's
    ids (Q_0 down to ~1e-10: the float64 block sums must keep it), against float64."""
    from tests.test_cuda_sync import no_host_sync

    case = bucket_case(n=n, v=v, s=3, k=10, seed=seed)
    z = case["logits"].float()
    for row, peak in enumerate((8.0, 14.0, 20.0, 26.0)):
        z[row, case["teacher_ids"][0, row].clamp_min(0)] = peak
    case["logits"] = z.to(dtype)
    dev = {k: t.to(device) for k, t in case.items()}
    logits = dev.pop("logits")
    up = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)
    x = logits.clone().requires_grad_()
    with no_host_sync(device):
        loss = fusion_loss(x, **dev, teacher_tail="bucket", divergence="kl", strategy="avg_ce", reduction="none",
                           backend="auto" if device.type == "cuda" else "triton")
        (grad,) = torch.autograd.grad(loss, x, up.float())
    xr = logits.double().requires_grad_()
    ref = fusion_loss_reference(xr, **dev, teacher_tail="bucket", divergence="kl", strategy="avg_ce", reduction="none")
    (gr,) = torch.autograd.grad(ref, xr, up)
    if dtype == torch.float32:
        assert_close_fp32(loss, ref, what="loss")
        assert_close_fp32(grad, gr, what="grad")
    else:
        x_lp = logits.clone().requires_grad_()
        lp = fusion_loss_reference(x_lp, **dev, teacher_tail="bucket", divergence="kl", strategy="avg_ce", reduction="none",
                                   dtype=dtype)
        (g_lp,) = torch.autograd.grad(lp, x_lp, up.to(dtype))
        assert_close(loss, ref, lp, what="loss")
        assert_close(grad, gr, g_lp, what="grad")


@pytest.mark.cuda
@pytest.mark.parametrize("v,dtype", [(32_000, torch.float32), (32_000, torch.bfloat16), (128_256, torch.bfloat16)])
def test_cuda_bucket_without_host_sync(v, dtype):
    check_bucket_device(torch.device("cuda"), n=256, v=v, dtype=dtype)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (no GPU here)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_twin_bucket(dtype):
    check_bucket_device(torch.device("cpu"), n=10, v=300, dtype=dtype)
