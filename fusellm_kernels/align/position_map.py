"""Per-document position maps: which source position's top-k each target row takes.

The original's rule (its `transform_step_logits`): target row i takes the top-k of source
position j when j is the only source position the DTW maps to i and the two token strings
agree (hard: equal after replacing the source marker by the target marker; soft: equal, or
the soft vocabulary map sends the source string to the target string). Any other row gets a
one-hot teacher: logit 1.0 on a target id. The original puts it on the row's *current*
token, although row i predicts token i+1; the default here is that next token.

The map holds indices only; the gather turns it into teacher ids and logits. The gather,
not this map, also handles a matched row whose top-k has no target counterpart at all (the
original gives that row the target model's own distribution).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Mapping, Sequence

import numpy as np

from fusellm_kernels.align.conventions import TokenizerConventions, token_text
from fusellm_kernels.align.min_ed import dtw_mappings, min_ed_alignment
from fusellm_kernels.align.vocab_map import replace_marker


@dataclasses.dataclass(frozen=True)
class PositionMap:
    """Where each of a document's T target rows gets its teacher from one source.

    source_pos: int32 [T], the source position whose top-k row i takes, -1 when none.
    fallback_id: int32 [T], for rows with source_pos = -1 the target id of the one-hot
      fallback (logit 1.0), -1 for no teacher at all (the last row under `next`); -1 on
      rows with a source position.
    """

    source_pos: np.ndarray
    fallback_id: np.ndarray

    def __post_init__(self) -> None:
        for field in ("source_pos", "fallback_id"):
            value = getattr(self, field)
            if not isinstance(value, np.ndarray) or value.dtype != np.int32 or value.ndim != 1:
                raise TypeError(f"PositionMap.{field} must be a 1-D int32 numpy array, got {value!r:.80}")
        if self.source_pos.shape != self.fallback_id.shape:
            raise ValueError(
                f"PositionMap: source_pos {self.source_pos.shape} and fallback_id {self.fallback_id.shape} differ"
            )

    def __len__(self) -> int:
        return int(self.source_pos.shape[0])

    @property
    def aligned_fraction(self) -> float:
        """The fraction of rows that take a source distribution (1.0 for an empty document)."""
        return float((self.source_pos >= 0).mean()) if len(self) else 1.0


def position_map(
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    target_ids: Sequence[int] | np.ndarray,
    *,
    source_marker: str,
    target_marker: str,
    vocab_align: Literal["hard", "soft"] = "hard",
    soft_lookup: Mapping[str, str] | None = None,
    fallback: Literal["next", "current"] = "next",
    reference: bool = False,
    source_is_byte_level: bool = False,
    normalization: Literal["markers", "text"] = "markers",
    source_conventions: TokenizerConventions | None = None,
    target_conventions: TokenizerConventions | None = None,
    alignment: Sequence[Sequence[int]] | None = None,
) -> PositionMap:
    """The position map of one document (T = len(target_tokens) rows).

    source_tokens / target_tokens: the document's two tokenizations as token strings;
      target_ids: the target token ids (the fallback ids).
    vocab_align: the agreement test, `hard` or `soft` (then `soft_lookup` is required: the
      source token with its marker replaced -> target token, see `align.soft_lookup`).
    fallback: `next` (row i predicts token i+1; no teacher on the last row) or `current`
      (the original's off-by-one: token i).
    reference: also reproduce the original's position-0 special case: for a byte-level
      source (`source_is_byte_level`; the original tests for GPT-2 / GPT-NeoX tokenizer
      classes), when the first target token starts with the target marker and the first
      matched source token does not, the marker is prepended before comparing.
    normalization: `markers` (the original: DTW on marker-stripped strings, strings compared
      after marker replacement) or `text` (DTW on `token_text` of each side, which needs
      both conventions, and strings that agree as text also count as agreeing).
    alignment: a precomputed alignment (for each target position, its source positions).
    """
    if vocab_align not in ("hard", "soft"):
        raise ValueError(f"vocab_align must be 'hard' or 'soft', got {vocab_align!r}")
    if vocab_align == "soft" and soft_lookup is None:
        raise ValueError("vocab_align='soft' needs soft_lookup (see fusellm_kernels.align.soft_lookup)")
    if fallback not in ("next", "current"):
        raise ValueError(f"fallback must be 'next' or 'current', got {fallback!r}")
    if normalization not in ("markers", "text"):
        raise ValueError(f"normalization must be 'markers' or 'text', got {normalization!r}")
    t = len(target_tokens)
    ids = np.asarray(target_ids, dtype=np.int64)
    if ids.shape != (t,):
        raise ValueError(f"target_ids has shape {ids.shape}, expected ({t},) like target_tokens")

    source_text: list[str] = []
    target_text: list[str] = []
    if normalization == "text":
        if source_conventions is None or target_conventions is None:
            raise ValueError("normalization='text' needs source_conventions and target_conventions")
        source_text = [token_text(s, source_conventions) for s in source_tokens]
        target_text = [token_text(x, target_conventions) for x in target_tokens]
    if alignment is None:
        if normalization == "text":
            alignment = dtw_mappings(source_text, target_text)
        else:
            alignment = min_ed_alignment(
                source_tokens, target_tokens, source_marker=source_marker, target_marker=target_marker
            )
    if len(alignment) != t:
        raise ValueError(f"alignment has {len(alignment)} rows, expected {t} (one per target token)")

    source_pos = np.full(t, -1, dtype=np.int32)
    for i, positions in enumerate(alignment):
        if len(positions) != 1:
            continue
        j = positions[0]
        target_token = target_tokens[i]
        source_token = replace_marker(source_tokens[j], source_marker, target_marker)
        if (
            reference
            and source_is_byte_level
            and i == 0
            and target_token.startswith(target_marker)
            and not source_token.startswith(target_marker)
        ):
            source_token = target_marker + source_token
        agree = source_token == target_token
        if not agree and normalization == "text":
            agree = source_text[j] == target_text[i]
        if not agree and vocab_align == "soft":
            agree = soft_lookup.get(source_token) == target_token  # type: ignore[union-attr]
        if agree:
            source_pos[i] = j

    if fallback == "next":
        fallback_id = np.full(t, -1, dtype=np.int64)
        fallback_id[:-1] = ids[1:]
    else:
        fallback_id = ids.copy()
    fallback_id[source_pos >= 0] = -1
    return PositionMap(source_pos=source_pos, fallback_id=fallback_id.astype(np.int32))
