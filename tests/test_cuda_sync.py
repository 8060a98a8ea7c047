"""Every Triton op, forward and backward, with no host sync, against the float64 reference.

Each check is a helper taking a device. The `cuda` tests (bench/gpu_check.sh runs them) call
it on the GPU under `torch.cuda.set_sync_debug_mode("error")`, so any host sync in the op
raises, at training-like shapes in bf16 (the tolerance policy's 2x rule). Each has a CPU twin
that calls the same helper at small shapes through the Triton interpreter (backend="triton",
no sync mode), so the test code itself runs on every machine. Covered here: the strategies
and divergences with an upstream gradient other than 1 (the backward's recompute kernel),
`inplace_backward` with one (the scale-rows kernel), `return_parts`, the fused lm_head with a
per-row upstream and with a scaled mean, and the teacher gather with and without a vocab map.
Not repeated: the default loss (min_ce, soft_ce, mean, upstream 1) in tests/test_fusion_loss.py
and the fused lm_head's mean with a bias and upstream 1 in tests/test_fused_linear.py.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from fusellm_kernels import fused_linear_fusion_loss, fusion_loss
from fusellm_kernels.functional import gather_teacher_rows
from fusellm_kernels.reference import fusion_loss_reference
from tests.test_fused_linear import linear_case
from tests.test_fusion_loss import make_case
from tests.tolerance import assert_close

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
SCALE = 0.37  # the upstream gradient of a reduced loss: not 1, so the backward's kernels run

# CPU twins run Triton kernels on CPU tensors, which needs the interpreter (conftest turns it
# on where there is no GPU); on a GPU machine they are skipped rather than refused.
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (no GPU here)")


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[None]:
    """On CUDA, every host sync inside raises; elsewhere a no-op."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)  # the inputs' copies are not the op's
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _backend(device: torch.device) -> str:
    return "auto" if device.type == "cuda" else "triton"


def _upstream(shape: tuple[int, ...], device: torch.device, seed: int) -> Tensor:
    """A random float64 upstream gradient with every fifth entry exactly 1 (rows whose
    gradient the forward already wrote, which the backward must leave alone)."""
    up = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    up.view(-1)[::5] = 1.0
    return up.to(device)


def _grads(out: Tensor, leaves: list[Tensor], up: Tensor | None) -> tuple[Tensor, ...]:
    """Gradients of Σ up·out (out per row) or of SCALE·out (reduced) to `leaves`; `up` must
    already be on the device (a host-to-device copy is a sync)."""
    if up is None:
        return torch.autograd.grad(out * SCALE, leaves)
    return torch.autograd.grad(out, leaves, up)


def _check(got: Tensor, ref: Tensor, lowp: Tensor, dtype: torch.dtype, what: str) -> None:
    """float32: tight against float64; bf16/fp16: at most 2x PyTorch's same-dtype error."""
    assert_close(got, ref, lowp if dtype != torch.float32 else None, what=what)


def _check_parts(got, ref, lowp, dtype: torch.dtype) -> None:
    """`return_parts`: the wins exactly, the per-part sums as `_check`."""
    assert torch.equal(got.wins.cpu(), ref.wins.cpu())
    for name in ("ce", "fusion", "weight_sums"):
        _check(getattr(got, name), getattr(ref, name), getattr(lowp, name), dtype, name)


# ---- fusion_loss on given logits ----

def check_fusion_loss(device: torch.device, *, n: int, v: int, strategy: str, divergence: str, reduction: str,
                      dtype: torch.dtype, inplace: bool = False, parts: bool = False, seed: int = 0) -> None:
    case = {k: t.to(device) for k, t in make_case(n=n, v=v, s=3, k=10, seed=seed, dtype=dtype).items()}
    logits = case.pop("logits")
    opts = dict(strategy=strategy, divergence=divergence, reduction=reduction, temperature=0.8, ce_temperature=1.7)
    up64 = _upstream((n,), device, seed + 1) if reduction == "none" else None
    up = None if up64 is None else up64.float()
    x = logits.clone().requires_grad_()
    with no_host_sync(device):
        out = fusion_loss(x, **case, **opts, backend=_backend(device), inplace_backward=inplace, return_parts=parts)
        loss, got_parts = out if parts else (out, None)
        (grad,) = _grads(loss, [x], up)
    if inplace:  # the gradient was written over the logits, and scaled there in the backward
        assert grad.data_ptr() == x.data_ptr()
    assert grad.dtype == dtype and loss.dtype == torch.float32

    xr = logits.double().requires_grad_()
    ref = fusion_loss_reference(xr, **case, **opts, return_parts=parts)
    x_lp = logits.clone().requires_grad_()
    lp = fusion_loss_reference(x_lp, **case, **opts, return_parts=parts, dtype=dtype)
    (ref_loss, ref_parts), (lp_loss, lp_parts) = (ref, lp) if parts else ((ref, None), (lp, None))
    (ref_grad,) = _grads(ref_loss, [xr], up64)
    (lp_grad,) = _grads(lp_loss, [x_lp], None if up64 is None else up64.to(dtype))
    _check(loss.detach(), ref_loss.detach(), lp_loss.detach(), dtype, "loss")
    _check(grad, ref_grad, lp_grad, dtype, "grad")
    if parts:
        _check_parts(got_parts, ref_parts, lp_parts, dtype)
        assert int(got_parts.n_ce) == int(ref_parts.n_ce) and int(got_parts.n_fusion) == int(ref_parts.n_fusion)


