"""Vocabulary maps against brute force (the original's |V_s|·|V_t| scan) on small vocabularies."""
from __future__ import annotations

import random

import pytest
import torch

from fusellm_kernels.align import detect_conventions, soft_lookup, vocab_list, vocab_map
from fusellm_kernels.reference.alignment import soft_vocab_map_reference
from tests.test_align_conventions import trained_tokenizers


def _hard_brute_force(source, target, source_marker, target_marker):
    first_id = {}
    for index, token in enumerate(target):
        if token is not None:
            first_id.setdefault(token, index)
    return [-1 if s is None else first_id.get(s.replace(source_marker, target_marker), -1) for s in source]


def test_soft_map_random_vocabularies_with_ties():
    rng = random.Random(0)
    for trial in range(150):
        target = list({"".join(rng.choice("abĠ") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 50))})
        rng.shuffle(target)  # ties between ids must go to the lowest id, whatever the order of strings
        if trial % 4 == 0:
            target.append(target[0])  # a string listed twice: its lowest id wins
        if trial % 5 == 0:
            target.insert(rng.randrange(len(target) + 1), None)  # a hole in the id range
        source = ["".join(rng.choice("ab▁c") for _ in range(rng.randint(0, 7))) for _ in range(40)] + [None]
        expected = soft_vocab_map_reference(source, target, source_marker="▁", target_marker="Ġ")
        got = vocab_map(source, target, source_marker="▁", target_marker="Ġ", kind="soft", source_logits_size=len(source))
        assert got.dtype == torch.int32 and got.shape == (len(source),)
        assert got.tolist() == expected, trial


def test_hard_map_random_vocabularies():
    rng = random.Random(1)
    for _ in range(50):
        target = [rng.choice(["a", "Ġa", "b", "Ġab", "ab", None]) for _ in range(12)]
        source = [rng.choice(["a", "▁a", "b", "▁ab", "x", None]) for _ in range(15)]
        got = vocab_map(source, target, source_marker="▁", target_marker="Ġ", kind="hard", source_logits_size=15)
        assert got.tolist() == _hard_brute_force(source, target, "▁", "Ġ")


def test_sized_by_logits_not_tokenizer():
    source = {"▁a": 0, "b": 1}
    target = {"Ġa": 1, "b": 0, "c": 2}
    got = vocab_map(source, target, source_marker="▁", target_marker="Ġ", kind="hard", source_logits_size=5)
    assert got.tolist() == [1, 0, -1, -1, -1]  # padded logits rows have no token
    soft = vocab_map(source, target, source_marker="▁", target_marker="Ġ", kind="soft", source_logits_size=1)
    assert soft.tolist() == [1]  # tokenizer ids beyond the logits are never in a top-k
    limited = vocab_map(
        {"c": 0}, target, source_marker="▁", target_marker="Ġ", kind="soft", source_logits_size=1, target_logits_size=2
    )
    assert limited.tolist() == [0]  # "c" itself (id 2) is beyond the target logits: "b" is nearest


def test_empty_source_marker_replaces_nothing():
    got = vocab_map(["ab"], ["ab", "Ġab"], source_marker="", target_marker="Ġ", kind="hard", source_logits_size=1)
    assert got.tolist() == [0]


def test_bad_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        vocab_map(["a"], ["a"], source_marker="▁", target_marker="Ġ", kind="fuzzy", source_logits_size=1)


@pytest.mark.parametrize("direction", ["bytelevel->metaspace", "metaspace->bytelevel"])
def test_trained_vocabularies_against_brute_force(direction):
    source_name, target_name = direction.split("->")
    toks = trained_tokenizers()
    source_tok, target_tok = toks[source_name], toks[target_name]
    sm, tm = detect_conventions(source_tok).marker, detect_conventions(target_tok).marker
    source, target = vocab_list(source_tok.get_vocab()), vocab_list(target_tok.get_vocab())
    logits = len(source) + 7  # a padded source model
    hard = vocab_map(source, target, source_marker=sm, target_marker=tm, kind="hard", source_logits_size=logits)
    assert hard.tolist() == _hard_brute_force(source, target, sm, tm) + [-1] * 7
    soft = vocab_map(source, target, source_marker=sm, target_marker=tm, kind="soft", source_logits_size=logits, workers=2)
    assert soft.tolist() == soft_vocab_map_reference(source, target, source_marker=sm, target_marker=tm) + [-1] * 7
    # soft_lookup is the original's string -> string dict of the same map.
    lookup = soft_lookup(soft, source, target, source_marker=sm, target_marker=tm)
    for index, token in enumerate(source):
        assert lookup[token.replace(sm, tm)] == target[soft[index]]
