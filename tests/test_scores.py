"""CE scores (MinCE / AvgCE) against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from fusellm_kernels.pipeline.scores import (
    block_score_per_byte,
    block_score_reference,
    document_scores,
    record_score,
    rows_nll_and_bytes,
)
from fusellm_kernels.store.records import DocIndex, TeacherRecord


def record(nll: list[float], token_bytes: list[int]) -> TeacherRecord:
    t = len(nll)
    return TeacherRecord(doc_id=0, text_hash=0, flags=0, input_ids=torch.zeros(t, dtype=torch.int64),
                         topk_ids=torch.zeros(t, 2, dtype=torch.int64), topk_logits=torch.zeros(t, 2),
                         nll=torch.tensor(nll), token_bytes=torch.tensor(token_bytes, dtype=torch.int32),
                         lse=None, nll_sum=float(sum(nll)))


def test_document_scores_by_hand() -> None:
    idx = DocIndex(
        doc_ids=torch.arange(4),
        text_hash=torch.zeros(4, dtype=torch.int64),
        flags=torch.zeros(4, dtype=torch.uint8),
        offsets=torch.tensor([0, 4, 5, 5, 8]),  # lengths 4, 1, 0, 3
        nll_sum=torch.tensor([2.0, 0.0, 0.0, 1.5], dtype=torch.float64),
        predicted_bytes=torch.tensor([10, 0, 0, 3]),
    )
    ref = document_scores(idx, "reference")
    per_byte = document_scores(idx)  # the default
    assert ref[0] == pytest.approx(2 / 3) and ref[3] == pytest.approx(0.75)
    assert per_byte[0] == pytest.approx(0.2) and per_byte[3] == pytest.approx(0.5)
    assert all(math.isnan(float(x)) for x in (ref[1], ref[2], per_byte[1], per_byte[2]))
    with pytest.raises(ValueError, match="per_byte"):
        document_scores(idx, "per_token")  # type: ignore[arg-type]


def test_record_scores_and_block_parts_by_hand() -> None:
    r = record([1.0, 2.0, 3.0, 0.0], [5, 1, 2, 0])  # x_0 covers 5 bytes, EOS covers none
    assert record_score(r, "reference") == pytest.approx(6 / 3)
    assert record_score(r, "per_byte") == pytest.approx(6 / 3)  # predicted bytes: 1 + 2 + 0
    assert rows_nll_and_bytes(r, 1, 3) == (5.0, 2, 2)  # rows 1, 2 predict x_2 (2 B) and EOS (0 B)
    assert rows_nll_and_bytes(r, 0, 100) == (6.0, 3, 3)  # the last row predicts nothing
    assert rows_nll_and_bytes(r, 3, 4) == (0.0, 0, 0)
    assert math.isnan(record_score(record([0.0], [4]), "per_byte"))


def test_block_scores_by_hand() -> None:
    # the reference: token-weighted mean of per-document CEs; NaN documents left out
    assert block_score_reference(torch.tensor([1.0, 2.0, float("nan")]), torch.tensor([3, 1, 5])) == pytest.approx(1.25)
    assert math.isnan(block_score_reference(torch.tensor([float("nan")]), torch.tensor([3])))
    # per byte: total NLL over total predicted bytes of the block's parts
    assert block_score_per_byte(torch.tensor([5.0, 1.0]), torch.tensor([2, 4])) == pytest.approx(1.0)
    assert math.isnan(block_score_per_byte(torch.tensor([1.0]), torch.tensor([0])))


def test_per_byte_is_comparable_across_tokenizers() -> None:
    """The same text, the same total NLL: a tokenizer that cuts it into twice as many tokens
    halves the per-token score but not the per-byte score."""
    coarse = record([4.0, 4.0, 0.0], [4, 4, 4])
    fine = record([2.0, 2.0, 2.0, 2.0, 0.0], [4, 2, 2, 2, 2])
    assert record_score(fine, "reference") == pytest.approx(record_score(coarse, "reference") / 2)
    assert record_score(fine, "per_byte") == pytest.approx(record_score(coarse, "per_byte"))
