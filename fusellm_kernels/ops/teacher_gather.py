"""Aligned teacher rows from a candidate's stored top-k: Triton kernel → launcher.

For target row n of a batch and one candidate (top-k table T_ids, T_logits [R, k_c], the
candidate's rows of the documents in the batch, and vocab map M: source id → target id or −1):
    r = source_rows[n] ≥ 0:  ids[n, j] = M[T_ids[r, j]] (−1 where unmapped), logits[n, j] = T_logits[r, j]
    r < 0, fallback_id[n] ≥ 0: the one-hot fallback: ids[n] = [fallback_id[n], −1, ...], logits[n, 0] = 1.0
    otherwise: no teacher at row n (every id −1).
Slots j ≥ k_c are −1. Duplicate target ids are left in place: the loss keeps the first
(highest-logit) slot of an id, which is the original's rule. No gradient.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from fusellm_kernels.ops._numerics import needs_rne_bf16, to_stored_dtype
from fusellm_kernels.ops.launch_config import device_spec, teacher_gather_launch


@triton.jit
def _teacher_gather_kernel(
    topk_ids_ptr, topk_logits_ptr, rows_ptr, fallback_ptr, map_ptr, out_ids_ptr, out_logits_ptr,
    stride_tr, stride_tk, stride_lr, stride_lk, stride_oi_n, stride_oi_k, stride_ol_n, stride_ol_k,
    N, KC, K_OUT, V_SRC,
    HAS_MAP: tl.constexpr, BLOCK_N: tl.constexpr, K_P: tl.constexpr, RNE_BF16: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, K_P)
    row_ok = n < N
    src = tl.load(rows_ptr + n, mask=row_ok, other=-1).to(tl.int64)
    fallback = tl.load(fallback_ptr + n, mask=row_ok, other=-1).to(tl.int32)
    take = (src >= 0)[:, None] & (k < KC)[None, :]
    ids = tl.load(topk_ids_ptr + src[:, None] * stride_tr + k[None, :] * stride_tk, mask=take, other=-1).to(tl.int32)
    logits = tl.load(topk_logits_ptr + src[:, None] * stride_lr + k[None, :] * stride_lk, mask=take, other=0.0).to(tl.float32)
    if HAS_MAP:
        ids = tl.load(map_ptr + ids, mask=take & (ids >= 0) & (ids < V_SRC), other=-1).to(tl.int32)
    one_hot = (src < 0)[:, None] & (k == 0)[None, :]
    ids = tl.where(take, ids, tl.where(one_hot, fallback[:, None], -1))
    logits = tl.where(take, logits, tl.where(one_hot & (fallback >= 0)[:, None], 1.0, 0.0))
    out = row_ok[:, None] & (k < K_OUT)[None, :]
    tl.store(out_ids_ptr + n[:, None] * stride_oi_n + k[None, :] * stride_oi_k, ids, mask=out)
    tl.store(out_logits_ptr + n[:, None] * stride_ol_n + k[None, :] * stride_ol_k,
             to_stored_dtype(logits, out_logits_ptr, RNE_BF16), mask=out)


def teacher_gather_triton(
    topk_ids: Tensor, topk_logits: Tensor, source_rows: Tensor, fallback_id: Tensor, vocab_map: Tensor | None,
    out_ids: Tensor, out_logits: Tensor,
) -> None:
    """Fill out_ids [N, K] int32 and out_logits [N, K] (K ≥ k_c) for one candidate.

    topk_ids [R, k_c] int, topk_logits [R, k_c] float, source_rows [N] int64 (row of the table
    or −1), fallback_id [N] int32 (−1: none), vocab_map [V_src] int32 or None (identity).
    No extra memory.
    """
    n, k_out = out_ids.shape
    if n == 0:
        return
    kc = topk_ids.shape[1]
    cfg = teacher_gather_launch(n, device_spec(out_ids.device))
    vmap = vocab_map if vocab_map is not None else fallback_id  # never read without HAS_MAP
    _teacher_gather_kernel[(cfg.grid,)](
        topk_ids, topk_logits, source_rows, fallback_id, vmap, out_ids, out_logits,
        topk_ids.stride(0), topk_ids.stride(1), topk_logits.stride(0), topk_logits.stride(1),
        out_ids.stride(0), out_ids.stride(1), out_logits.stride(0), out_logits.stride(1),
        n, kc, k_out, vmap.shape[0],
        HAS_MAP=vocab_map is not None, RNE_BF16=needs_rne_bf16(out_logits), BLOCK_N=cfg.block, K_P=triton.next_power_of_2(max(kc, k_out)),
        num_warps=cfg.num_warps, maxnreg=cfg.maxnreg,
    )
