"""The suite's one tolerance policy.

- float32 results against a float64 reference: tight, relative to the reference's scale.
- bf16/fp16 results: the error against the float64 reference may be at most twice the error
  of PyTorch's own computation in the same dtype (plus a tiny floor for exact cases).
"""
from __future__ import annotations

import torch
from torch import Tensor


def max_err(x: Tensor, ref: Tensor) -> float:
    x, ref = x.detach(), ref.detach()
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert bool(torch.isfinite(x).all()), "NaN or inf in a result"
    return float((x.double() - ref.double()).abs().max()) if x.numel() else 0.0


def assert_close_fp32(x: Tensor, ref: Tensor, *, rtol: float = 2e-5, what: str = "") -> None:
    scale = float(ref.detach().double().abs().max()) if ref.numel() else 0.0
    err = max_err(x, ref)
    assert err <= rtol * max(scale, 1.0), f"{what}: max error {err:.3e} against scale {scale:.3e}"


def assert_close_lowp(x: Tensor, ref: Tensor, torch_same_dtype: Tensor, *, what: str = "") -> None:
    err = max_err(x, ref)
    torch_err = max_err(torch_same_dtype, ref)
    scale = float(ref.detach().double().abs().max()) if ref.numel() else 0.0
    floor = 1e-6 * max(scale, 1.0)
    assert err <= 2 * torch_err + floor, f"{what}: error {err:.3e} > 2 x PyTorch's same-dtype error {torch_err:.3e}"


def assert_close(x: Tensor, ref: Tensor, torch_same_dtype: Tensor | None = None, *, what: str = "") -> None:
    """float32 → tight check; bf16/fp16 (x's dtype or the inputs') → the 2x rule."""
    if torch_same_dtype is None:
        assert_close_fp32(x, ref, what=what)
    else:
        assert_close_lowp(x, ref, torch_same_dtype, what=what)