# (strategy, divergence, reduction, inplace, parts, large vocabulary): every strategy and both
# divergences with an upstream other than 1; the large vocabulary takes the 16-warp launch.
LOSS_CASES = {
    "avg_ce-soft_ce-sum": ("avg_ce", "soft_ce", "sum", False, False, False),
    "softmin_ce-kl-none": ("softmin_ce", "kl", "none", False, False, True),
    "weights-kl-mean": ("weights", "kl", "mean", False, False, False),
    "min_ce-kl-none": ("min_ce", "kl", "none", False, False, False),
    "inplace-min_ce-none": ("min_ce", "soft_ce", "none", True, False, False),
    "inplace-avg_ce-kl-mean-large": ("avg_ce", "kl", "mean", True, False, True),
    "parts-softmin_ce-kl-mean": ("softmin_ce", "kl", "mean", False, True, False),
}


def _loss_case(name: str, device: torch.device) -> None:
    strategy, divergence, reduction, inplace, parts, large = LOSS_CASES[name]
    if device.type == "cuda":
        n, v, dtype = 256, 128_256 if large else 32_000, torch.bfloat16
    else:
        n, v, dtype = 12, 4096 if large else 300, torch.bfloat16
    check_fusion_loss(device, n=n, v=v, strategy=strategy, divergence=divergence, reduction=reduction, dtype=dtype,
                      inplace=inplace, parts=parts, seed=30 + list(LOSS_CASES).index(name))


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_cuda_fusion_loss_without_host_sync(name):
    _loss_case(name, CUDA)


@interpreted
@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_cpu_twin_fusion_loss(name):
    _loss_case(name, CPU)


# ---- fused lm_head + loss ----

def check_fused_linear(device: torch.device, *, n: int, v: int, h: int, strategy: str, divergence: str, reduction: str,
                       bias: bool, chunk_rows: int | None, parts: bool, dtype: torch.dtype, seed: int = 0) -> None:
    params, case = linear_case(n=n, v=v, h=h, seed=seed, dtype=dtype, bias=bias)
    params = [p.to(device) for p in params if p is not None]
    case = {k: t.to(device) for k, t in case.items()}
    opts = dict(strategy=strategy, divergence=divergence, reduction=reduction)
    up64 = _upstream((n,), device, seed + 1) if reduction == "none" else None
    up = None if up64 is None else up64.float()
    leaves = [p.clone().requires_grad_() for p in params]
    with no_host_sync(device):
        out = fused_linear_fusion_loss(leaves[0], leaves[1], **case, **opts, bias=leaves[2] if bias else None,
                                       chunk_rows=chunk_rows, return_parts=parts, backend=_backend(device))
        loss, got_parts = out if parts else (out, None)
        grads = _grads(loss, leaves, up)

    def reference(ps: list[Tensor], dt: torch.dtype):
        logits = ps[0] @ ps[1].T + (ps[2] if bias else 0)
        return fusion_loss_reference(logits, **case, **opts, return_parts=parts, dtype=dt)

    double = [p.double().requires_grad_() for p in params]
    lowp = [p.clone().requires_grad_() for p in params]
    ref, lp = reference(double, torch.float64), reference(lowp, dtype)
    (ref_loss, ref_parts), (lp_loss, lp_parts) = (ref, lp) if parts else ((ref, None), (lp, None))
    ref_grads = _grads(ref_loss, double, up64)
    lp_grads = _grads(lp_loss, lowp, None if up64 is None else up64.to(dtype))
    _check(loss.detach(), ref_loss.detach(), lp_loss.detach(), dtype, "loss")
    for name, a, b, c in zip(("hidden", "weight", "bias"), grads, ref_grads, lp_grads):
        assert a.dtype == dtype
        _check(a, b, c, dtype, f"grad {name}")
    if parts:
        _check_parts(got_parts, ref_parts, lp_parts, dtype)


