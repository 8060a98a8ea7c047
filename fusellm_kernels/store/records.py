"""Record types shared by the teacher store, the alignment stage and the trainer.

Everything a later stage needs from a teacher pass travels in these frozen dataclasses, with
shapes and dtypes stated here once. Readers always return the wide, computation-friendly
dtypes below whatever the on-disk encoding is (see `fusellm_kernels.store.format`).

Positions. A document tokenised by one model is T tokens ``x_0 .. x_{T-1}`` (text tokens plus
the configured BOS/EOS). Row ``t`` holds the model's prediction *for the next token*
``x_{t+1}``, exactly as the model's logits row ``t`` does: the top-k, the log-sum-exp and the
NLL of row ``t`` all describe ``p(. | x_0 .. x_t)``. The last row (``t = T - 1``) has a top-k
and a log-sum-exp but nothing to predict, so its NLL is stored as 0 and it is not counted in
any score.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor


class DocFlag(enum.IntFlag):
    """Per-document flags (stored as one uint8 per document)."""

    NONE = 0
    #: a logits row of the document held NaN or +inf, or -inf within its top-k
    NONFINITE = 1
    #: the document was longer than the context and tokens past it were dropped
    TRUNCATED = 2
    #: the document was longer than the context and ran as several independent windows;
    #: the first row of every window after the first sees no earlier context
    WINDOWED = 4
    #: empty or whitespace-only text
    EMPTY = 8


@dataclass(frozen=True)
class TeacherRecord:
    """One model's teacher data for one document (T tokens, k kept logits per row).

    doc_id: the corpus's stable document id (``fusellm prepare`` assigns it).
    text_hash: 63-bit hash of the document text; two models' records pair only when both
        ``doc_id`` and ``text_hash`` agree.
    flags: `DocFlag` bits.
    input_ids: int64 [T], the model's own tokens (BOS/EOS included when configured).
    topk_ids: int64 [T, k], vocabulary ids sorted by descending logit.
    topk_logits: float32 [T, k], raw logits (no temperature), descending.
    nll: float32 [T], ``nll[t] = -log p(x_{t+1} | x_<=t)``; ``nll[T-1] = 0``.
    token_bytes: int32 [T], UTF-8 bytes of text each token covers; special tokens cover 0.
        The values partition the text: ``token_bytes.sum() == len(text.encode())`` for an
        untruncated document. Where a byte-level tokenizer splits one character over
        several tokens, the character's bytes are counted on the first of them.
    lse: float32 [T] or None, log-sum-exp of the row's full-vocabulary logits (kept when
        the pass ran with ``store_lse``): ``exp(topk_logits - lse[:, None])`` are the top-k's
        true probabilities and ``1 - their sum`` is the tail mass.
    nll_sum: float64 scalar, the sum of ``nll`` computed in float32 before storage (exact
        whatever the stored nll dtype); the CE scores use it.
    """

    doc_id: int
    text_hash: int
    flags: int
    input_ids: Tensor
    topk_ids: Tensor
    topk_logits: Tensor
    nll: Tensor
    token_bytes: Tensor
    lse: Tensor | None
    nll_sum: float

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_predicted(self) -> int:
        """Rows with a next token to predict: T - 1 (0 for an empty record)."""
        return max(self.num_tokens - 1, 0)

    @property
    def predicted_bytes(self) -> int:
        """Bytes of text in the predicted tokens x_1 .. x_{T-1} (the per-byte CE's denominator)."""
        return int(self.token_bytes[1:].sum()) if self.num_tokens > 1 else 0


@dataclass(frozen=True)
class DocIndex:
    """Which rows of a ragged array belong to which document (one shard, D documents).

    doc_ids: int64 [D], stable corpus ids, in shard order.
    text_hash: int64 [D].
    flags: uint8 [D], `DocFlag` bits.
    offsets: int64 [D + 1], document d owns rows ``offsets[d]:offsets[d+1]``; offsets[0] = 0.
    nll_sum: float64 [D], per-document sums of the float32 NLL of predicted rows.
    predicted_bytes: int64 [D], bytes of text of each document's predicted tokens.
    """

    doc_ids: Tensor
    text_hash: Tensor
    flags: Tensor
    offsets: Tensor
    nll_sum: Tensor
    predicted_bytes: Tensor

    def __post_init__(self) -> None:
        d = self.doc_ids.shape[0]
        if self.offsets.shape != (d + 1,):
            raise ValueError(f"offsets has shape {tuple(self.offsets.shape)}; expected ({d + 1},)")
        for name in ("text_hash", "flags", "nll_sum", "predicted_bytes"):
            if getattr(self, name).shape != (d,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}; expected ({d},)")

    @property
    def num_docs(self) -> int:
        return int(self.doc_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> Tensor:
        """int64 [D], tokens per document."""
        return self.offsets[1:] - self.offsets[:-1]

    def num_predicted(self) -> Tensor:
        """int64 [D], predicted rows per document (T - 1, at least 0)."""
        return (self.lengths() - 1).clamp_min(0)


def empty_doc_index() -> DocIndex:
    return DocIndex(
        doc_ids=torch.zeros(0, dtype=torch.int64),
        text_hash=torch.zeros(0, dtype=torch.int64),
        flags=torch.zeros(0, dtype=torch.uint8),
        offsets=torch.zeros(1, dtype=torch.int64),
        nll_sum=torch.zeros(0, dtype=torch.float64),
        predicted_bytes=torch.zeros(0, dtype=torch.int64),
    )
