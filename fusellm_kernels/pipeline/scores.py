"""CE scores that rank candidate models for MinCE / AvgCE, defined once here.

Notation: a document tokenised by model m is x_0 .. x_{T-1}; row t holds
``nll_t = -log p_m(x_{t+1} | x_<=t)`` for the T - 1 predicted tokens x_1 .. x_{T-1}; ``b_t``
is the number of UTF-8 bytes of text token x_t covers (0 for BOS/EOS).

``reference`` (the original's score, kept for reproducing published numbers):
    document:  CE_d = (sum_t nll_t) / (T - 1)               mean NLL per own predicted token
    block:     CE_B = sum_d n_d CE_d / sum_d n_d            token-weighted mean over the
               documents in a packed block, n_d = the document's tokens in the block.
    Not comparable across tokenizers: a finer tokenizer predicts more, easier tokens for the
    same text and scores lower per token without being a better model.

``per_byte`` (the default for new runs):
    document:  CE_d = (sum_t nll_t) / (sum_{t>=1} b_t)      nats per byte of predicted text
    block:     CE_B = sum over the block's rows of nll / sum of the bytes they predict.
    Every model predicts the same text, so the denominators agree up to the first token and
    the score compares models on equal terms (it is the bits-per-byte measure, in nats). The
    EOS prediction adds its NLL and no bytes, the same for every model that appends EOS.

A score is NaN where its denominator is 0 (a document with fewer than two tokens, or only
special tokens). Scores are float64; the per-document NLL sums come from the float32
computation, not from the stored (possibly float16) per-row NLL.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fusellm_kernels.store.records import DocIndex, TeacherRecord

ScoreMode = Literal["per_byte", "reference"]
SCORE_MODES: tuple[str, ...] = ("per_byte", "reference")


def _check(mode: str) -> None:
    if mode not in SCORE_MODES:
        raise ValueError(f"score mode must be one of {SCORE_MODES}, got {mode!r}")


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))


def document_scores(index: DocIndex, mode: ScoreMode = "per_byte") -> Tensor:
    """float64 [D]: the CE score of every document of a shard (see the module docstring)."""
    _check(mode)
    den = index.predicted_bytes if mode == "per_byte" else index.num_predicted()
    return _ratio(index.nll_sum, den)


def record_score(record: TeacherRecord, mode: ScoreMode = "per_byte") -> float:
    """The CE score of one document record."""
    _check(mode)
    den = record.predicted_bytes if mode == "per_byte" else record.num_predicted
    return record.nll_sum / den if den > 0 else float("nan")


def rows_nll_and_bytes(record: TeacherRecord, start: int, end: int) -> tuple[float, int, int]:
    """(NLL sum, predicted rows, predicted bytes) of rows start..end-1 of a record, as placed
    in a packed block; the last row of the document predicts nothing and adds nothing."""
    end = min(end, record.num_predicted)
    if end <= start:
        return 0.0, 0, 0
    nll = float(record.nll[start:end].double().sum())
    return nll, end - start, int(record.token_bytes[start + 1 : end + 1].sum())


def block_score_reference(doc_scores: Tensor, tokens_in_block: Tensor) -> float:
    """The original's block score: the token-weighted mean of per-document CEs (reference
    mode's ``document_scores``), weights = each document's tokens in the block. Documents
    with a NaN score (nothing predicted) are left out."""
    s, w = doc_scores.double(), tokens_in_block.double()
    ok = ~torch.isnan(s) & (w > 0)
    if not bool(ok.any()):
        return float("nan")
    return float((s[ok] * w[ok]).sum() / w[ok].sum())


def block_score_per_byte(nll_sums: Tensor, predicted_bytes: Tensor) -> float:
    """Per-byte block score from each part's (NLL sum, predicted bytes) in the block."""
    den = float(predicted_bytes.double().sum())
    return float(nll_sums.double().sum()) / den if den > 0 else float("nan")