# (strategy, divergence, reduction, bias, chunked, parts): a per-row upstream (the backward
# recomputes the chunks with it folded in), and a scaled mean (the stored gradients to
# hidden, weight and bias are scaled on the device) with the parts.
LINEAR_CASES = {
    "avg_ce-kl-none-chunked": ("avg_ce", "kl", "none", False, True, False),
    "softmin_ce-mean-bias-parts": ("softmin_ce", "soft_ce", "mean", True, False, True),
}


def _linear_case(name: str, device: torch.device) -> None:
    strategy, divergence, reduction, bias, chunked, parts = LINEAR_CASES[name]
    dtype = torch.bfloat16
    if device.type == "cuda":
        n, v, h, chunk = 512, 32_000, 256, 192  # 192: three chunks, the last one partial
    else:
        n, v, h, chunk = 24, 300, 24, 10
    check_fused_linear(device, n=n, v=v, h=h, strategy=strategy, divergence=divergence, reduction=reduction, bias=bias,
                       chunk_rows=chunk if chunked else None, parts=parts, dtype=dtype,
                       seed=50 + list(LINEAR_CASES).index(name))


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_cuda_fused_linear_without_host_sync(name):
    _linear_case(name, CUDA)


@interpreted
@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_cpu_twin_fused_linear(name):
    _linear_case(name, CPU)


# ---- the teacher gather (no float64 reference: it copies values; checked exactly against
# the PyTorch backend, which tests/test_teacher_gather.py checks against a plain loop) ----

def gather_tables(n: int, rows: int, v_src: int, v_tgt: int, with_map: bool, seed: int):
    """Two candidates' stored top-k (k = 10 and 6) with ids beyond the map, duplicate source
    ids and source ids mapped onto one target id; rows with a stored row, a one-hot fallback
    or neither."""
    g = torch.Generator().manual_seed(seed)
    ids, logits, maps = [], [], []
    for k in (10, 6):
        t = torch.randint(0, v_src + 3, (rows, k), generator=g)
        t[0, 1] = t[0, 0]
        if not with_map:
            t = t.clamp_max(v_tgt - 1)  # already target ids
        ids.append(t.to(torch.int32))
        logits.append(torch.randn(rows, k, generator=g).sort(dim=1, descending=True).values)
        vmap = torch.randint(-1, v_tgt, (v_src,), generator=g).to(torch.int32)
        vmap[1] = vmap[2] = 7
        maps.append(vmap if with_map else None)
    source_rows = torch.randint(-1, rows, (2, n), generator=g)
    fallback = torch.randint(-1, v_tgt, (2, n), generator=g).to(torch.int32)
    return ids, logits, source_rows, fallback, maps


def check_gather(device: torch.device, *, n: int, rows: int, v_src: int, v_tgt: int, with_map: bool,
                 logits_dtype: torch.dtype, seed: int = 0) -> None:
    ids, logits, source_rows, fallback, maps = gather_tables(n, rows, v_src, v_tgt, with_map, seed)
    want = gather_teacher_rows(ids, logits, source_rows, fallback, maps, k=12, logits_dtype=logits_dtype, backend="torch")
    on = [[t.to(device) for t in ids], [t.to(device) for t in logits], source_rows.to(device), fallback.to(device),
          [None if m is None else m.to(device) for m in maps]]
    with no_host_sync(device):
        got = gather_teacher_rows(*on, k=12, logits_dtype=logits_dtype, backend=_backend(device))
    assert got[0].shape == (2, n, 12) and got[0].dtype == torch.int32 and got[1].dtype == logits_dtype
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    assert bool((got[0][:, :, 10:] == -1).all())


def _gather_case(with_map: bool, device: torch.device) -> None:
    dtype = torch.bfloat16 if with_map else torch.float32
    if device.type == "cuda":
        check_gather(device, n=8192, rows=4096, v_src=32_000, v_tgt=32_000, with_map=with_map, logits_dtype=dtype, seed=60)
    else:
        check_gather(device, n=50, rows=20, v_src=40, v_tgt=30, with_map=with_map, logits_dtype=dtype, seed=60)


@pytest.mark.cuda
@pytest.mark.parametrize("with_map", [True, False], ids=["map", "no-map"])
def test_cuda_gather_teacher_rows_without_host_sync(with_map):
    _gather_case(with_map, CUDA)


@interpreted
@pytest.mark.parametrize("with_map", [True, False], ids=["map", "no-map"])
def test_cpu_twin_gather_teacher_rows(with_map):
    _gather_case(with_map, CPU)
