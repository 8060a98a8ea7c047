"""The demo's models: tokenizers trained in memory, tiny transformers trained from scratch.

Three tokenizer families, so the alignment has real work to do:

    bytelevel_bpe      GPT-2 style byte-level BPE, word-start marker `Ġ`
    metaspace_bpe      SentencePiece-style BPE with the `▁` marker (Llama-2, Mistral)
    metaspace_unigram  SentencePiece-style Unigram LM with `▁` (T5, ALBERT): another
                       segmentation of the same text even where the marker agrees

The pretraining loop here only makes the demo's teachers and the target's weak start; the
fusion training itself is `training/` (`fusellm train`). It packs the tokenised documents
(each followed by EOS) into one stream and trains on random windows of it with AdamW and a
cosine schedule: the simplest loop that makes a toy model clearly better than chance.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

TokenizerKind = Literal["bytelevel_bpe", "metaspace_bpe", "metaspace_unigram"]
Arch = Literal["llama", "gpt2", "gpt_neox"]
SPECIALS = ("<eos>", "<bos>", "<pad>", "<unk>")


def train_tokenizer(kind: TokenizerKind, texts: list[str], vocab_size: int) -> Any:
    """A fast `transformers` tokenizer of the given family trained on texts (seconds)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer: Any = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS[:3]),
                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "metaspace_bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS))
    elif kind == "metaspace_unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), unk_token="<unk>")
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok.train_from_iterator(texts, trainer)
    unk = {} if kind == "bytelevel_bpe" else {"unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>", **unk)


@dataclass(frozen=True)
class ModelSpec:
    """A tiny causal LM: architecture, tokenizer and size, and how long to pretrain it."""

    arch: Arch
    tokenizer: TokenizerKind
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    context: int
    steps: int          # pretraining steps (0: left at its random initialisation)
    batch: int = 16     # windows per step
    lr: float = 3e-3
    seed: int = 0


def build_model(spec: ModelSpec, tokenizer: Any) -> torch.nn.Module:
    """A randomly initialised transformers model of the spec (vocabulary = the tokenizer's)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    v = len(tokenizer)
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    if spec.arch == "llama":
        cfg: Any = LlamaConfig(vocab_size=v, hidden_size=spec.hidden, intermediate_size=spec.hidden * 8 // 3,
                               num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                               num_key_value_heads=max(1, spec.heads // 2), max_position_embeddings=spec.context,
                               tie_word_embeddings=False, **ids)
        return LlamaForCausalLM(cfg)
    if spec.arch == "gpt2":
        cfg = GPT2Config(vocab_size=v, n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
                         n_positions=spec.context, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        return GPT2LMHeadModel(cfg)
    if spec.arch == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=v, hidden_size=spec.hidden, intermediate_size=spec.hidden * 4,
                            num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                            max_position_embeddings=spec.context, rotary_pct=0.25, use_parallel_residual=True,
                            hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False, **ids)
        return GPTNeoXForCausalLM(cfg)
    raise ValueError(f"unknown architecture {spec.arch!r}")


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """int64 [T]: every document's tokens followed by EOS (as the teacher pass sees them)."""
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for ids in enc:
        out.extend(ids)
        out.append(tokenizer.eos_token_id)
    return torch.tensor(out, dtype=torch.int64)


def pretrain(model: torch.nn.Module, stream: torch.Tensor, spec: ModelSpec,
             report: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train on random windows of the token stream; returns the loss curve (every 10 steps)."""
    if spec.steps == 0:
        return []
    window = spec.context + 1
    if stream.numel() <= window:
        raise ValueError(f"the training text has {stream.numel()} tokens, fewer than one window of {window}")
    g = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, spec.steps - warmup))))
    model.train()
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for step in range(1, spec.steps + 1):
        starts = torch.randint(0, stream.numel() - window, (spec.batch,), generator=g)
        batch = torch.stack([stream[s:s + window] for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone()).loss  # transformers shifts inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == spec.steps:
            value = loss.item()
            curve.append({"step": step, "loss": value})
            if step % max(10, spec.steps // 5 // 10 * 10) == 0 or step == spec.steps:
                report(f"    step {step:>5}/{spec.steps}  loss {value:.3f}  ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return curve


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, tokenizer: Any, texts: list[str], context: int) -> float:
    """Held-out cross entropy in bits per UTF-8 byte of text: comparable across tokenizers
    (per token it is not: a finer tokenizer scores lower per token on the same text)."""
    model.eval()
    nll, n_bytes = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n_bytes += len(text.encode("utf-8"))
        for s in range(0, len(ids) - 1, context):  # consecutive windows, as the teacher pass's overflow=split
            chunk = torch.tensor(ids[s:s + context + 1])[None]
            if chunk.shape[1] < 2:
                break
            out = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1].clone())
            nll += float(out.loss) * (chunk.shape[1] - 2) if chunk.shape[1] > 2 else 0.0
            # the last pair of the window: the loss above skips it (shift inside); add it
            logits = out.logits[0, -1].float()
            nll += float(torch.logsumexp(logits, 0) - logits[chunk[0, -1]])
    return nll / max(1, n_bytes) / math.log(2)


def save(model: torch.nn.Module, tokenizer: Any, path: Path) -> Path:
    """A local transformers folder (safetensors + tokenizer): what every pipeline stage reads."""
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path
