"""Training batches from assembled blocks: the loss's teacher tensors built on the device.

For a batch of blocks, each candidate's stored top-k rows of the documents in the batch are
read from its teacher store (memory-mapped, one document at a time) into one small table;
the blocks' position maps are turned into rows of that table and `gather_teacher_rows`
builds teacher_ids / teacher_logits [S, B·L, K] on the device. Nothing dense, nothing padded
is ever stored.

A candidate aligned with `fusellm align --method pta` brings its own table: the alignment's
aligned rows (`AlignmentStore.teacher_rows`, already target ids, one row per target row), so
every real row takes its own document row of that table, with no vocabulary map and no
fallback (the one-hot fallbacks are rows of the table). Its rows are the plan's normalised
distribution, so they have no top-k tail: its lse is NaN everywhere (renormalised).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fusellm_kernels.functional import gather_teacher_rows
from fusellm_kernels.store.alignment import AlignmentStore
from fusellm_kernels.store.blocks import Block
from fusellm_kernels.store.format import TeacherStore
from fusellm_kernels.store.records import TeacherRecord

Weighting = Literal["block", "document", "token"]
WEIGHTINGS: tuple[str, ...] = ("block", "document", "token")


class MissingLseError(ValueError):
    """A candidate's teacher store holds no log-sum-exp but the loss needs it."""


