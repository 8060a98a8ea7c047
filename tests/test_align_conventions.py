"""Tokenizer convention detection, on tokenizers trained here in seconds (nothing downloaded).

This module also builds the small tokenizers the other alignment tests use
(`from tests.test_align_conventions import trained_tokenizers`): a SentencePiece-like
Metaspace BPE with byte fallback (`▁`, `<0x..>`), a GPT-2-like byte-level BPE (`Ġ`), a
WordPiece (`##`) and a whitespace word-level tokenizer whose word boundaries are invisible.
"""
from __future__ import annotations

import functools
import json
import random

import pytest

from fusellm_kernels.align import ConventionError, TokenizerConventions, detect_conventions, token_bytes, token_text
from fusellm_kernels.align.conventions import byte_alphabet

SENTENCES = [
    "hello world again, the quick brown fox jumps over the lazy dog.",
    "Knowledge fusion of large language models aligns their tokens first.",
    "Each teacher keeps its top ten logits per position; the student learns from them.",
    "def align(source, target):\n    return min_ed_alignment(source, target)\n",
    "Numbers 0123456789 and punctuation: !?;:'\"()[]{} with tabs\tand  double  spaces.",
    "Café naïve façade — über straße, déjà vu, 東京 and emoji 🙂 inside text.",
    "xylophone quartz jumping tokenization tokenizers tokenized retokenize",
    "MODULE REFERENCE\n    https://docs.python.org/3/library/json.html\n\n",
]


def corpus(n: int = 200, seed: int = 0) -> list[str]:
    """Deterministic training / test text: the sentences, shuffled words and recombinations."""
    rng = random.Random(seed)
    words = " ".join(SENTENCES).split(" ")
    texts = list(SENTENCES)
    for _ in range(n):
        texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 25))))
    return texts


def _bpe_with_byte_fallback(trained):  # -> tokenizers.Tokenizer
    """Insert `<0x00>`..`<0xFF>` after the special tokens, as Llama-2's tokenizer has them, and
    switch on byte fallback (the trainer cannot add plain vocabulary entries)."""
    from tokenizers import Tokenizer, models

    config = json.loads(trained.to_str())
    vocab: dict[str, int] = config["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in config["model"]["merges"]]
    specials = sorted((i, t) for t, i in vocab.items() if t.startswith("<") and t.endswith(">"))
    rebuilt: dict[str, int] = {t: i for i, t in specials}
    for b in range(256):
        rebuilt[f"<0x{b:02X}>"] = len(rebuilt)
    for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        rebuilt.setdefault(token, len(rebuilt))
    tok = Tokenizer(models.BPE(vocab=rebuilt, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = trained.normalizer
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.decoder = trained.decoder
    return tok


@functools.lru_cache(maxsize=None)
def trained_tokenizers() -> dict[str, object]:
    """name -> transformers PreTrainedTokenizerFast; built once per process."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = corpus()
    out: dict[str, object] = {}

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.normalizer = normalizers.NFC()
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    sp.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")])
    sp.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"]))
    out["metaspace"] = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_with_byte_fallback(sp), unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        name_or_path="tiny-metaspace",
    )

    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=520, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    out["bytelevel"] = PreTrainedTokenizerFast(tokenizer_object=bl, eos_token="<|endoftext|>", name_or_path="tiny-bytelevel")

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    out["wordpiece"] = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", name_or_path="tiny-wordpiece")

    wl = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    out["wordlevel"] = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", name_or_path="tiny-wordlevel")
    return out


@pytest.fixture(scope="session")
def tokenizers_by_name() -> dict[str, object]:
    return trained_tokenizers()


def test_metaspace_with_byte_fallback(tokenizers_by_name):
    conv = detect_conventions(tokenizers_by_name["metaspace"])
    assert conv == TokenizerConventions(name="tiny-metaspace", marker="▁", byte_level=False, byte_fallback=True)
    assert conv.strip == "▁"


def test_byte_level_bpe(tokenizers_by_name):
    conv = detect_conventions(tokenizers_by_name["bytelevel"])
    assert (conv.marker, conv.continuation, conv.byte_level, conv.byte_fallback) == ("Ġ", "", True, False)


def test_raw_tokenizers_object_is_accepted(tokenizers_by_name):
    backend = tokenizers_by_name["bytelevel"].backend_tokenizer
    conv = detect_conventions(backend)
    assert (conv.marker, conv.byte_level) == ("Ġ", True)


def test_wordpiece_marks_continuations(tokenizers_by_name):
    conv = detect_conventions(tokenizers_by_name["wordpiece"])
    assert (conv.marker, conv.continuation, conv.byte_level) == ("", "##", False)
    assert conv.strip == "##"


def test_undetectable_marker_names_tokenizer_and_option(tokenizers_by_name):
    with pytest.raises(ConventionError, match=r"tiny-wordlevel.*marker="):
        detect_conventions(tokenizers_by_name["wordlevel"])
    conv = detect_conventions(tokenizers_by_name["wordlevel"], marker="")
    assert conv.marker == "" and conv.strip == ""


def test_marker_set_by_hand_overrides_the_probe(tokenizers_by_name):
    assert detect_conventions(tokenizers_by_name["metaspace"], marker="@").marker == "@"


def test_byte_alphabet_is_a_bijection_with_gpt2_landmarks():
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256
    assert (alphabet[ord(" ")], alphabet[ord("\n")], alphabet[ord("a")]) == ("Ġ", "Ċ", "a")


def test_token_text_agrees_across_conventions(tokenizers_by_name):
    bl = detect_conventions(tokenizers_by_name["bytelevel"])
    sp = detect_conventions(tokenizers_by_name["metaspace"])
    wp = detect_conventions(tokenizers_by_name["wordpiece"])
    assert token_text("Ã©", bl) == token_text("é", sp) == "é"
    assert token_text("Ċ", bl) == token_text("<0x0A>", sp) == ""  # whitespace only
    assert token_bytes("Ċ", bl) == token_bytes("<0x0A>", sp) == b"\n"
    assert token_text("Ġworld", bl) == token_text("▁world", sp) == token_text("world", wp) == "world"
    assert token_text("##ing", wp) == "ing" and token_bytes("ing", wp) == b" ing"
    # A character cut after its first byte agrees between byte-level and byte fallback.
    assert token_text(byte_alphabet()[0xC3], bl) == token_text("<0xC3>", sp)


def test_decoded_text_round_trip(tokenizers_by_name):
    """token_bytes of a whole tokenization is the text (up to the leading marker space)."""
    text = "Café naïve 東京 🙂 tabs\tand\nnewlines"
    for name in ("bytelevel", "metaspace"):
        tok = tokenizers_by_name[name]
        conv = detect_conventions(tok)
        joined = b"".join(token_bytes(t, conv) for t in tok.tokenize(text)).decode("utf-8")
        assert joined.lstrip(" ") == text, name
