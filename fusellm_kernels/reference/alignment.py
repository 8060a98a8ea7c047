"""Readable plain-Python references of the original's token alignment (the seed's `dtw` and
`transform_step_logits`), re-written from the description; tests and benchmarks import them.

They are slow on purpose: O(N·M) Python, no tokenizer objects. Token strings go in, and the
blending model's top-k ids are turned into strings by `blending_id_to_token`, so nothing here
needs `transformers`.

Naming follows the original: the *blending* model is a source model, the *base* model is the
target model. `series_1` of `dtw` is the blending (source) sequence, `series_2` the base
(target) sequence.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Mapping, Sequence

import editdistance

Match = tuple[int, int]


def dtw(
    series_1: Sequence[str], series_2: Sequence[str], norm_func: Callable[[str, str], float]
) -> tuple[list[Match], float, list[list[int]], list[list[int]], list[list[float]]]:
    """Dynamic time warping between two token sequences, as the original's `dtw`.

    The accumulated-cost matrix is filled in full: acc[i][j] = cost(i, j) + min(acc[i-1][j-1],
    acc[i-1][j], acc[i][j-1]), with only the (-1, -1) corner at 0 and the rest of the border
    at infinity. The back-trace starts at the last cell and, while not at (0, 0), steps to the
    smallest of diagonal, up (i-1) and left (j-1), the first of them on ties (numpy's argmin
    order), with infinity for a step that would leave the matrix; (0, 0) is appended last.

    Returns, like the original:
      matches     (i, j) pairs along the path, from (0, 0) to (N-1, M-1);
      cost        the total cost acc[N-1][M-1] (a float: the original fills a float matrix);
      mappings_1  for each series_1 position, the ascending series_2 positions matched to it;
      mappings_2  for each series_2 position, the ascending series_1 positions matched to it;
      matrix      acc as a list of N rows of M floats.

    Raises ValueError for an empty series: the original fails on one (it indexes an empty
    matrix), so there is no result to reproduce.
    """
    n, m = len(series_1), len(series_2)
    if n == 0 or m == 0:
        raise ValueError(f"dtw needs two non-empty series, got lengths {n} and {m}")
    inf = math.inf
    # acc has a border row and column; acc[i + 1][j + 1] is cell (i, j).
    acc = [[inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0.0
    for i in range(n):
        above, row = acc[i], acc[i + 1]
        for j in range(m):
            cost = norm_func(series_1[i], series_2[j])
            row[j + 1] = cost + min(above[j + 1], row[j], above[j])
    matrix = [row[1:] for row in acc[1:]]

    matches: list[Match] = []
    mappings_1: list[list[int]] = [[] for _ in range(n)]
    mappings_2: list[list[int]] = [[] for _ in range(m)]
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        matches.append((i, j))
        mappings_1[i].append(j)
        mappings_2[j].append(i)
        options = (
            matrix[i - 1][j - 1] if i > 0 and j > 0 else inf,  # diagonal
            matrix[i - 1][j] if i > 0 else inf,  # up
            matrix[i][j - 1] if j > 0 else inf,  # left
        )
        move = options.index(min(options))  # the first minimum, as np.argmin
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    matches.append((0, 0))
    mappings_1[0].append(0)
    mappings_2[0].append(0)
    matches.reverse()
    for mapping in (*mappings_1, *mappings_2):
        mapping.reverse()
    return matches, float(matrix[n - 1][m - 1]), mappings_1, mappings_2, matrix


def marker_edit_distance(source_marker: str, target_marker: str) -> Callable[[str, str], int]:
    """The original's DTW cost: Levenshtein distance after deleting each side's marker."""

    def dist(source_token: str, target_token: str) -> int:
        return editdistance.eval(source_token.replace(source_marker, ""), target_token.replace(target_marker, ""))

    return dist


def reference_alignment(
    source_tokens: Sequence[str], target_tokens: Sequence[str], *, source_marker: str, target_marker: str
) -> list[list[int]]:
    """For each target position, the ascending source positions the original's DTW maps to it."""
    return dtw(source_tokens, target_tokens, marker_edit_distance(source_marker, target_marker))[3]


