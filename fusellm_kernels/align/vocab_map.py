"""Vocabulary maps: source token id -> target token id, as the original builds them.

The original replaces the source's word marker by the target's (e.g. `Ġ` -> `▁`), keeps an
exact string match (`hard`), and otherwise (`soft`, MinED) takes the target token at the
smallest Levenshtein distance, the lowest target id on ties; by brute force, |V_s|·|V_t|
Python calls. Here exact matches are a dict lookup, and the rest are searched in rounds of
growing distance k = 1, 2, 4, ...: a target within distance k has a length within k, so
round k compares only against targets of those lengths, in C (`rapidfuzz.process.cdist`
with `score_cutoff=k`, whose banded algorithms are fast for small k). A source token whose
best distance d <= k is settled: every target at distance <= d was compared in that round.
"""
from __future__ import annotations

from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

def replace_marker(token: str, source_marker: str, target_marker: str) -> str:
    """The original's `token.replace(source_marker, target_marker)`; an empty source marker
    replaces nothing (Python would insert the target marker between every character)."""
    return token.replace(source_marker, target_marker) if source_marker else token


VocabLike = Mapping[str, int] | Sequence[str | None]
_QUERY_CHUNK = 512  # source strings per cdist call: bounds its [chunk, group] int32 output


def vocab_list(vocab: VocabLike) -> list[str | None]:
    """A vocabulary as a list indexed by id (None where an id has no token).

    Accepts a tokenizer's `get_vocab()` (token -> id) or such a list.
    """
    if isinstance(vocab, Mapping):
        size = max(vocab.values(), default=-1) + 1
        tokens: list[str | None] = [None] * size
        for token, index in vocab.items():
            if index < 0:
                raise ValueError(f"vocabulary id {index} of token {token!r} is negative")
            tokens[index] = token
        return tokens
    return list(vocab)


def vocab_map(
    source_vocab: VocabLike,
    target_vocab: VocabLike,
    *,
    source_marker: str,
    target_marker: str,
    kind: Literal["hard", "soft"],
    source_logits_size: int,
    target_logits_size: int | None = None,
    workers: int = 1,
) -> torch.Tensor:
    """Map every source id to a target id: int32 [source_logits_size], -1 = no target token.

    source_vocab / target_vocab: `tokenizer.get_vocab()` or a list id -> token string.
    source_logits_size: the source model's logits count, which sizes the map (it may exceed
      the tokenizer: padded vocabularies; such ids map to -1). Tokenizer ids at or beyond it
      never occur in a top-k and are not mapped.
    target_logits_size: when given, only target ids below it are candidates.
    kind: `hard` keeps the target token equal to the source token with its marker replaced
      (`source.replace(source_marker, target_marker)`); `soft` takes the target token at the
      smallest Levenshtein distance from that string, the lowest id on ties.
    workers: threads for the distance computation (-1: all cores).
    """
    if kind not in ("hard", "soft"):
        raise ValueError(f"kind must be 'hard' or 'soft', got {kind!r}")
    if source_logits_size < 0:
        raise ValueError(f"source_logits_size must be >= 0, got {source_logits_size}")
    source_tokens = vocab_list(source_vocab)[:source_logits_size]
    target_tokens = vocab_list(target_vocab)
    if target_logits_size is not None:
        target_tokens = target_tokens[:target_logits_size]
    exact: dict[str, int] = {}
    for index, token in enumerate(target_tokens):
        if token is not None:
            exact.setdefault(token, index)  # a string listed twice maps to its lowest id

    result = np.full(source_logits_size, -1, dtype=np.int32)
    unmatched: dict[str, list[int]] = {}
    for index, token in enumerate(source_tokens):
        if token is None:
            continue
        query = replace_marker(token, source_marker, target_marker)
        hit = exact.get(query)
        if hit is not None:
            result[index] = hit
        elif kind == "soft":
            unmatched.setdefault(query, []).append(index)
    if unmatched and exact:
        nearest = _nearest_targets(list(unmatched), target_tokens, workers)
        for query, target in zip(unmatched, nearest):
            result[unmatched[query]] = target
    return torch.from_numpy(result)


def _nearest_targets(queries: list[str], target_tokens: Sequence[str | None], workers: int) -> list[int]:
    """For each query, the lowest target id at the smallest Levenshtein distance."""
    grouped: dict[int, list[int]] = {}
    for index, token in enumerate(target_tokens):
        if token is not None:
            grouped.setdefault(len(token), []).append(index)  # ids ascend within a group
    by_length = {
        length: ([target_tokens[i] for i in ids], np.asarray(ids, dtype=np.int64)) for length, ids in grouped.items()
    }
    max_length = max(by_length)
    query_length = np.fromiter((len(q) for q in queries), dtype=np.int64, count=len(queries))
    best_distance = np.full(len(queries), np.iinfo(np.int64).max, dtype=np.int64)
    best_id = np.full(len(queries), -1, dtype=np.int64)
    pending = np.arange(len(queries))
    cutoff = 1
    while pending.size:
        # Every query's distance to some target is at most max(len(query), max_length).
        cutoff = min(cutoff, max(max_length, int(query_length[pending].max())))
        for length in np.unique(query_length[pending]).tolist():
            group_queries = pending[query_length[pending] == length]
            for target_length in range(max(0, length - cutoff), length + cutoff + 1):
                if target_length not in by_length:
                    continue
                strings, ids = by_length[target_length]
                for start in range(0, group_queries.size, _QUERY_CHUNK):
                    chunk = group_queries[start : start + _QUERY_CHUNK]
                    distance = cdist(
                        [queries[q] for q in chunk], strings, scorer=Levenshtein.distance,
                        score_cutoff=cutoff, dtype=np.int32, workers=workers,
                    )
                    # Within a length group ids ascend, so argmin's first minimum is the lowest id.
                    column = distance.argmin(axis=1)
                    d = distance[np.arange(chunk.size), column].astype(np.int64)
                    candidate = ids[column]
                    better = (d <= cutoff) & (
                        (d < best_distance[chunk]) | ((d == best_distance[chunk]) & (candidate < best_id[chunk]))
                    )
                    best_distance[chunk[better]] = d[better]
                    best_id[chunk[better]] = candidate[better]
        settled = best_distance[pending] <= cutoff
        pending = pending[~settled]
        cutoff *= 2
    return best_id.tolist()


def soft_lookup(
    vocab_map_ids: torch.Tensor,
    source_vocab: VocabLike,
    target_vocab: VocabLike,
    *,
    source_marker: str,
    target_marker: str,
) -> dict[str, str]:
    """The original's `blending_to_base_mapping`: source token with its marker replaced ->
    the target token the map sends it to (source ids mapped to -1 are left out)."""
    source_tokens = vocab_list(source_vocab)
    target_tokens = vocab_list(target_vocab)
    lookup: dict[str, str] = {}
    for index, target in enumerate(vocab_map_ids.tolist()):
        token = source_tokens[index] if index < len(source_tokens) else None
        if token is not None and target >= 0 and target_tokens[target] is not None:
            lookup[replace_marker(token, source_marker, target_marker)] = target_tokens[target]  # type: ignore[assignment]
    return lookup
