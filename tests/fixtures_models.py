"""Tiny local tokenizers, models and corpora shared by the pipeline tests (built in seconds).

Import the fixtures by name into a test module (``from tests.fixtures_models import tiny_llama``);
they are session-scoped, so each is built once per test run. Nothing is downloaded: the
tokenizers are trained in memory with `tokenizers`, the models are randomly initialised
`transformers` models with hidden size 32 and 2 layers.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

TRAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Knowledge fusion of large language models combines several teachers. ",
    "Héllo wörld — ünïcode ✓ 日本語のテキスト and emoji 🙂 mixed in. ",
    "def f(x):\n    return x + 1\n\nclass A:\n    pass\n",
    "Numbers 0123456789, punctuation !?;:'\"()[]{} and tabs\tare here.",
]

_WORDS = ("fusion model token teacher student loss vocab align score byte shard corpus "
          "über naïve café 東京 🙂 x=1; return f(y) the of and a to in is").split()


def corpus_texts(n: int = 24, seed: int = 0) -> list[str]:
    """Deterministic documents of varied length and script, including edge cases."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 40))]
        sep = "\n" if i % 5 == 0 else " "
        texts.append(sep.join(words) + ("." if i % 2 else ""))
    return texts


def train_tokenizer(kind: str, vocab_size: int = 300):
    """A fast HF tokenizer: kind 'bytelevel' (GPT-2 style) or 'metaspace' (Llama style)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<eos>", "<bos>", "<pad>"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + ["<unk>"])
    else:
        raise ValueError(kind)
    tok.train_from_iterator(TRAIN_TEXTS * 20 + corpus_texts(60, seed=1), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")


def build_model(path: Path, tokenizer, arch: str = "llama", logits_size: int | None = None,
                context: int = 128, nan_token: int | None = None, seed: int = 0) -> Path:
    """Save a tiny random causal LM (and, unless tokenizer is None, its tokenizer) to path.

    logits_size: the model's vocabulary (default: the tokenizer's); larger = padded (Qwen-like).
    nan_token: that token's input embedding is NaN, so every document holding it has
    non-finite logits from that position on.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    v = logits_size or len(tokenizer)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                          initializer_range=0.5, eos_token_id=0, bos_token_id=1, pad_token_id=2)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=context,
                         initializer_range=0.5, eos_token_id=0, bos_token_id=1)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    if nan_token is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[nan_token] = float("nan")
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tok_bytelevel():
    return train_tokenizer("bytelevel")


@pytest.fixture(scope="session")
def tok_metaspace():
    return train_tokenizer("metaspace", vocab_size=260)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(models_dir, tok_bytelevel) -> Path:
    """Llama, byte-level BPE tokenizer, logits = tokenizer vocabulary, context 128."""
    return build_model(models_dir / "llama", tok_bytelevel, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(models_dir, tok_metaspace) -> Path:
    """GPT-2, Metaspace tokenizer (a different segmentation than tiny_llama's), context 128."""
    return build_model(models_dir / "gpt2", tok_metaspace, "gpt2", seed=1)


@pytest.fixture(scope="session")
def tiny_padded(models_dir, tok_bytelevel) -> Path:
    """Qwen-like: 37 logit columns past the tokenizer's vocabulary."""
    return build_model(models_dir / "padded", tok_bytelevel, "llama", logits_size=len(tok_bytelevel) + 37, seed=2)


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t, "meta": len(t)}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A prepared corpus of 24 varied documents plus an empty and a whitespace-only one
    (kept), and one longer than tiny models' 128-token context."""
    from fusellm_kernels.pipeline.corpus import PrepareConfig, prepare_corpus

    d = tmp_path_factory.mktemp("corpus")
    texts = corpus_texts(24)
    texts[3] = ""
    texts[7] = "   \n\t "
    texts[11] = " ".join(_WORDS * 6)
    src = write_jsonl(d / "docs.jsonl", texts)
    prepare_corpus(PrepareConfig(inputs=(str(src),), output=str(d / "prepared"), keep_empty=True, progress=False))
    return d / "prepared"
