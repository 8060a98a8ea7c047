"""Position maps against the reference re-implementation of the original's
`transform_step_logits`, on real tokenizations by two trained tokenizers (hard and soft,
`current` and `next` fallback, the reference position-0 case), plus the text mode and errors."""
from __future__ import annotations

import random

import numpy as np
import pytest

from fusellm_kernels.align import (
    PositionMap,
    detect_conventions,
    position_map,
    soft_lookup,
    token_text,
    vocab_list,
    vocab_map,
)
from fusellm_kernels.reference.alignment import transform_step_logits
from tests.test_align_conventions import corpus, trained_tokenizers

TOP_K = 5


def _documents() -> list[str]:
    texts = corpus(30, seed=5)
    return ["the quick brown fox"] + [" ".join(texts[k : k + 3]) for k in range(0, len(texts), 3)]


def _rows_from_map(pm: PositionMap, top_ids, top_logits, vmap: list[int]):
    """What the gather makes of a position map: remapped top-k (first occurrence of each target
    id, ids without a target dropped) or the one-hot fallback."""
    logits, indices = [], []
    for i in range(len(pm)):
        j = int(pm.source_pos[i])
        row_ids, row_logits = [], []
        if j >= 0:
            for index, logit in zip(top_ids[j], top_logits[j]):
                mapped = vmap[index]
                if mapped >= 0 and mapped not in row_ids:
                    row_ids.append(mapped)
                    row_logits.append(logit)
        else:
            row_ids, row_logits = [int(pm.fallback_id[i])], [1.0]
        indices.append(row_ids)
        logits.append(row_logits)
    return logits, indices


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("direction", ["bytelevel->metaspace", "metaspace->bytelevel"])
def test_matches_reference_transform_step_logits(kind, direction):
    source_name, target_name = direction.split("->")
    toks = trained_tokenizers()
    source_tok, target_tok = toks[source_name], toks[target_name]
    source_conv, target_conv = detect_conventions(source_tok), detect_conventions(target_tok)
    sm, tm = source_conv.marker, target_conv.marker
    source_vocab, target_vocab = vocab_list(source_tok.get_vocab()), vocab_list(target_tok.get_vocab())
    vmap_tensor = vocab_map(source_vocab, target_vocab, source_marker=sm, target_marker=tm, kind=kind,
                            source_logits_size=len(source_vocab))
    vmap = vmap_tensor.tolist()
    lookup = soft_lookup(vmap_tensor, source_vocab, target_vocab, source_marker=sm, target_marker=tm) if kind == "soft" else None
    rng = random.Random(0)
    special_case_seen = False
    for doc in _documents():
        source_tokens, target_tokens = source_tok.tokenize(doc)[:200], target_tok.tokenize(doc)[:200]
        target_ids = target_tok.convert_tokens_to_ids(target_tokens)
        top_ids = [rng.sample(range(len(source_vocab)), TOP_K) for _ in source_tokens]
        top_logits = [sorted((rng.uniform(-5, 5) for _ in range(TOP_K)), reverse=True) for _ in source_tokens]
        expected = transform_step_logits(
            target_tokens, source_tokens, target_tok.get_vocab(), top_logits, top_ids, source_vocab,
            blending_marker=sm, base_marker=tm, vocab_align_type=kind, blending_to_base_mapping=lookup,
            blending_is_byte_level=source_conv.byte_level,
        )
        common = dict(source_marker=sm, target_marker=tm, vocab_align=kind, soft_lookup=lookup,
                      source_is_byte_level=source_conv.byte_level)
        current = position_map(source_tokens, target_tokens, target_ids, fallback="current", reference=True, **common)
        assert _rows_from_map(current, top_ids, top_logits, vmap) == expected

        nxt = position_map(source_tokens, target_tokens, target_ids, reference=True, **common)
        np.testing.assert_array_equal(nxt.source_pos, current.source_pos)
        unaligned = np.flatnonzero(current.source_pos < 0)
        expected_next = np.append(np.asarray(target_ids[1:]), -1)[unaligned]
        np.testing.assert_array_equal(nxt.fallback_id[unaligned], expected_next)
        assert (nxt.fallback_id[current.source_pos >= 0] == -1).all()

        plain = position_map(source_tokens, target_tokens, target_ids, **common)
        np.testing.assert_array_equal(plain.source_pos[1:], current.source_pos[1:])  # differ at row 0 only
        if plain.source_pos[0] != current.source_pos[0]:
            special_case_seen = True
    if source_conv.byte_level and kind == "hard":
        # "the" vs "▁the": only the reference mode's position-0 case aligns the first row.
        assert special_case_seen