@dataclass(frozen=True)
class TrainBatch:
    """Everything one step needs, on one device (B blocks of L rows, S candidates, K slots).

    input_ids, labels: int64 [B, L] (labels: the next token, −100 where none).
    position_ids: int64 [B, L], restarting at 0 at every document piece (for packed/varlen
        attention; models without it see the block as one sequence).
    segment_ids: int64 [B·L], non-decreasing: one weighting decision per block, document
        piece or token, as chosen.
    doc_index: int64 [B, L], the piece of each row within its block (−1 padding).
    teacher_ids: int32 [S, B·L, K]; teacher_logits: float32 [S, B·L, K]; teacher_ce: float32 [S, B·L].
    attention_mask: bool [B, L], real (non-padding) rows.
    teacher_lse: float32 [S, B·L], each candidate's stored full-vocabulary log-sum-exp of the
        row it took (NaN at fallback and empty rows), or None (asked for with `with_lse`).
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    segment_ids: Tensor
    doc_index: Tensor
    attention_mask: Tensor
    teacher_ids: Tensor
    teacher_logits: Tensor
    teacher_ce: Tensor
    teacher_lse: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.labels.numel())


def _segments(doc_index: Tensor, weighting: str) -> Tensor:
    b, length = doc_index.shape
    if weighting == "token":
        return torch.arange(b * length)
    block = torch.arange(b)[:, None].expand(b, length)
    if weighting == "block":
        return block.reshape(-1).clone()
    piece = torch.where(doc_index >= 0, doc_index, length).long()  # padding after the block's last piece
    return (block * (length + 1) + piece).reshape(-1)


def _positions(doc_index: Tensor) -> Tensor:
    b, length = doc_index.shape
    rows = torch.arange(length).expand(b, length)
    starts = torch.cat([torch.ones(b, 1, dtype=torch.bool), doc_index[:, 1:] != doc_index[:, :-1]], dim=1)
    first = torch.cummax(torch.where(starts, rows, 0), dim=1).values
    return rows - first


def build_batch(
    blocks: Sequence[Block],
    stores: Sequence[TeacherStore | AlignmentStore],
    vocab_maps: Sequence[Tensor | None],
    *,
    weighting: Weighting = "document",
    k: int | None = None,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    empty_to_target: bool = False,
    with_lse: bool = False,
) -> TrainBatch:
    """Stack blocks and build their teacher tensors. stores[s] / vocab_maps[s] belong to
    candidate s of the blocks (vocab map None for the target model itself). A candidate
    aligned with `--method pta` gives its aligned-rows `AlignmentStore` (vocab map None)
    instead of its teacher store (module docstring).

    with_lse: also gather each row's stored lse by the same source rows (`teacher_tail="bucket"`);
    a store made without `fusellm teacher --store-lse` is refused.

    empty_to_target: the original's rule for an aligned row none of whose top-k ids has a
    target counterpart: it takes candidate 0's (the target model's) distribution. Off, such
    a row simply has no distribution from that candidate.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; choose one of {WEIGHTINGS}")
    s_count = blocks[0].source_pos.shape[0]
    if len(stores) != s_count or len(vocab_maps) != s_count:
        raise ValueError(f"the blocks have {s_count} candidates but {len(stores)} stores and {len(vocab_maps)} vocab maps were given")
    device = torch.device(device)
    doc_index = torch.stack([blk.doc_index for blk in blocks]).long()
    b, length = doc_index.shape

    tables_ids, tables_logits, tables_lse, source_rows, paired = [], [], [], [], []
    for s in range(s_count):
        src = stores[s]
        aligned_rows = isinstance(src, AlignmentStore)
        if aligned_rows and vocab_maps[s] is not None:
            raise ValueError(f"candidate {s}'s aligned rows are already target ids; give it vocab map None")
        tables: dict[int, tuple[Tensor, Tensor]] = {}  # per document: its top-k ids and logits
        records: dict[int, TeacherRecord] = {}
        base: dict[int, int] = {}
        rows_s, paired_s = [], []
        total = 0
        for blk in blocks:
            piece_base = []
            for doc_id in blk.doc_ids.tolist():
                if doc_id not in base:
                    try:
                        if aligned_rows:
                            tables[doc_id] = src.teacher_rows(doc_id)  # type: ignore[union-attr]
                        else:
                            records[doc_id] = src.get(doc_id)  # type: ignore[assignment]
                            tables[doc_id] = (records[doc_id].topk_ids, records[doc_id].topk_logits)
                    except KeyError:
                        what = "aligned rows" if aligned_rows else "teacher store"
                        raise KeyError(f"document {doc_id} of the blocks is missing from candidate {s}'s {what} {src.root}") from None
                    base[doc_id] = total
                    total += tables[doc_id][0].shape[0]  # one table row per target (or source) token
                piece_base.append(base[doc_id])
            pb = torch.tensor(piece_base + [0], dtype=torch.int64)  # index −1 (padding) reads the 0
            sp = blk.source_pos[s].long()
            if aligned_rows:  # the document's own row of the table: its target row (candidate 0's position)
                rows_s.append(torch.where(blk.doc_index >= 0, pb[blk.doc_index.long()] + blk.source_pos[0].long(), -1))
            else:
                rows_s.append(torch.where(sp >= 0, pb[blk.doc_index.long()] + sp, -1))
            paired_s.append(sp >= 0)
        width = src.manifest["pta"]["width"] if aligned_rows else src.k  # type: ignore[union-attr]
        docs = list(tables.values())
        tables_ids.append(torch.cat([t[0] for t in docs]) if docs else torch.zeros(0, width, dtype=torch.int64))
        tables_logits.append(torch.cat([t[1] for t in docs]) if docs else torch.zeros(0, width))
        paired.append(torch.stack(paired_s).reshape(-1))
        recs = list(records.values())
        if with_lse and aligned_rows:
            tables_lse.append(torch.full((total,), float("nan")))  # the plan's rows: renormalised, no tail
        elif with_lse:
            if any(r.lse is None for r in recs):
                raise MissingLseError(
                    f"candidate {s}'s teacher store {src.root} has no log-sum-exp: --teacher-tail bucket needs "
                    "one; run `fusellm teacher` for that model again with --store-lse (or use --teacher-tail renormalize)")
            tables_lse.append(torch.cat([r.lse for r in recs]) if recs else torch.zeros(0))
        source_rows.append(torch.stack(rows_s).reshape(-1))

    fallback = torch.stack([blk.fallback_id for blk in blocks], dim=1).reshape(s_count, -1)
    for s, src in enumerate(stores):
        if isinstance(src, AlignmentStore):
            fallback[s] = -1  # its fallbacks are rows of its table already
    teacher_ids, teacher_logits = gather_teacher_rows(
        [t.to(device) for t in tables_ids], [t.to(device) for t in tables_logits],
        torch.stack(source_rows).to(device), fallback.to(device),
        [None if m is None else m.to(device) for m in vocab_maps], k=k, backend=backend,
    )
    teacher_lse = None
    if with_lse:
        # by the gather's rows: NaN where a row takes no stored row (a one-hot fallback renormalises)
        teacher_lse = torch.stack([
            torch.where(rows >= 0, table[rows.clamp_min(0)] if table.numel() else torch.zeros(rows.shape), float("nan"))
            for table, rows in zip(tables_lse, source_rows)
        ]).float().to(device)
    if empty_to_target:
        # a paired row (source_pos ≥ 0; for aligned rows not every row with a table row is one)
        rows = torch.stack(paired).to(device)
        for s in range(1, s_count):
            empty = (rows[s] & (teacher_ids[s] < 0).all(-1))[:, None]
            teacher_ids[s] = torch.where(empty, teacher_ids[0], teacher_ids[s])
            teacher_logits[s] = torch.where(empty, teacher_logits[0], teacher_logits[s])
            if teacher_lse is not None:
                teacher_lse[s] = torch.where(empty[:, 0], teacher_lse[0], teacher_lse[s])
    if weighting == "block":
        teacher_ce = torch.stack([blk.block_ce for blk in blocks], dim=1)[:, :, None].expand(s_count, b, length)
    else:
        doc_ce = torch.stack([blk.doc_ce for blk in blocks], dim=1)
        teacher_ce = doc_ce
        if weighting == "token":
            token_ce = torch.stack([blk.token_ce for blk in blocks], dim=1)
            teacher_ce = torch.where(torch.isfinite(token_ce), token_ce, doc_ce)  # unaligned rows: the document's score
    return TrainBatch(
        input_ids=torch.stack([blk.input_ids for blk in blocks]).long().to(device),
        labels=torch.stack([blk.labels for blk in blocks]).long().to(device),
        position_ids=_positions(doc_index).to(device),
        segment_ids=_segments(doc_index, weighting).to(device),
        doc_index=doc_index.to(device),
        attention_mask=(doc_index >= 0).to(device),
        teacher_ids=teacher_ids,
        teacher_logits=teacher_logits,
        teacher_ce=teacher_ce.reshape(s_count, -1).float().to(device),
        teacher_lse=teacher_lse,
    )
