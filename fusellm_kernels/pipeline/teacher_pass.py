"""Stage 2: the teacher pass — run one causal LM over a prepared corpus, keep its top-k.

For every document of the corpus (``fusellm prepare``) and every token position, the pass
keeps the model's top-k next-token logits and ids (descending), the NLL of the model's own
next token, the token's length in bytes of text and, optionally, the full-vocabulary
log-sum-exp; it writes them to a teacher store (`fusellm_kernels.store.format`).

How it runs:
* the corpus is cut into shards of ``docs_per_shard`` consecutive documents; shard i goes to
  rank ``i % world_size``, so the store is the same whatever the number of ranks;
* within a shard, documents (or their windows) are sorted by length and grouped into
  batches of at most ``batch_tokens`` padded tokens: little padding, no packing across
  documents (so no model needs document-masked attention);
* each batch's logits are reduced on the device in row chunks (top-k, log-sum-exp, NLL in
  float32) and only the reductions leave it; no more than one batch of logits is alive;
* a shard is written to a temporary file and renamed; a sidecar JSON written after it marks
  it complete; a re-run skips complete shards and refuses changed settings.

Launch (one process, or data-parallel with torchrun)::

    fusellm teacher --corpus corpus/ --model models/llama-2-7b --output teacher/llama2
    torchrun --standalone --nproc-per-node 8 -m fusellm_kernels.cli teacher \
        --corpus corpus/ --model models/llama-2-7b --output teacher/llama2
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from torch import Tensor

from fusellm_kernels.pipeline.corpus import CorpusError, load_corpus, load_tokenizer, text_hash
from fusellm_kernels.pipeline.summary import RunSummary
from fusellm_kernels.store.format import (
    ShardArrays,
    StoreEncoding,
    write_shard,
    write_teacher_manifest,
)
from fusellm_kernels.store.manifest import (
    ShardInfo,
    StoreError,
    check_same_settings,
    read_json,
    record_path,
    settings_hash,
    verify_file,
    write_json_atomic,
)
from fusellm_kernels.store.lock import LockSet, confirm_holder
from fusellm_kernels.store.records import DocFlag, DocIndex

SETTINGS_FORMAT = "fusellm-teacher-settings"
DEFAULT_MAX_LENGTH = 2048


class TeacherPassError(ValueError):
    """A bad model, tokenizer or option; the message names what to change."""


@dataclass(frozen=True)
class TeacherConfig:
    """Options of ``fusellm teacher`` (the CLI's --help explains each)."""

    corpus: str
    model: str
    output: str
    tokenizer: str | None = None
    top_k: int = 10
    format: Literal["compact", "lossless"] = "compact"
    logit_dtype: Literal["float16", "bfloat16"] = "float16"
    store_lse: bool = False
    max_length: int | None = None
    overflow: Literal["split", "truncate"] = "split"
    add_eos: bool = True
    add_bos: bool = False
    docs_per_shard: int = 2048
    batch_tokens: int = 16384
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = "auto"
    mask_padded_vocab: bool = True
    logits_chunk_elems: int = 1 << 25
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise TeacherPassError(f"--top-k must be >= 1, got {self.top_k}")
        if self.format not in ("compact", "lossless"):
            raise TeacherPassError(f"--format must be compact or lossless, got {self.format!r}")
        if self.logit_dtype not in ("float16", "bfloat16"):
            raise TeacherPassError(f"--logit-dtype must be float16 or bfloat16, got {self.logit_dtype!r}")
        if self.overflow not in ("split", "truncate"):
            raise TeacherPassError(f"--overflow must be split or truncate, got {self.overflow!r}")
        if self.max_length is not None and self.max_length < 2:
            raise TeacherPassError(f"--max-length must be >= 2, got {self.max_length}")
        if self.docs_per_shard < 1:
            raise TeacherPassError(f"--docs-per-shard must be >= 1, got {self.docs_per_shard}")
        if self.batch_tokens < 1:
            raise TeacherPassError(f"--batch-tokens must be >= 1, got {self.batch_tokens}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise TeacherPassError(f"--dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise TeacherPassError(f"--device {self.device!r}: choose auto, cpu, cuda or cuda:N")

    def encoding(self) -> StoreEncoding:
        if self.format == "lossless":
            return StoreEncoding.lossless(self.store_lse)
        return StoreEncoding.compact(self.store_lse, self.logit_dtype)


# --- the device computation ------------------------------------------------------------------


def topk_nll_lse(
    logits: Tensor, labels: Tensor, k: int, num_valid: int, chunk_rows: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row reductions of logits [N, V] (any float dtype), computed in float32 by row chunks.

    labels: int64 [N], the next token of each row, or -1 where there is none.
    num_valid: columns >= num_valid (a padded vocabulary) are excluded (set to -inf).
    Returns topk values float32 [N, k] (descending), topk ids int64 [N, k], nll float32 [N]
    (0 where label < 0), lse float32 [N], nonfinite bool [N] (a NaN or +inf among the valid
    columns of the row, or a -inf among its top-k). Extra memory: one float32 [chunk_rows, V] chunk at a time.
    """
    n, v = logits.shape
    dev = logits.device
    vals = torch.empty(n, k, dtype=torch.float32, device=dev)
    ids = torch.empty(n, k, dtype=torch.int64, device=dev)
    nll = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    bad = torch.empty(n, dtype=torch.bool, device=dev)
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        x = logits[s:e].float()  # a copy for low-precision logits; float32 logits are overwritten in place
        if num_valid < v:
            x[:, num_valid:] = float("-inf")
        row_lse = torch.logsumexp(x, dim=1)
        top = torch.topk(x, k, dim=1, largest=True, sorted=True)
        # a NaN or +inf among the valid columns makes the lse non-finite; a -inf elsewhere is
        # a zero probability and harmless unless it reaches the top-k. (Testing these two
        # small results costs nothing; isfinite over the whole chunk costs more than the lse.)
        bad[s:e] = ~torch.isfinite(row_lse) | ~torch.isfinite(top.values).all(dim=1)
        lab = labels[s:e]
        picked = x.gather(1, lab.clamp_min(0).unsqueeze(1)).squeeze(1)
        nll[s:e] = torch.where(lab >= 0, row_lse - picked, torch.zeros_like(row_lse))
        lse[s:e] = row_lse
        vals[s:e] = top.values
        ids[s:e] = top.indices
    return vals, ids, nll, lse, bad


# --- tokenisation ----------------------------------------------------------------------------


def token_byte_lengths(text: str, offsets: list[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """int64 [n]: UTF-8 bytes of text each token covers; they sum to the text's byte length.

    Tokens are given character spans (a fast tokenizer's offsets). Each token is credited the
    bytes from the end of the text covered so far to its own end, so overlapping spans (a
    byte-level tokenizer splitting one character) are counted once, on the first token, and
    text no token covers (a dropped space) goes to the next token, or the last one.
    """
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    n = offs.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    cum = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(width)])
    ends = np.maximum.accumulate(offs[:, 1])
    prev = np.concatenate([np.zeros(1, dtype=np.int64), ends[:-1]])
    out = cum[ends] - cum[prev]
    out[-1] += cum[-1] - cum[ends[-1]]
    return out


@dataclass
class _Doc:
    doc_id: int
    text_hash: int
    ids: np.ndarray  # int64 [T], after truncation
    token_bytes: np.ndarray  # int64 [T]
    flags: int
    dropped: int  # tokens cut by truncation


def tokenize_documents(
    tok: Any,
    texts: list[str],
    doc_ids: list[int],
    hashes: list[int],
    add_bos: bool,
    add_eos: bool,
    max_length: int,
    overflow: str,
) -> list[_Doc]:
    """Tokenise a shard's documents: BOS? + text tokens + EOS?, with per-token text bytes."""
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    docs: list[_Doc] = []
    for text, did, h, ids, offs in zip(texts, doc_ids, hashes, enc["input_ids"], enc["offset_mapping"]):
        if text_hash(text) != h:
            raise CorpusError(
                f"document {did}: its text no longer matches the text_hash stored by `fusellm prepare`; "
                "the corpus was modified after preparation — prepare it again"
            )
        b = token_byte_lengths(text, offs)
        pre = [tok.bos_token_id] if add_bos else []
        post = [tok.eos_token_id] if add_eos else []
        all_ids = np.asarray(pre + list(ids) + post, dtype=np.int64)
        all_bytes = np.concatenate([np.zeros(len(pre), np.int64), b, np.zeros(len(post), np.int64)])
        flags = 0 if text.strip() else int(DocFlag.EMPTY)
        dropped = 0
        if all_ids.shape[0] > max_length:
            if overflow == "truncate":
                dropped = int(all_ids.shape[0] - max_length)
                all_ids, all_bytes = all_ids[:max_length], all_bytes[:max_length]
                flags |= int(DocFlag.TRUNCATED)
            else:
                flags |= int(DocFlag.WINDOWED)
        docs.append(_Doc(int(did), int(h), all_ids, all_bytes, flags, dropped))
    return docs


def plan_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group segment indices into batches, longest first. A batch holds rows while
    rows x longest <= batch_tokens (a segment longer than the budget runs alone), and it is
    also closed early when the next segment is shorter than 3/4 of its longest and it already
    holds a quarter of the budget: in a sparse shard that keeps padding under ~25% without
    making batches too small to use the device well. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if lengths[i] == 0:
            continue
        if cur:
            top = lengths[cur[0]]
            full = (len(cur) + 1) * top > batch_tokens
            drop = 4 * lengths[i] < 3 * top and 4 * len(cur) * top >= batch_tokens
            if full or drop:
                batches.append(cur)
                cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


# --- model loading and fingerprints ----------------------------------------------------------


def _dir_fingerprint(path: Path, names: tuple[str, ...], weight_suffixes: tuple[str, ...] = ()) -> str:
    """SHA-256 over small files' contents and large weight files' names and sizes (hashing
    tens of GB of weights on every start would cost minutes)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()[:16]
    for name in names:
        f = path / name
        if f.exists():
            h.update(name.encode())
            h.update(f.read_bytes())
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name.endswith(weight_suffixes):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def model_fingerprint(path: str) -> str:
    return _dir_fingerprint(Path(path), ("config.json",), (".safetensors", ".bin", ".pt", ".pth"))


#: the files of a tokenizer folder its fingerprint covers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                   "merges.txt")


def tokenizer_fingerprint(path: str) -> str:
    return _dir_fingerprint(Path(path), TOKENIZER_FILES)


def _context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx", "max_sequence_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@dataclass
class _Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype
    owns_group: bool


def model_dtype(cfg: TeacherConfig, device: torch.device) -> torch.dtype:
    """--dtype as a torch dtype; auto: bf16 on CUDA, fp32 elsewhere."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]


def _dist_runtime(cfg: TeacherConfig) -> _Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TeacherPassError(f"--device {cfg.device}: CUDA is not available on this machine")
        if device.index >= torch.cuda.device_count():
            raise TeacherPassError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    dtype = model_dtype(cfg, device)
    owns = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            owns = True
    return _Runtime(rank, world, local, device, dtype, owns)


def _config_vocab(mconf: Any) -> int | None:
    v = getattr(mconf, "vocab_size", None)
    if v is None and hasattr(mconf, "get_text_config"):
        v = getattr(mconf.get_text_config(), "vocab_size", None)
    return int(v) if v else None


def pass_limits(cfg: TeacherConfig, tok: Any, mconf: Any, logits_size: int) -> tuple[int, int]:
    """(max_length, num_ids): the window the model runs over and the ids top-k ranks, refused
    where --max-length exceeds the model's context or --top-k its vocabulary."""
    ctx = _context_length(mconf)
    max_length = cfg.max_length or min(ctx or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if ctx is not None and max_length > ctx:
        raise TeacherPassError(f"--max-length {max_length} exceeds the model's context of {ctx} tokens ({cfg.model}); lower it")
    num_ids = len(tok) if cfg.mask_padded_vocab else logits_size
    if cfg.top_k > num_ids:
        raise TeacherPassError(f"--top-k {cfg.top_k} exceeds the vocabulary of {cfg.model} ({num_ids} ids)")
    return max_length, num_ids


def load_tokenizer_and_config(cfg: TeacherConfig) -> tuple[Any, Any, int]:
    """(tokenizer, model config, logits size), all cheap: every check that needs no weights
    runs before the (possibly minutes-long) model load."""
    from transformers import AutoConfig

    mpath = Path(cfg.model)
    if not mpath.exists():
        raise TeacherPassError(f"--model {cfg.model} does not exist (models are loaded from local paths only; nothing is downloaded)")
    tpath = cfg.tokenizer or cfg.model
    if cfg.tokenizer is None and mpath.is_dir():
        has_tok = any((mpath / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
        if not has_tok:
            raise TeacherPassError(f"--model {cfg.model} holds no tokenizer files; pass the model's tokenizer with --tokenizer PATH")
    tok = load_tokenizer(tpath, "--tokenizer" if cfg.tokenizer else "--model (its tokenizer)")
    try:
        mconf = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TeacherPassError(f"--model {cfg.model}: no model config could be loaded ({e})") from None
    logits_size = _config_vocab(mconf)
    if logits_size is None:
        raise TeacherPassError(f"--model {cfg.model}: its config names no vocab_size")
    _check_weights(mpath)
    _check_vocab(len(tok), logits_size, tpath)
    if cfg.add_eos and tok.eos_token_id is None:
        raise TeacherPassError(f"the tokenizer ({tpath}) has no EOS token; pass --no-add-eos or a tokenizer with one")
    if cfg.add_bos and tok.bos_token_id is None:
        raise TeacherPassError(f"the tokenizer ({tpath}) has no BOS token; drop --add-bos or use a tokenizer with one")
    return tok, mconf, logits_size


def _check_weights(mpath: Path) -> None:
    """The weight files from_pretrained will look for, checked before anything is written
    (the load itself comes after the output directory is set up)."""
    index = next((mpath / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (mpath / n).exists()), None)
    if index is not None:
        try:
            files = set(read_json(index)["weight_map"].values())
        except (KeyError, TypeError, AttributeError):
            raise TeacherPassError(f"--model {mpath}: {index.name} has no weight_map; save the model again") from None
        missing = sorted(f for f in files if not (mpath / f).is_file())
        if missing:
            raise TeacherPassError(f"--model {mpath}: {index.name} names weight files that are missing: {missing[:3]}")
    elif not any((mpath / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        raise TeacherPassError(f"--model {mpath} holds no weights (model.safetensors or pytorch_model.bin); save the model "
                               "there with save_pretrained, or point --model at the folder that has them")


def _check_vocab(n_tok: int, logits_size: int, tpath: str) -> None:
    if n_tok > logits_size:
        raise TeacherPassError(
            f"the tokenizer ({tpath}) has {n_tok} tokens but the model's logits have only {logits_size} columns: "
            "ids past the logits cannot be scored, so this tokenizer does not belong to this model (check --tokenizer)"
        )


def load_model(cfg: TeacherConfig, mconf: Any, rt: _Runtime, n_tok: int) -> Any:
    """The model in eval mode on the device, refused unless its output layer has the rows its
    config's vocab_size (`load_tokenizer_and_config`'s logits size) says."""
    from transformers import AutoModelForCausalLM

    expected = _config_vocab(mconf)  # read before the load, which is given this config
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True, dtype=rt.dtype, config=mconf)
    except OSError as e:  # a weight file that went missing or unreadable since _check_weights
        raise TeacherPassError(f"--model {cfg.model}: its weights could not be loaded ({e})") from None
    except ValueError as e:  # transformers: "Unrecognized configuration class ... for AutoModelForCausalLM"
        raise TeacherPassError(f"--model {cfg.model} is not a causal language model transformers can load "
                               f"({str(e).splitlines()[0][:300]}); give a decoder-only model") from None
    model.to(rt.device).eval()
    out_emb = model.get_output_embeddings()
    logits_size = int(out_emb.weight.shape[0]) if out_emb is not None else int(_config_vocab(mconf) or 0)
    _check_vocab(n_tok, logits_size, cfg.tokenizer or cfg.model)
    if logits_size != expected:
        raise TeacherPassError(
            f"--model {cfg.model}: its config says vocab_size {expected} but its output layer has {logits_size} rows"
        )
    return model


# --- the pass --------------------------------------------------------------------------------


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


class _ShardRunner:
    """Runs the model over one shard's documents and returns the shard's arrays."""

    def __init__(self, model: Any, cfg: TeacherConfig, rt: _Runtime, max_length: int, num_valid: int, logits_size: int) -> None:
        self.model = model
        self.cfg = cfg
        self.rt = rt
        self.max_length = max_length
        self.num_valid = num_valid
        self.chunk_rows = max(1, cfg.logits_chunk_elems // logits_size)
        self.padded_slots = 0
        self.real_slots = 0

    def segments(self, docs: list[_Doc]) -> list[tuple[int, int, int]]:
        """(doc, start, length) of every forward row: windows of max_length for over-long documents."""
        L = self.max_length
        return [(di, s, min(L, d.ids.shape[0] - s)) for di, d in enumerate(docs) for s in range(0, d.ids.shape[0], L)]

    def num_batches(self, docs: list[_Doc]) -> int:
        """How many model calls `run(docs)` makes (sharded live candidates keep their calls in step)."""
        return len(plan_batches([s[2] for s in self.segments(docs)], self.cfg.batch_tokens))

    @torch.inference_mode()
    def run(self, docs: list[_Doc], on_batch: Callable[[int, int], None]) -> tuple[ShardArrays, dict[str, Any]]:
        k = self.cfg.top_k
        lengths = torch.tensor([d.ids.shape[0] for d in docs], dtype=torch.int64)
        offsets = torch.zeros(len(docs) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        total = int(offsets[-1])
        segs = self.segments(docs)
        last_seg_of_doc = {}
        for si, (di, _, _) in enumerate(segs):
            last_seg_of_doc[di] = si
        vals = torch.zeros(total, k, dtype=torch.float32)
        ids = torch.zeros(total, k, dtype=torch.int32)  # vocabularies fit int32; halves the shard's RAM
        nll = torch.zeros(total, dtype=torch.float32)
        lse = torch.zeros(total, dtype=torch.float32)
        bad = torch.zeros(total, dtype=torch.bool)
        all_ids = torch.from_numpy(np.concatenate([d.ids for d in docs]) if docs else np.zeros(0, np.int64))
        for batch in plan_batches([s[2] for s in segs], self.cfg.batch_tokens):
            blen = segs[batch[0]][2]
            b = len(batch)
            inp = torch.zeros(b, blen, dtype=torch.int64)
            mask = torch.zeros(b, blen, dtype=torch.int64)
            labels = torch.full((b, blen), -1, dtype=torch.int64)
            rows: list[Tensor] = []
            keep: list[Tensor] = []
            for j, si in enumerate(batch):
                di, s, n = segs[si]
                g = int(offsets[di]) + s
                inp[j, :n] = all_ids[g : g + n]
                mask[j, :n] = 1
                doc_end = int(offsets[di + 1])
                nxt_end = min(g + n + 1, doc_end)
                labels[j, : nxt_end - g - 1] = all_ids[g + 1 : nxt_end]
                rows.append(torch.arange(g, g + n))
                keep.append(torch.arange(j * blen, j * blen + n))
            full = bool(mask.all())
            out = self.model(
                input_ids=inp.to(self.rt.device),
                attention_mask=None if full else mask.to(self.rt.device),
                use_cache=False,
            )
            logits = out.logits
            del out
            v = logits.shape[-1]
            sel = torch.cat(keep).to(self.rt.device)
            r_vals, r_ids, r_nll, r_lse, r_bad = topk_nll_lse(
                logits.reshape(b * blen, v), labels.reshape(-1).to(self.rt.device), k, self.num_valid, self.chunk_rows
            )
            del logits
            row_idx = torch.cat(rows)
            vals[row_idx] = r_vals[sel].cpu()
            ids[row_idx] = r_ids[sel].to(torch.int32).cpu()
            nll[row_idx] = r_nll[sel].cpu()
            lse[row_idx] = r_lse[sel].cpu()
            bad[row_idx] = r_bad[sel].cpu()
            self.padded_slots += b * blen
            self.real_slots += int(row_idx.numel())
            on_batch(sum(1 for si in batch if last_seg_of_doc[segs[si][0]] == si), int(row_idx.numel()))
        doc_of_row = torch.repeat_interleave(torch.arange(len(docs)), lengths)
        token_bytes = torch.from_numpy(np.concatenate([d.token_bytes for d in docs]) if docs else np.zeros(0, np.int64))
        nll_sum = torch.zeros(len(docs), dtype=torch.float64).index_add_(0, doc_of_row, nll.double())
        bad_rows = torch.zeros(len(docs), dtype=torch.int64).index_add_(0, doc_of_row, bad.long())
        bytes_sum = torch.zeros(len(docs), dtype=torch.int64).index_add_(0, doc_of_row, token_bytes)
        first_bytes = torch.tensor([int(d.token_bytes[0]) if d.ids.shape[0] else 0 for d in docs], dtype=torch.int64)
        flags = torch.tensor([d.flags for d in docs], dtype=torch.int64)
        flags |= (bad_rows > 0).long() * int(DocFlag.NONFINITE)
        index = DocIndex(
            doc_ids=torch.tensor([d.doc_id for d in docs], dtype=torch.int64),
            text_hash=torch.tensor([d.text_hash for d in docs], dtype=torch.int64),
            flags=flags.to(torch.uint8),
            offsets=offsets,
            nll_sum=nll_sum,
            predicted_bytes=bytes_sum - first_bytes,
        )
        arrays = ShardArrays(index, all_ids, ids, vals, nll, token_bytes, lse if self.cfg.store_lse else None)
        counts = {
            "predicted_tokens": int(index.num_predicted().sum()),
            "text_bytes": int(bytes_sum.sum()),
            "nonfinite_docs": int((bad_rows > 0).sum()),
            "nonfinite_rows": int(bad_rows.sum()),
            "nonfinite_doc_ids": [int(d) for d in index.doc_ids[bad_rows > 0][:100]],
            "truncated_docs": sum(1 for d in docs if d.flags & DocFlag.TRUNCATED),
            "windowed_docs": sum(1 for d in docs if d.flags & DocFlag.WINDOWED),
            "empty_docs": sum(1 for d in docs if d.flags & DocFlag.EMPTY),
            "dropped_tokens": sum(d.dropped for d in docs),
        }
        return arrays, counts


def _shard_done(shards_dir: Path, i: int, check_hash: bool = True) -> ShardInfo | None:
    """The shard's record when it is complete on disk, else None (it is run again). A resume
    checks the shard's SHA-256 against its sidecar, not only its size: a damaged shard is
    rewritten rather than carried into the store. check_hash=False at the end of a pass,
    where every shard was written or verified by this job moments ago."""
    side = shards_dir / f"{_shard_name(i)}.json"
    if not side.exists():
        return None
    try:
        info = ShardInfo.from_json(read_json(side))
    except (StoreError, TypeError):
        return None  # a damaged sidecar: the shard is run again
    f = shards_dir.parent / info.file
    if not f.exists() or f.stat().st_size != info.size_bytes:
        return None
    if check_hash:
        try:
            verify_file(f, info.sha256, info.size_bytes, kind="teacher store")
        except StoreError:
            warnings.warn(f"{f} does not match its checksum in {side.name}; running that shard again", RuntimeWarning,
                          stacklevel=2)
            return None
    return info


def _prepare_output(cfg: TeacherConfig, out: Path, settings: dict[str, Any]) -> None:
    """Rank 0: clean or check the output directory and record the settings."""
    if cfg.overwrite and out.exists():
        # manifest first: from here on the directory never looks complete
        for name in ("manifest.json", "settings.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "shards", ignore_errors=True)
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    spath = out / "settings.json"
    if spath.exists():
        stored = read_json(spath)
        if stored.get("format") != SETTINGS_FORMAT:
            raise StoreError(f"{spath} is not a teacher-pass settings file; choose another --output")
        check_same_settings(stored["settings"], settings, out)
    else:
        if any(shards.iterdir()):
            raise StoreError(f"{shards} holds files but {spath} is missing; choose another --output or pass --overwrite")
        write_json_atomic(spath, {"format": SETTINGS_FORMAT, "settings": settings, "settings_hash": settings_hash(settings)})
    for f in shards.iterdir():  # temporary files of a killed run are never complete shards
        if f.name.startswith(".") and f.name.endswith(".tmp"):
            f.unlink(missing_ok=True)


def _broadcast_job_id(rt: _Runtime, job_id: str) -> str:
    """Rank 0's job id on every rank (the lock file must name it)."""
    import torch.distributed as dist

    box = [job_id]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _broadcast_error(rt: _Runtime, err: BaseException | None) -> None:
    """Make every rank raise when rank 0's set-up failed, instead of waiting forever."""
    if rt.world == 1:
        if err is not None:
            raise err
        return
    import torch.distributed as dist

    box: list[Any] = [None if err is None else f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    if box[0] is not None:
        raise StoreError(f"rank 0 failed to set up the output: {box[0]}")


def _prefetched(items: list[int], load: Callable[[int], list[_Doc]]) -> Iterator[tuple[int, list[_Doc]]]:
    """Yield (item, load(item)) while the next item loads in a background thread, so that
    tokenising the next shard overlaps the model's work on this one (fast tokenizers release
    the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, items[0]) if items else None
        for pos, item in enumerate(items):
            assert pending is not None  # set for every position by construction
            loaded = pending.result()
            pending = pool.submit(load, items[pos + 1]) if pos + 1 < len(items) else None
            yield item, loaded


def _settings(cfg: TeacherConfig, corpus_fingerprint: str, max_length: int, rt: _Runtime) -> dict[str, Any]:
    """What the stored data depends on; a resumed run must match it exactly. Keys are the
    command-line options (``--top-k`` for top_k), so an error can name the one to change.
    batch_tokens and device are left out: they change rounding at most, and a user who hit
    out-of-memory must be able to resume with smaller batches."""
    return {
        "corpus": corpus_fingerprint,
        "model": model_fingerprint(cfg.model),
        "tokenizer": tokenizer_fingerprint(cfg.tokenizer or cfg.model),
        "top_k": cfg.top_k,
        "format": cfg.format,
        "logit_dtype": cfg.encoding().logits,
        "store_lse": cfg.store_lse,
        "max_length": max_length,
        "overflow": cfg.overflow,
        "add_eos": cfg.add_eos,
        "add_bos": cfg.add_bos,
        "docs_per_shard": cfg.docs_per_shard,
        "dtype": str(rt.dtype).removeprefix("torch."),
        "mask_padded_vocab": cfg.mask_padded_vocab,
    }


def run_teacher_pass(cfg: TeacherConfig, on_shard_written: Callable[[int], None] | None = None) -> RunSummary:
    """Run the teacher pass on this rank's shards; rank 0 writes the manifest at the end.

    on_shard_written(shard_index) is called after each shard is complete on disk.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    rt = _dist_runtime(cfg)
    locks = LockSet("fusellm teacher")
    try:
        # 1. everything that needs no weights: inputs, vocabularies, settings, the output dir
        ds, corpus = load_corpus(cfg.corpus)
        tok, mconf, logits_size = load_tokenizer_and_config(cfg)
        max_length, num_ids = pass_limits(cfg, tok, mconf, logits_size)
        enc = cfg.encoding()
        settings = _settings(cfg, corpus.fingerprint, max_length, rt)
        out = Path(cfg.output)
        err: BaseException | None = None
        if rt.rank == 0:
            try:
                locks.write(out).read(cfg.corpus)  # one job per store; held until this function returns
                _prepare_output(cfg, out, settings)
            except BaseException as e:  # re-raised on every rank by _broadcast_error
                err = e
        _broadcast_error(rt, err)
        if rt.rank != 0:
            confirm_holder(out, _broadcast_job_id(rt, locks.job_id))
            check_same_settings(read_json(out / "settings.json")["settings"], settings, out)
        elif rt.world > 1:
            _broadcast_job_id(rt, locks.job_id)

        # 2. the model, and this rank's shards that are not complete yet
        model = load_model(cfg, mconf, rt, len(tok))
        shards_dir = out / "shards"
        n_docs = len(ds)
        n_shards = (n_docs + cfg.docs_per_shard - 1) // cfg.docs_per_shard
        todo = [i for i in range(n_shards) if i % rt.world == rt.rank and _shard_done(shards_dir, i) is None]

        def docs_of(i: int) -> list[_Doc]:
            a, b = i * cfg.docs_per_shard, min(n_docs, (i + 1) * cfg.docs_per_shard)
            rows = ds.select_columns(["doc_id", "text", "text_hash"])[a:b]
            return tokenize_documents(tok, rows["text"], rows["doc_id"], rows["text_hash"], cfg.add_bos, cfg.add_eos,
                                      max_length, cfg.overflow)

        # 3. run them: one shard in memory at a time, written atomically, sidecar last
        runner = _ShardRunner(model, cfg, rt, max_length, num_ids, logits_size)
        todo_docs = sum(min(n_docs, (i + 1) * cfg.docs_per_shard) - i * cfg.docs_per_shard for i in todo)
        bar = tqdm(total=todo_docs, unit="doc", disable=not cfg.progress or rt.rank != 0, desc=f"teacher {Path(cfg.model).name}")
        tokens_run = bytes_run = docs_run = nonfinite_run = 0
        t_compute = time.perf_counter()

        def on_batch(docs_done: int, rows: int) -> None:
            nonlocal tokens_run
            tokens_run += rows
            bar.update(docs_done)
            bar.set_postfix_str(f"{tokens_run / max(time.perf_counter() - t_compute, 1e-9):,.0f} tok/s")

        for i, docs in _prefetched(todo, docs_of):
            arrays, counts = runner.run(docs, on_batch)
            name = _shard_name(i)
            sha, size, array_bytes = write_shard(shards_dir / f"{name}.safetensors", arrays, enc, num_ids, cfg.top_k)
            idx = arrays.index
            info = ShardInfo(
                index=i,
                file=f"shards/{name}.safetensors",
                sha256=sha,
                size_bytes=size,
                documents=idx.num_docs,
                tokens=idx.num_tokens,
                first_doc_id=int(idx.doc_ids.min()) if idx.num_docs else -1,
                last_doc_id=int(idx.doc_ids.max()) if idx.num_docs else -1,
                extra={**counts, "array_bytes": array_bytes},
            )
            write_json_atomic(shards_dir / f"{name}.json", info.to_json())
            bytes_run += size
            docs_run += idx.num_docs
            nonfinite_run += counts["nonfinite_docs"]
            if on_shard_written is not None:
                on_shard_written(i)
        bar.close()

        # 4. totals over ranks; rank 0 writes the manifest once every shard is there
        totals = torch.tensor([tokens_run, bytes_run, docs_run, nonfinite_run, runner.real_slots, runner.padded_slots])
        if rt.world > 1:
            import torch.distributed as dist

            t = totals.to(rt.device)
            dist.all_reduce(t)
            totals = t.cpu()
            dist.barrier()
        manifest: dict[str, Any] | None = None
        if rt.rank == 0:
            manifest = _write_manifest(cfg, out, settings, corpus, model, tok, logits_size, max_length, enc, num_ids, n_shards)
        if rt.world > 1:
            dist.barrier()
    finally:
        locks.release()
        if rt.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    tokens_run, bytes_run, docs_run, nonfinite_run, real, padded = (int(x) for x in totals)
    extra: dict[str, Any] = {"output": str(out), "ranks": rt.world, "device": str(rt.device),
                             "dtype": str(rt.dtype).removeprefix("torch.")}
    if manifest is not None:
        extra["store documents"] = manifest["counts"]["documents"]
        extra["store tokens"] = manifest["counts"]["tokens"]
        extra["bytes/token"] = round(manifest["bytes_per_token"]["files"], 3)
        extra["flagged nonfinite"] = manifest["counts"]["nonfinite_docs"]
        if manifest["counts"]["nonfinite_docs"]:
            some = [d for s in manifest["shards"] for d in s["extra"].get("nonfinite_doc_ids", [])][:10]
            extra["nonfinite doc ids"] = ", ".join(map(str, some)) + (" ..." if manifest["counts"]["nonfinite_docs"] > 10 else "")
            warnings.warn(
                f"{manifest['counts']['nonfinite_docs']} documents had NaN/inf logits (document ids {extra['nonfinite doc ids']}); "
                "they are stored flagged DocFlag.NONFINITE (their NLL and CE scores are NaN); check the model's weights and --dtype",
                RuntimeWarning,
                stacklevel=2,
            )
    extra["padding efficiency"] = round(real / padded, 4) if padded else 1.0
    extra["nonfinite docs this run"] = nonfinite_run
    return RunSummary("teacher", docs_run, tokens_run, bytes_run, time.perf_counter() - t0, extra)


def _write_manifest(
    cfg: TeacherConfig,
    out: Path,
    settings: dict[str, Any],
    corpus: Any,
    model: Any,
    tok: Any,
    logits_size: int,
    max_length: int,
    enc: StoreEncoding,
    num_ids: int,
    n_shards: int,
) -> dict[str, Any]:
    import safetensors
    import transformers

    import fusellm_kernels

    shards_dir = out / "shards"
    infos: list[ShardInfo] = []
    for i in range(n_shards):
        info = _shard_done(shards_dir, i, check_hash=False)
        if info is None:
            raise StoreError(f"shard {i} of {out} is missing after the pass ({_shard_name(i)}.json); run the command again to resume")
        infos.append(info)
    header: dict[str, Any] = {
        "model": {
            "path": record_path(cfg.model, out),
            "fingerprint": settings["model"],
            "model_type": getattr(model.config, "model_type", None),
            "architectures": getattr(model.config, "architectures", None),
            "logits_size": logits_size,
            "context_length": _context_length(model.config),
            "compute_dtype": settings["dtype"],
        },
        "tokenizer": {
            "path": record_path(cfg.tokenizer or cfg.model, out),
            "fingerprint": settings["tokenizer"],
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        "corpus": {"path": record_path(corpus.path, out), "fingerprint": corpus.fingerprint, "num_documents": corpus.num_documents},
        "max_length": max_length,
        "settings": settings,
        "settings_hash": settings_hash(settings),
        "software": {
            "fusellm_kernels": fusellm_kernels.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    return write_teacher_manifest(out, infos, enc, cfg.top_k, num_ids, header)
