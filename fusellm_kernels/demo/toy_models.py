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
    # sequential training: the Unigram trainer's parallel reductions make its scores differ in
    # the last digit from run to run, and the job must be reproducible
    import os

    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok.train_from_iterator(texts, trainer)
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    if kind == "metaspace_unigram":
        tok = _canonical_unigram(tok)
    unk = {} if kind == "bytelevel_bpe" else {"unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>", **unk)


def _canonical_unigram(tok: Any) -> Any:
    """One text always gives one Unigram tokenizer. The trainer's hash maps iterate in a
    random order from process to process (single-threaded too): its scores differ in their
    last digits, and the pieces it adds at the end get the scores min − k·1e-4 (k = 0, 1,
    ...) in a random order, so ids and segmentations change between runs. Hand those scores
    out again in string order of the pieces, round every score far below any difference that
    matters, and order the pieces by (score, string) after the special tokens."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    specials = [v for v in vocab if v[0] in SPECIALS]
    if [v[0] for v in vocab[:len(specials)]] != [v[0] for v in specials]:
        raise AssertionError("the Unigram trainer no longer puts the special tokens first")
    body = [[p, float(score)] for p, score in vocab[len(specials):]]
    scores = sorted({round(score, 9) for _, score in body})
    have = set(scores)
    # the added pieces: scores in a chain of 1e-4 steps (ties included), never a trained score
    chain = {x for x in scores if round(x + 1e-4, 9) in have or round(x - 1e-4, 9) in have}
    added = [i for i, (_, score) in enumerate(body) if round(score, 9) in chain]
    if len(added) > 1:
        pieces = sorted(body[i][0] for i in added)
        given = sorted((body[i][1] for i in added), reverse=True)
        for i, piece, score in zip(added, pieces, given):
            body[i] = [piece, score]
    body = sorted(([p, round(score, 9)] for p, score in body), key=lambda v: (-v[1], v[0]))
    spec["model"]["vocab"] = specials + body
    spec["model"]["unk_id"] = [v[0] for v in specials].index("<unk>")
    return Tokenizer.from_str(json.dumps(spec))


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
             on_step: Callable[[int, int], None] | None = None) -> list[dict[str, float]]:
    """Train on random windows of the token stream; returns the loss curve (every 10 steps).
    on_step(step, total) is called after every step (the caller's progress display)."""
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
            curve.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - t0})
        if on_step is not None:
            on_step(step, spec.steps)
    model.eval()
    return curve


@dataclass(frozen=True)
class HeldoutScore:
    """One model's cross entropy on held-out documents, per document (for the bootstrap).

    nll[d]: summed NLL in nats of document d's tokens and its closing EOS; tokens[d]: how many
    were predicted; bytes[d]: its UTF-8 bytes. Every token is predicted, the first from the EOS
    that precedes each document in pretraining, so every byte of the text is paid for.
    """

    nll: tuple[float, ...]
    tokens: tuple[int, ...]
    bytes: tuple[int, ...]

    @property
    def bits_per_byte(self) -> float:
        """Comparable across tokenizers (per token it is not: a finer tokenizer scores lower)."""
        return sum(self.nll) / max(1, sum(self.bytes)) / math.log(2)

    @property
    def perplexity(self) -> float:
        """Per own token: comparable only between models of one tokenizer (the target's runs)."""
        return math.exp(sum(self.nll) / max(1, sum(self.tokens)))

    def to_json(self) -> dict[str, Any]:
        return {"bits_per_byte": self.bits_per_byte, "perplexity": self.perplexity, "nll": list(self.nll),
                "tokens": list(self.tokens), "bytes": list(self.bytes)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "HeldoutScore":
        return cls(tuple(d["nll"]), tuple(d["tokens"]), tuple(d["bytes"]))


@torch.no_grad()
def heldout_score(model: torch.nn.Module, tokenizer: Any, texts: list[str], context: int,
                  batch: int = 32) -> HeldoutScore:
    """The one held-out measurement of the main job, for every model, before and after training.

    Each document is EOS + its tokens + EOS, read in consecutive windows of `context`
    predictions (each window restarts its context, as the teacher pass's overflow=split);
    windows are batched with right padding, which a causal model never attends to.
    """
    model.eval()
    eos = tokenizer.eos_token_id
    windows: list[tuple[int, list[int]]] = []  # (document, context + targets)
    for d, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        seq = [eos, *ids, eos]
        for s in range(0, len(seq) - 1, context):
            windows.append((d, seq[s:s + context + 1]))
    nll = [0.0] * len(texts)
    count = [0] * len(texts)
    for b in range(0, len(windows), batch):
        part = windows[b:b + batch]
        width = max(len(w) for _, w in part)
        ids = torch.full((len(part), width), eos, dtype=torch.int64)
        mask = torch.zeros(len(part), width, dtype=torch.int64)
        for i, (_, w) in enumerate(part):
            ids[i, :len(w)] = torch.tensor(w)
            mask[i, :len(w)] = 1
        logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits.double()
        token_nll = torch.logsumexp(logits, -1) - logits.gather(-1, ids[:, 1:, None])[..., 0]
        token_nll = token_nll * mask[:, 1:]
        for i, (d, w) in enumerate(part):
            nll[d] += float(token_nll[i].sum())
            count[d] += len(w) - 1
    return HeldoutScore(tuple(nll), tuple(count), tuple(len(t.encode("utf-8")) for t in texts))


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