def test_text_normalisation_aligns_across_byte_conventions():
    toks = trained_tokenizers()
    source_tok, target_tok = toks["bytelevel"], toks["metaspace"]
    sc, tc = detect_conventions(source_tok), detect_conventions(target_tok)
    doc = "Café naïve façade, über straße: déjà vu 東京 🙂 hello world again"
    source_tokens, target_tokens = source_tok.tokenize(doc), target_tok.tokenize(doc)
    target_ids = target_tok.convert_tokens_to_ids(target_tokens)
    markers = position_map(source_tokens, target_tokens, target_ids, source_marker="Ġ", target_marker="▁")
    text = position_map(source_tokens, target_tokens, target_ids, source_marker="Ġ", target_marker="▁",
                        normalization="text", source_conventions=sc, target_conventions=tc)
    assert text.aligned_fraction > markers.aligned_fraction
    for i, j in enumerate(text.source_pos.tolist()):
        if j >= 0:
            assert token_text(source_tokens[j], sc) == token_text(target_tokens[i], tc)


def test_wordpiece_source_through_text_normalisation():
    toks = trained_tokenizers()
    source_tok, target_tok = toks["wordpiece"], toks["metaspace"]
    sc, tc = detect_conventions(source_tok), detect_conventions(target_tok)
    doc = "knowledge fusion of large language models aligns their tokens first"
    source_tokens, target_tokens = source_tok.tokenize(doc), target_tok.tokenize(doc)
    pm = position_map(source_tokens, target_tokens, target_tok.convert_tokens_to_ids(target_tokens),
                      source_marker=sc.marker, target_marker=tc.marker, normalization="text",
                      source_conventions=sc, target_conventions=tc)
    assert pm.aligned_fraction > 0.5
    for i, j in enumerate(pm.source_pos.tolist()):
        if j >= 0:
            assert token_text(source_tokens[j], sc) == token_text(target_tokens[i], tc)


def test_empty_documents():
    empty = position_map([], [], [], source_marker="Ġ", target_marker="▁")
    assert len(empty) == 0 and empty.aligned_fraction == 1.0
    only_target = position_map([], ["▁a", "▁b"], [7, 8], source_marker="Ġ", target_marker="▁")
    assert only_target.source_pos.tolist() == [-1, -1] and only_target.fallback_id.tolist() == [8, -1]
    only_target = position_map([], ["▁a", "▁b"], [7, 8], source_marker="Ġ", target_marker="▁", fallback="current")
    assert only_target.fallback_id.tolist() == [7, 8]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="soft_lookup"):
        position_map(["a"], ["a"], [0], source_marker="Ġ", target_marker="▁", vocab_align="soft")
    with pytest.raises(ValueError, match="target_ids"):
        position_map(["a"], ["a"], [0, 1], source_marker="Ġ", target_marker="▁")
    with pytest.raises(ValueError, match="fallback"):
        position_map(["a"], ["a"], [0], source_marker="Ġ", target_marker="▁", fallback="previous")
    with pytest.raises(ValueError, match="conventions"):
        position_map(["a"], ["a"], [0], source_marker="Ġ", target_marker="▁", normalization="text")
    with pytest.raises(TypeError, match="int32"):
        PositionMap(source_pos=np.zeros(2, dtype=np.int64), fallback_id=np.zeros(2, dtype=np.int32))
    with pytest.raises(ValueError, match="differ"):
        PositionMap(source_pos=np.zeros(2, dtype=np.int32), fallback_id=np.zeros(3, dtype=np.int32))
