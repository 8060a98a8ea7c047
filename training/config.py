"""The training configuration: one typed dataclass, named presets, validation, command-line flags.

Every field is a command-line flag of `fusellm train` (``--lr``, ``--global-batch``, ...);
a preset fills the fields first and flags override them. `validate()` runs before anything
is loaded, and each error names the flag to change. The resolved configuration is written
as ``config.json`` beside the checkpoints, and a resumed run must agree with it on every
field that changes the numbers (`RESUME_MUST_MATCH`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from fusellm_kernels.types import DIVERGENCES, STRATEGIES, TEACHER_TAILS

Mode = Literal["fusion", "clm"]
Weighting = Literal["block", "document", "token"]
Attention = Literal["document", "block"]
FusionRows = Literal["labels", "attention"]
DType = Literal["auto", "bfloat16", "float32"]
Score = Literal["per_byte", "reference"]
CandidateSharding = Literal["replicate", "shard"]


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag to change."""


def _opt(default: Any, help: str, metadata_repeat: str = "", **kw: Any) -> Any:
    """A field and its flag; metadata_repeat names the value of a flag given once per item (e.g. PATH)."""
    return field(default=default, metadata={"help": help, "repeat": metadata_repeat}, **kw)


@dataclass
class TrainConfig:
    # --- where things are
    model: str = _opt("", "local directory of a transformers causal LM (config + safetensors); nothing is downloaded")
    data: str = _opt("", "assembled blocks directory (`fusellm assemble`); its manifest names the candidates' teacher stores")
    output: str = _opt("", "run directory: config.json, metrics.jsonl, curves.png, checkpoints/, export/")
    eval_data: str = _opt("", "held-out blocks directory for CLM perplexity (empty: use --eval-holdout)")
    eval_holdout: int = _opt(0, "hold out the last N blocks of --data for evaluation (when --eval-data is empty)")
    # --- online fusion: the candidates run inside the training step, no teacher store
    online: bool = _opt(False, "run the candidates live (no --data): blocks are packed from --corpus as `fusellm assemble` "
                               "packs them; candidate 0 is a frozen copy of --model, each --candidate follows")
    corpus: str = _opt("", "--online: the prepared corpus (`fusellm prepare`) to pack the target's blocks from")
    candidate: tuple[str, ...] = _opt((), "--online: a source model's local transformers folder with its tokenizer; "
                                          "repeat the flag for each source, in candidate order", metadata_repeat="PATH")
    score: Score = _opt("per_byte", "--online: a document's CE score, as `fusellm assemble --score` (per_byte or reference)")
    source_marker: tuple[str, ...] = _opt((), "--online: a source tokenizer's word-start marker when detection fails, one per "
                                              "--candidate in order ('' detects), as `fusellm align --source-marker`",
                                          metadata_repeat="MARKER")
    target_marker: str = _opt("", "--online: the target tokenizer's word-start marker when detection fails ('' detects)")
    candidate_sharding: CandidateSharding = _opt("replicate", "--online: replicate (every rank holds every candidate whole) "
                                                              "or shard (FSDP2 across the ranks, like the target: ~1/ranks "
                                                              "of their memory)")
    align_workers: int = _opt(0, "--online: processes per rank aligning documents (0: on the prefetch thread, which "
                                 "then competes for the GIL with the training loop)")
    # --- objective
    mode: Mode = _opt("fusion", "fusion: λ·CE + (1 − λ)·divergence to the fused teacher; clm: CE only, same data and steps")
    strategy: str = _opt("min_ce", f"candidate weighting, one of {STRATEGIES}")
    weighting: Weighting = _opt("document", "granularity of the weighting decision: block (the original), document or token")
    lam: float = _opt(0.9, "λ, weight of the CE term (the original: 0.9)")
    temperature: float = _opt(1.0, "teacher temperature T (teacher only)")
    ce_temperature: float = _opt(1.0, "τ of softmin_ce")
    divergence: str = _opt("soft_ce", f"one of {DIVERGENCES}")
    teacher_tail: str = _opt("renormalize", "renormalize: each candidate's top-k renormalised (the original); bucket: "
                                            "the mass outside its top-k kept as one bucket (needs stores made with "
                                            "fusellm teacher --store-lse, and --temperature 1)")
    fusion_rows: FusionRows = _opt("labels", "rows the fusion term counts: labels (rows with a next token) or attention "
                                             "(every real row, each document's last too: the original)")
    source_weights: tuple[float, ...] = _opt((), "fixed per-candidate weights for --strategy weights (one per candidate, target first)")
    top_k: int = _opt(0, "teacher slots per candidate kept in the batch (0: every stored slot)")
    shuffle_window: int = _opt(4, "block shards shuffled together (and kept in memory): shard-local shuffling")
    prefetch: bool = _opt(True, "build the next batch on a background thread while the current one trains")
    # --- schedule and optimiser (AdamW, linear warm-up then cosine decay)
    seq_len: int = _opt(2048, "rows per block; must equal the blocks' block_len")
    global_batch: int = _opt(128, "blocks (sequences) per optimiser step, over all ranks and accumulation steps")
    micro_batch: int = _opt(1, "blocks per rank per forward/backward; accumulation = global / (micro × ranks)")
    epochs: int = _opt(1, "passes over the blocks (each epoch a fresh shuffle; an incomplete last global batch is dropped)")
    max_steps: int = _opt(0, "stop after this many optimiser steps (0: run --epochs); the schedule spans min(both)")
    lr: float = _opt(1e-5, "peak learning rate")
    min_lr_ratio: float = _opt(0.0, "final learning rate of the cosine decay, as a fraction of --lr")
    warmup_ratio: float = _opt(0.008, "fraction of the steps spent in linear warm-up from 0")
    weight_decay: float = _opt(0.1, "AdamW weight decay")
    beta1: float = _opt(0.9, "AdamW β1")
    beta2: float = _opt(0.95, "AdamW β2")
    eps: float = _opt(1e-8, "AdamW ε")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = _opt(0, "shuffle and initialisation seed")
    # --- model execution
    param_dtype: DType = _opt("auto", "FSDP2 compute dtype; auto: bfloat16 on CUDA, float32 on CPU (reductions are float32)")
    attn_implementation: str = _opt("sdpa", "transformers attention: sdpa, eager or flash_attention_2")
    attention: Attention = _opt("document", "document: rows attend only within their document piece; block: the whole block (the original)")
    activation_checkpointing: bool = _opt(False, "recompute each decoder layer in the backward (less memory, ~30%% more compute)")
    device: str = _opt("auto", "auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu or cuda")
    # --- bookkeeping
    log_every: int = _opt(1, "console line every N steps (every step goes to metrics.jsonl)")
    eval_every: int = _opt(0, "evaluate every N steps (0: only at the end, when evaluation data is given)")
    eval_batches: int = _opt(0, "blocks per rank per evaluation (0: all)")
    checkpoint_every: int = _opt(0, "save a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _opt(2, "newest checkpoints kept; older ones are deleted after a successful save")
    export: bool = _opt(True, "write a transformers folder (safetensors) to OUTPUT/export at the end")
    resume: bool = _opt(True, "continue from the newest checkpoint in OUTPUT/checkpoints when there is one")
    progress: bool = _opt(True, "progress bar on rank 0")
    plot: bool = _opt(True, "draw OUTPUT/curves.png from the metrics log at the end")
    verify: bool = _opt(True, "check each block, teacher-store and vocab-map file against its manifest's SHA-256 before "
                              "its first use, once per process; --no-verify skips that (unsafe: a damaged file trains silently)")

    # ------------------------------------------------------------------ validation
    def validate(self, world_size: int = 1) -> TrainConfig:
        """Check every field that needs no data; raise `ConfigError` naming the flag."""
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: {why}")

        for name in ("model", "corpus" if self.online else "data", "output"):
            if not getattr(self, name):
                raise bad(name, "is required" + (" with --online" if name == "corpus" else ""))
        if self.online:
            if self.data:
                raise bad("data", "--online packs its blocks from --corpus; drop --data (or --online)")
            if self.mode == "fusion" and not self.candidate:
                raise bad("candidate", "--online fusion needs at least one --candidate (a source model folder)")
            if self.eval_holdout:
                raise bad("eval_holdout", "--online evaluates on --eval-data (held-out blocks assembled offline) only")
            if self.source_marker and len(self.source_marker) != len(self.candidate):
                raise bad("source_marker", f"give one per --candidate ({len(self.candidate)}, '' to detect), in order")
        else:
            for name in ("candidate", "corpus", "source_marker", "target_marker", "align_workers"):
                if getattr(self, name):
                    raise bad(name, "is read only with --online")
        for name, allowed in (("candidate_sharding", get_args(CandidateSharding)), ("score", get_args(Score)),
                              ("strategy", STRATEGIES), ("divergence", DIVERGENCES), ("mode", get_args(Mode)),
                              ("teacher_tail", TEACHER_TAILS),
                              ("weighting", get_args(Weighting)), ("attention", get_args(Attention)),
                              ("fusion_rows", get_args(FusionRows)),
                              ("param_dtype", get_args(DType)),
                              ("attn_implementation", ("sdpa", "eager", "flash_attention_2"))):
            if getattr(self, name) not in allowed:
                raise bad(name, f"choose one of {tuple(allowed)}")
        if self.candidate_sharding != "replicate" and not self.online:
            raise bad("candidate_sharding", "is read only with --online")
        # --micro-batch before --global-batch: `fusellm eval` derives the global batch from it
        for name in ("seq_len", "micro_batch", "global_batch", "epochs", "log_every", "keep_checkpoints", "shuffle_window"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("max_steps", "eval_every", "eval_batches", "checkpoint_every", "eval_holdout", "top_k", "align_workers"):
            if getattr(self, name) < 0:
                raise bad(name, "must be 0 or more")
        if self.global_batch % (self.micro_batch * world_size):
            raise bad("global_batch", f"must be a multiple of --micro-batch × ranks = {self.micro_batch} × {world_size}")
        if not 0.0 <= self.lam <= 1.0:
            raise bad("lam", "must lie in [0, 1]")
        for name in ("temperature", "ce_temperature", "lr"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise bad(name, "must be a positive number")
        for name in ("warmup_ratio", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "must lie in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "must lie in [0, 1]")
        for name in ("weight_decay", "grad_clip", "eps"):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if self.teacher_tail == "bucket" and self.temperature != 1.0:
            raise bad("teacher_tail", f"bucket needs --temperature 1 (got {self.temperature}): the stored log-sum-exp is "
                                      "the teacher's at T = 1")
        if self.strategy == "weights" and self.mode == "fusion" and not self.source_weights:
            raise bad("source_weights", "--strategy weights needs one weight per candidate")
        if self.source_weights and (self.strategy != "weights" or any(w < 0 or not math.isfinite(w) for w in self.source_weights)):
            raise bad("source_weights", "takes non-negative weights and only with --strategy weights")
        check_device(self.device)
        return self

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in _TUPLE_FIELDS:
            d[name] = list(d[name])
        return d

    @staticmethod
    def from_json(obj: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; this trainer knows {sorted(known)}")
        obj = dict(obj)
        for name in _TUPLE_FIELDS:
            obj[name] = tuple(obj.get(name, ()))
        return TrainConfig(**obj)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")


#: fields holding several values (tuples here; lists in config.json and from the command line)
_TUPLE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig) if isinstance(f.default, tuple))


def check_device(device: str) -> None:
    """--device is auto, cpu or cuda (each rank takes cuda:LOCAL_RANK); anything else would
    otherwise fall back to the CPU silently, and cuda without CUDA would fail deep in torch."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device={device!r}: choose auto, cpu or cuda (under torchrun each rank takes cuda:LOCAL_RANK)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device='cuda': CUDA is not available on this machine; use --device cpu or auto")


#: fields a resumed run must share with the stored config.json (the rest, e.g. logging, may change)
RESUME_MUST_MATCH: tuple[str, ...] = (
    "model", "data", "mode", "strategy", "weighting", "lam", "temperature", "ce_temperature", "divergence", "teacher_tail",
    "source_weights", "top_k", "shuffle_window", "seq_len", "global_batch", "epochs", "max_steps", "lr", "min_lr_ratio",
    "warmup_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "seed", "attention", "eval_holdout",
    "fusion_rows", "online", "corpus", "candidate", "score", "source_marker", "target_marker",
)


def check_resume_compatible(stored: TrainConfig, current: TrainConfig, where: Path) -> None:
    for name in RESUME_MUST_MATCH:
        old, new = getattr(stored, name), getattr(current, name)
        if old != new:
            raise ConfigError(
                f"{where} was written with --{name.replace('_', '-')}={old!r} but this run asks for {new!r}; "
                "resume with the same value, pass --no-resume to start over, or use another --output"
            )


# ---------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on two CPU cores: the tests' and the quick benchmark's settings (model from --model).
    "tiny": dict(seq_len=64, global_batch=4, micro_batch=1, epochs=4, max_steps=6, lr=1e-3, warmup_ratio=0.2, weight_decay=0.1,
                 param_dtype="float32", checkpoint_every=3, keep_checkpoints=3, progress=False),
    # The original FuseLLM run: Llama-2-7B target, MiniPile, 8 × A100-40GB, 1 epoch.
    "llama2-7b": dict(seq_len=2048, global_batch=128, micro_batch=2, epochs=1, lr=1e-5, warmup_ratio=0.008,
                      weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, lam=0.9, temperature=1.0,
                      strategy="min_ce", weighting="block", param_dtype="auto", activation_checkpointing=True,
                      checkpoint_every=500, eval_every=500, eval_batches=64),
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: choose one of {sorted(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per field. Flags not given stay absent (argparse.SUPPRESS), so that only flags
    actually given override the preset; `skip`: fields whose flag the caller defines itself."""
    p.add_argument("--preset", default="", help=f"start from a named preset: {sorted(PRESETS)}")
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif f.metadata.get("repeat"):
            p.add_argument(flag, action="append", metavar=f.metadata["repeat"], default=argparse.SUPPRESS, help=help_text)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, type=float, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, help=help_text)


def from_args(a: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(a, f.name) for f in fields(TrainConfig) if getattr(a, f.name, None) is not None}
    for name in _TUPLE_FIELDS:
        if name in given:
            given[name] = tuple(given[name])
    return preset(a.preset, **given) if a.preset else TrainConfig(**given)
