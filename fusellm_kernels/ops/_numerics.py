"""Numerics shared by the Triton ops: how an fp32 result becomes the stored dtype."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def to_stored_dtype(x, ptr, RNE_BF16: tl.constexpr):
    """x (fp32) in the element type of `ptr`, rounded to nearest even.

    GPUs round fp32 → bf16 to nearest even; the Triton interpreter truncates. Under the
    interpreter (RNE_BF16) the rounding is done on the bits first, so the CPU tests see the
    GPU's numbers: the result is exact in bf16 and any conversion keeps it.
    """
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


def needs_rne_bf16(out: Tensor) -> bool:
    """Whether stores into `out` need the bit-level rounding of `to_stored_dtype` (the interpreter and bf16)."""
    return out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