def transform_step_logits(
    base_tokens: Sequence[str],
    blending_tokens: Sequence[str],
    base_vocab: Mapping[str, int],
    blending_per_step_logits: Sequence[Sequence[float]],
    blending_per_step_indices: Sequence[Sequence[int]],
    blending_id_to_token: Callable[[int], str] | Mapping[int, str] | Sequence[str],
    *,
    blending_marker: str,
    base_marker: str,
    vocab_align_type: Literal["hard", "soft"] = "hard",
    blending_to_base_mapping: Mapping[str, str] | None = None,
    blending_is_byte_level: bool = False,
) -> tuple[list[list[float]], list[list[int]]]:
    """The original's per-row teacher for the base (target) sequence from one blending model.

    base_tokens / blending_tokens: the two tokenizations of one text, as token strings.
    base_vocab: base token string -> base id (the base tokenizer's `get_vocab()`).
    blending_per_step_logits / _indices: per blending position, its top-k logits and ids.
    blending_id_to_token: blending id -> token string (a function, a dict or a list).
    blending_to_base_mapping (soft only): blending token, after marker replacement -> base
      token, e.g. from `fusellm_kernels.align.soft_lookup`.
    blending_is_byte_level: the original's test `tokenizer class is GPT2TokenizerFast or
      GPTNeoXTokenizerFast`, which switches on the position-0 marker special case.

    For base row i with exactly one blending position j mapped to it by `dtw`, whose token
    (blending marker replaced by the base marker) agrees with the base token (hard: equal;
    soft: equal, or mapped to it), the row takes j's top-k: each id becomes a blending token
    string, marker replaced (soft: then mapped), kept if in base_vocab and not already taken,
    in the given order. Any other row gets the one-hot [base_vocab[base_tokens[i]]] with logit
    1.0: the *current* token, the original's off-by-one. A row whose every top-k token is
    dropped comes out empty, as in the original.
    """
    if vocab_align_type not in ("hard", "soft"):
        raise ValueError(f"vocab_align_type must be 'hard' or 'soft', got {vocab_align_type!r}")
    if vocab_align_type == "soft" and blending_to_base_mapping is None:
        raise ValueError("vocab_align_type='soft' needs blending_to_base_mapping")
    to_token = blending_id_to_token if callable(blending_id_to_token) else blending_id_to_token.__getitem__
    mapping = blending_to_base_mapping if blending_to_base_mapping is not None else {}

    base_to_blending = reference_alignment(
        blending_tokens, base_tokens, source_marker=blending_marker, target_marker=base_marker
    )
    out_logits: list[list[float]] = []
    out_indices: list[list[int]] = []
    for i, blending_positions in enumerate(base_to_blending):
        base_token = base_tokens[i]
        row_logits: list[float] = []
        row_indices: list[int] = []
        aligned = False
        if len(blending_positions) == 1:
            j = blending_positions[0]
            blending_token = blending_tokens[j].replace(blending_marker, base_marker)
            # The original's fix for MPT (GPT-NeoX tokenizer, no prefix space): the first base
            # token carries the word marker, the first blending token does not.
            if (
                blending_is_byte_level
                and i == 0
                and base_token.startswith(base_marker)
                and not blending_token.startswith(base_marker)
            ):
                blending_token = base_marker + blending_token
            if vocab_align_type == "hard":
                aligned = base_token == blending_token
            else:
                aligned = base_token == blending_token or (
                    blending_token in mapping and base_token == mapping[blending_token]
                )
            if aligned:
                for logit, index in zip(blending_per_step_logits[j], blending_per_step_indices[j]):
                    token = to_token(index).replace(blending_marker, base_marker)
                    if vocab_align_type == "soft":
                        token = mapping[token]
                    if token in base_vocab and base_vocab[token] not in row_indices:
                        row_indices.append(base_vocab[token])
                        row_logits.append(logit)
        if not aligned:
            row_indices.append(base_vocab[base_token])
            row_logits.append(1.0)
        out_logits.append(row_logits)
        out_indices.append(row_indices)
    return out_logits, out_indices


def soft_vocab_map_reference(
    source_tokens: Sequence[str | None], target_tokens: Sequence[str | None], *, source_marker: str, target_marker: str
) -> list[int]:
    """The original's MinED vocabulary map by brute force: per source id, the target id whose
    token is nearest (Levenshtein) to the source token with its marker replaced, the lowest
    id on ties (the original scans `get_vocab()` order, id order for its Llama tokenizer);
    -1 for ids without a token."""
    result = []
    for source in source_tokens:
        if source is None:
            result.append(-1)
            continue
        query = source.replace(source_marker, target_marker)
        best, best_id = math.inf, -1
        for index, target in enumerate(target_tokens):
            if target is not None:
                distance = editdistance.eval(query, target)
                if distance < best:
                    best, best_id = distance, index
        result.append(best_id)
    return result
