"""Aligned teacher rows from a candidate's stored top-k in PyTorch (same rule as
`ops/teacher_gather.py`, whose header states it)."""
from __future__ import annotations

import torch
from torch import Tensor


def teacher_gather_torch(
    topk_ids: Tensor, topk_logits: Tensor, source_rows: Tensor, fallback_id: Tensor, vocab_map: Tensor | None,
    out_ids: Tensor, out_logits: Tensor,
) -> None:
    n, k_out = out_ids.shape
    kc = min(topk_ids.shape[1], k_out)
    take = source_rows >= 0
    src = torch.where(take, source_rows, 0)
    if topk_ids.shape[0] == 0:  # no stored row is referenced: every row is a fallback or empty
        ids = torch.full((n, kc), -1, dtype=torch.int64, device=out_ids.device)
        logits = torch.zeros(n, kc, dtype=torch.float32, device=out_ids.device)
    else:
        ids = topk_ids[src, :kc].long()
        logits = topk_logits[src, :kc].float()
    if vocab_map is not None:
        known = (ids >= 0) & (ids < vocab_map.shape[0])
        ids = torch.where(known, vocab_map[torch.where(known, ids, 0)].long(), -1)
    ids = torch.where(take[:, None], ids, -1)
    logits = torch.where(take[:, None], logits, 0.0)
    out_ids.fill_(-1)
    out_logits.zero_()
    out_ids[:, :kc] = ids.to(out_ids.dtype)
    out_logits[:, :kc] = logits.to(out_logits.dtype)
    one_hot = ~take & (fallback_id >= 0)
    out_ids[:, 0] = torch.where(one_hot, fallback_id.to(out_ids.dtype), out_ids[:, 0])
    out_logits[:, 0] = torch.where(one_hot, torch.ones_like(out_logits[:, 0]), out_logits[:, 0])
