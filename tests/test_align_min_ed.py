"""`min_ed_alignment` equals the reference re-implementation of the original's `dtw` exactly,
ties included: random strings over tiny alphabets (ties everywhere), markers, empty strings,
bands too narrow to prove (forced widening), and real tokenizations by two trained tokenizers."""
from __future__ import annotations

import random

import pytest

from fusellm_kernels.align import detect_conventions, dtw_mappings, min_ed_alignment
from fusellm_kernels.reference.alignment import dtw, marker_edit_distance, reference_alignment
from tests.test_align_conventions import corpus, trained_tokenizers


def _random_tokens(rng: random.Random, alphabet: str, count: int, max_len: int = 3) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(count)]


def _strip(tokens: list[str], marker: str) -> list[str]:
    return [t.replace(marker, "") for t in tokens]


def test_reference_dtw_follows_the_original_rules():
    # 'a' | 'b' against 'ab': both source tokens cost 1 against the one target token.
    matches, cost, map_1, map_2, matrix = dtw(["a", "b"], ["ab"], marker_edit_distance("▁", "Ġ"))
    assert (matches, cost, map_1, map_2) == ([(0, 0), (1, 0)], 2.0, [[0], [0]], [[0, 1]])
    assert matrix == [[1.0], [2.0]]
    # Diagonal beats up and left on a tie.
    _, _, _, map_2, _ = dtw(["x", "x"], ["x", "x"], lambda a, b: 0)
    assert map_2 == [[0], [1]]
    with pytest.raises(ValueError, match="non-empty"):
        dtw([], ["a"], lambda a, b: 0)


@pytest.mark.parametrize("seed", range(4))
def test_random_tie_heavy_strings_match_reference(seed):
    rng = random.Random(seed)
    for _ in range(150):
        source = _random_tokens(rng, "ab▁", rng.randint(1, 25))
        target = _random_tokens(rng, "abĠ", rng.randint(1, 25))
        expected = reference_alignment(source, target, source_marker="▁", target_marker="Ġ")
        assert min_ed_alignment(source, target, source_marker="▁", target_marker="Ġ") == expected
        # A band of half-width 1 almost never proves itself: exercises every widening step.
        assert dtw_mappings(_strip(source, "▁"), _strip(target, "Ġ"), initial_half_width=1) == expected


def test_long_sequences_with_narrow_bands_match_reference():
    """Same text cut differently (the band holds) and unrelated text (it must widen)."""
    rng = random.Random(7)
    for trial in range(8):
        text = "".join(rng.choice("abcab ") for _ in range(360))

        def cut(s: str) -> list[str]:
            out, k = [], 0
            while k < len(s):
                step = rng.randint(1, 4)
                out.append(s[k : k + step].replace(" ", "▁"))
                k += step
            return out

        source = cut(text)
        target = cut(text if trial % 2 else text[::-1][:250])
        expected = reference_alignment(source, target, source_marker="▁", target_marker="▁")
        for half_width in (2, 8, 192):
            got = dtw_mappings(_strip(source, "▁"), _strip(target, "▁"), initial_half_width=half_width)
            assert got == expected, (trial, half_width)


def test_markers_are_the_only_normalisation():
    # 'Ġ' is stripped on the target side only: a source 'Ġ' is an ordinary character there.
    source, target = ["▁hello", "Ġ"], ["Ġhel", "lo"]
    expected = reference_alignment(source, target, source_marker="▁", target_marker="Ġ")
    assert min_ed_alignment(source, target, source_marker="▁", target_marker="Ġ") == expected


def test_marker_only_and_empty_strings():
    rng = random.Random(11)
    for _ in range(200):
        source = [rng.choice(["", "▁", "▁▁", "a", "▁a"]) for _ in range(rng.randint(1, 12))]
        target = [rng.choice(["", "Ġ", "a", "aĠ"]) for _ in range(rng.randint(1, 12))]
        expected = reference_alignment(source, target, source_marker="▁", target_marker="Ġ")
        assert min_ed_alignment(source, target, source_marker="▁", target_marker="Ġ") == expected


def test_empty_sequences_are_defined():
    assert min_ed_alignment([], [], source_marker="▁", target_marker="Ġ") == []
    assert min_ed_alignment(["▁a"], [], source_marker="▁", target_marker="Ġ") == []
    assert min_ed_alignment([], ["a", "b"], source_marker="▁", target_marker="Ġ") == [[], []]


def test_single_tokens():
    assert min_ed_alignment(["a"], ["x", "y", "z"], source_marker="▁", target_marker="Ġ") == [[0], [0], [0]]
    assert min_ed_alignment(["x", "y", "z"], ["a"], source_marker="▁", target_marker="Ġ") == [[0, 1, 2]]


def test_unicode_costs_are_per_code_point():
    source = ["▁東京", "🙂", "é", "e\u0301"]
    target = ["東", "京🙂", "Ã©", "é"]
    expected = reference_alignment(source, target, source_marker="▁", target_marker="Ġ")
    assert min_ed_alignment(source, target, source_marker="▁", target_marker="Ġ") == expected


@pytest.mark.parametrize("direction", ["bytelevel->metaspace", "metaspace->bytelevel", "wordpiece->metaspace"])
def test_real_tokenizations_match_reference(direction):
    source_name, target_name = direction.split("->")
    toks = trained_tokenizers()
    source_tok, target_tok = toks[source_name], toks[target_name]
    source_marker = detect_conventions(source_tok).strip
    target_marker = detect_conventions(target_tok).strip
    texts = corpus(40, seed=3)
    documents = [" ".join(texts[k : k + 4]) for k in range(0, len(texts), 4)]
    for doc in documents:
        source, target = source_tok.tokenize(doc)[:200], target_tok.tokenize(doc)[:200]
        expected = reference_alignment(source, target, source_marker=source_marker, target_marker=target_marker)
        got = min_ed_alignment(source, target, source_marker=source_marker, target_marker=target_marker)
        assert got == expected
        # A too-narrow first band must still end in the same result.
        narrow = dtw_mappings(_strip(source, source_marker), _strip(target, target_marker), initial_half_width=2)
        assert narrow == expected
