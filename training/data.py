"""Training data: assembled blocks, their candidates' teacher stores, a resumable sampler.

`open_data` checks everything that can be checked without reading the blocks (manifests,
stores, vocab maps, block length, vocabularies) before the first step and names the file at
fault. `BlockSampler` decides which blocks form each optimiser step; its state is the global
(epoch, step) pair, so it does not depend on the number of ranks: the same global batch is
split differently over 1 or 8 ranks, and the gradient, normalised by the global token count,
is the same. It shuffles with shard locality (shard order, then blocks within a window of
shards), so that `BlockReader`, which keeps a few block shards in memory, reads each shard
about once per epoch. `make_batch` turns a rank's share of blocks into a `TrainBatch` on the
device (teacher tensors gathered there by `build_batch`); `Prefetcher` builds the next one
on a background thread while the current one trains.
"""
from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusellm_kernels.pipeline.batches import TrainBatch, _positions, build_batch  # one definition of restarting positions
from fusellm_kernels.store.alignment import AlignmentStore
from fusellm_kernels.store.blocks import Block, BlockStore
from fusellm_kernels.store.format import TeacherStore
from fusellm_kernels.store.lock import LockSet
from fusellm_kernels.store.manifest import StoreError, verify_file


class DataError(StoreError):
    """Training data that cannot be used as given; the message names the file."""


class BlockReader:
    """Blocks by global index, keeping the `cache_shards` most recently used block shards
    (BlockStore itself keeps one; a window of shuffled shards needs several). Thread-safe:
    the prefetch thread and the training thread both read blocks."""

    def __init__(self, store: BlockStore, cache_shards: int) -> None:
        self.store, self.cache_shards = store, max(1, cache_shards)
        counts = [int(info.extra["blocks"]) for info in store.shards]
        self.starts = [0]
        for c in counts:
            self.starts.append(self.starts[-1] + c)
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.starts[-1]

    def shard_of(self, index: int) -> int:
        return bisect.bisect_right(self.starts, index) - 1

    def __getitem__(self, index: int) -> Block:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} of {len(self)} in {self.store.root}")
        i = self.shard_of(index)
        with self._lock:
            shard = self._cache.get(i)
            if shard is None:
                shard = self.store.shard(i)  # verifies the shard's checksum as it loads it
                self._cache[i] = shard
                while len(self._cache) > self.cache_shards:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(i)
        return shard.block(index - self.starts[i])

    def num_labels(self, index: int) -> int:
        """Rows of block `index` with a next token."""
        return int((self[index].labels >= 0).sum())

    def prepare(self, indices: list[int]) -> None:
        """Blocks about to be read (online blocks run their candidates; stored ones need nothing)."""

    def release(self, indices: list[int]) -> None:
        """Blocks built into a batch (online blocks drop records no other block needs; stored ones hold none)."""


@dataclass
class TrainData:
    blocks: BlockReader
    # each candidate's teacher table: its teacher store, or for a candidate aligned with
    # --method pta its aligned-rows alignment (`build_batch`); empty in CLM mode
    stores: list[TeacherStore | AlignmentStore]
    vocab_maps: list[torch.Tensor | None]
    names: list[str]                     # candidate names, target first
    train_range: range                   # block indices used for training
    eval_blocks: BlockReader | None
    eval_range: range
    empty_to_target: bool = False        # alignments made with --reference: the original's rule for empty rows


def _load_vocab_map(path: Path, source_vocab: int, target_vocab: int, sha256: str | None = None) -> torch.Tensor:
    if not path.exists():
        raise DataError(f"vocab map {path} (named in the blocks manifest) is missing")
    if sha256 is not None:  # the map `fusellm align` aligned with, not one replaced since
        verify_file(path, sha256, None, kind="alignment")
    m = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(m, torch.Tensor) or m.dim() != 1 or m.dtype not in (torch.int32, torch.int64):
        raise DataError(f"vocab map {path} must hold a 1-D int32 tensor (source id -> target id)")
    if m.numel() < source_vocab:
        raise DataError(f"vocab map {path} covers {m.numel()} source ids but its teacher store holds ids up to {source_vocab - 1}")
    if m.numel() and int(m.max()) >= target_vocab:
        raise DataError(f"vocab map {path} sends ids to {int(m.max())}, beyond the model's vocabulary of {target_vocab}")
    return m.int()


def check_tokenizer(blocks: BlockStore, model: str, flag: str = "--model") -> None:
    """Refuse a model whose tokenizer did not make the blocks' target ids (candidate 0's
    fingerprint, recorded by `fusellm assemble`). A model folder without tokenizer files
    cannot be checked: a warning says so."""
    from fusellm_kernels.pipeline.teacher_pass import TOKENIZER_FILES, tokenizer_fingerprint

    recorded = blocks.candidates[0].get("tokenizer_fingerprint") if blocks.candidates else None
    if recorded is None:
        return  # blocks from before fingerprints were recorded
    if not any((Path(model) / name).exists() for name in TOKENIZER_FILES):
        import warnings

        warnings.warn(f"{flag} {model} holds no tokenizer files, so it cannot be checked against the tokenizer that "
                      f"made {blocks.root}", UserWarning, stacklevel=2)
        return
    found = tokenizer_fingerprint(model)
    if found != recorded:
        raise DataError(f"{flag} {model}: its tokenizer (fingerprint {found}) did not make the blocks in {blocks.root} "
                        f"(made with {recorded}, the target model {blocks.candidates[0].get('name')}); give the target "
                        "model these blocks were assembled for, or assemble blocks for this model")


def _candidate_store(blocks: BlockStore, i: int, data: str) -> Path:
    path = blocks.candidate_path(i, "store")
    assert path is not None
    if blocks.format_version < 2 and not path.is_absolute() and not path.exists():
        path = Path(data) / path  # version 1: stores may be named relative to the blocks
    return path


def _aligned_rows(blocks: BlockStore, i: int, name: str, verify: bool, locks: LockSet | None) -> AlignmentStore:
    """Candidate i's aligned-rows alignment (`fusellm align --method pta`), whose rows are its
    teacher, checked to cover the blocks' documents."""
    path = blocks.candidate_path(i, "alignment")
    manifest = blocks.root / "manifest.json"
    if path is None:
        raise DataError(f"{manifest}: candidate {i} ({name}) was aligned with --method pta but names no alignment")
    if locks is not None:
        locks.read(path)
    al = AlignmentStore(path, verify=verify, aligned_rows_ok=True)
    if not al.aligned_rows:
        raise DataError(f"{manifest} says candidate {i} ({name}) was aligned with --method pta, but {path} holds "
                        f"{al.method} position maps; assemble the blocks again")
    _check_covers(blocks, al.shards, f"candidate {i}'s alignment {path}", "alignment")
    return al


def _check_covers(blocks: BlockStore, shards: list[Any], what: str, kind: str) -> None:
    """A store or alignment of another corpus (or a partial one) rarely covers the blocks'
    document ids: refused, naming the first block shard it misses."""
    lo = min((sh.first_doc_id for sh in shards), default=0)
    hi = max((sh.last_doc_id for sh in shards), default=-1)
    for sh in blocks.shards:
        if sh.documents and (sh.first_doc_id < lo or sh.last_doc_id > hi):
            raise DataError(f"{blocks.root / sh.file} holds documents {sh.first_doc_id}..{sh.last_doc_id} but {what} "
                            f"holds ids {lo}..{hi}: is it the {kind} these blocks were assembled from?")


def _eval_blocks(eval_data: str, seq_len: int, verify: bool, locks: LockSet | None) -> BlockReader:
    """--eval-data: held-out blocks of --seq-len rows, read in order (only their tokens are used)."""
    if locks is not None:
        locks.read(eval_data)
    store = BlockStore(eval_data, verify=verify)
    if store.block_len != seq_len:
        raise DataError(f"{Path(eval_data) / 'manifest.json'} has block_len {store.block_len}, not --seq-len {seq_len}")
    return BlockReader(store, 1)


def open_data(data: str, eval_data: str, eval_holdout: int, *, seq_len: int, model_vocab: int, fusion: bool,
              cache_shards: int = 4, verify: bool = True, locks: LockSet | None = None) -> TrainData:
    """Open and cross-check the blocks, stores and vocab maps (no block is read yet).
    verify: check each file's SHA-256 before its first use, once per process (`--no-verify`
    skips it, unsafe). locks: rank 0's `LockSet`; the stores read are locked shared."""
    if locks is not None:
        locks.read(data)
    blocks = BlockStore(data, verify=verify)
    manifest = Path(data) / "manifest.json"
    if blocks.block_len != seq_len:
        raise DataError(f"{manifest} has block_len {blocks.block_len} but --seq-len is {seq_len}; set --seq-len {blocks.block_len}")
    stores: list[TeacherStore | AlignmentStore] = []
    maps: list[torch.Tensor | None] = []
    names = [str(c.get("name") or f"candidate{i}") for i, c in enumerate(blocks.candidates)]
    short = [Path(n).name or n for n in names]  # assembled blocks name candidates by model path
    names = short if len(set(short)) == len(short) else names
    if fusion:
        if not blocks.candidates:
            raise DataError(f"{manifest} names no candidates; fusion needs at least the target model's teacher store")
        for i, cand in enumerate(blocks.candidates):
            if i > 0 and cand.get("method", "minED") == "pta":
                stores.append(_aligned_rows(blocks, i, names[i], verify, locks))
                maps.append(None)  # the aligned rows are target ids
                continue
            store_path = _candidate_store(blocks, i, data)
            if locks is not None:
                locks.read(store_path)
            store = TeacherStore(store_path, verify=verify)
            num_ids = int(store.manifest["num_ids"])
            if i == 0 and num_ids > model_vocab:
                raise DataError(f"{store_path / 'manifest.json'}: the target's store holds ids up to {num_ids - 1}, "
                                f"beyond the model's vocabulary of {model_vocab}; is --model the target model of these blocks?")
            vm = cand.get("vocab_map")
            if i > 0 and not vm:
                raise DataError(f"{manifest}: candidate {i} ({names[i]}) has no vocab_map; every source needs one")
            vm_path = blocks.candidate_path(i, "vocab_map")
            maps.append(_load_vocab_map(vm_path, num_ids, model_vocab, cand.get("vocab_map_sha256") if verify else None)
                        if vm_path else None)
            stores.append(store)
            _check_covers(blocks, store.shards, f"candidate {i}'s teacher store {store_path}", "store")
        first = blocks.shard(0) if len(blocks.shards) else None
        if first is not None and first.source_pos.shape[0] != len(stores):
            raise DataError(f"{blocks.root / blocks.shards[0].file} holds {first.source_pos.shape[0]} candidates "
                            f"but {manifest} names {len(stores)}")
    n = len(blocks)
    reader = BlockReader(blocks, cache_shards + 1)
    if eval_data:
        eval_blocks: BlockReader | None = _eval_blocks(eval_data, seq_len, verify, locks)
        train_range, eval_range = range(n), range(len(eval_blocks))
    else:
        if eval_holdout >= n:
            raise DataError(f"--eval-holdout {eval_holdout} leaves no training blocks: {manifest} holds {n}")
        eval_blocks = reader if eval_holdout else None
        train_range, eval_range = range(n - eval_holdout), range(n - eval_holdout, n)
    empty_to_target = any(bool(c.get("reference")) for c in blocks.candidates)
    return TrainData(reader, stores, maps, names, train_range, eval_blocks, eval_range, empty_to_target)


def open_online_data(cfg: Any, model_vocab: int, device: torch.device, cache_dir: Path,
                     locks: LockSet | None = None, shard: Callable[[Any], Any] | None = None) -> TrainData:
    """`--online`: blocks packed from --corpus, the candidates (a frozen copy of --model, then
    each --candidate) loaded on this rank's device and run live (`pipeline/live.py`); held-out
    blocks from --eval-data as offline."""
    from fusellm_kernels.pipeline.live import open_online

    if locks is not None:
        locks.read(cfg.corpus)
    fusion = cfg.mode == "fusion"
    blocks = open_online(cfg.corpus, cfg.model, list(cfg.candidate) if fusion else [], block_len=cfg.seq_len,
                         top_k=cfg.top_k or 10, score=cfg.score, device=device, cache_dir=cache_dir,
                         source_markers=list(cfg.source_marker) or None, target_marker=cfg.target_marker or None,
                         align_workers=cfg.align_workers, shard=shard, progress=cfg.progress and locks is not None,
                         # the bucketed tail reads each row's full log-sum-exp: the live passes keep it
                         teacher_options={"store_lse": True} if cfg.teacher_tail == "bucket" else None)
    if blocks.teachers[0].logits_size > model_vocab:
        raise DataError(f"--model {cfg.model}: its logits have {blocks.teachers[0].logits_size} columns, its config says {model_vocab}")
    eval_blocks: BlockReader | None = None
    if cfg.eval_data:
        eval_blocks = _eval_blocks(cfg.eval_data, cfg.seq_len, cfg.verify, locks)
        check_tokenizer(eval_blocks.store, cfg.model)
    return TrainData(blocks, blocks.stores if fusion else [], blocks.vocab_maps if fusion else [], blocks.names,  # type: ignore[arg-type]
                     range(len(blocks)), eval_blocks, range(len(eval_blocks) if eval_blocks is not None else 0))


class BlockSampler:
    """Shuffled global batches of block indices, one permutation per epoch (seeded by seed + epoch).

    The permutation keeps shard locality: the shards are shuffled, then taken `window` at a
    time, and the blocks of each window are shuffled among themselves (with one shard this
    is a plain shuffle). Optimiser step s of an epoch takes positions [s·G, (s+1)·G) of it
    (G = global batch); an incomplete last batch is dropped, so every step has G blocks.
    Rank r of W takes the r-th contiguous 1/W of the global batch, and micro-step a of its
    share the a-th slice of `micro` blocks.
    """

    def __init__(self, indices: range, global_batch: int, seed: int, shard_starts: list[int] | None = None, window: int = 4) -> None:
        self.indices, self.global_batch, self.seed = indices, global_batch, seed
        self.shard_starts, self.window = shard_starts or [0, indices.stop], window
        self.steps_per_epoch = len(indices) // global_batch
        self.epoch, self.step_in_epoch = 0, 0
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            lo, hi = self.indices.start, self.indices.stop
            shards = [range(max(a, lo), min(b, hi)) for a, b in zip(self.shard_starts, self.shard_starts[1:]) if min(b, hi) > max(a, lo)]
            order = torch.randperm(len(shards), generator=g).tolist() if len(shards) > 1 else [0]
            self._perm = []
            for w in range(0, len(order), self.window):
                pool = [i for k in order[w:w + self.window] for i in shards[k]]
                self._perm += [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
        return self._perm

    def _check(self) -> None:
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.indices)} training blocks cannot fill one global batch of {self.global_batch}; "
                            "lower --global-batch")

    def next_global_batch(self) -> list[int]:
        """Block indices of the next optimiser step (all ranks), advancing the state."""
        self._check()
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch, self._perm = self.epoch + 1, 0, None
        s = self.step_in_epoch
        self.step_in_epoch += 1
        return self._permutation()[s * self.global_batch:(s + 1) * self.global_batch]

    def peek(self) -> list[int]:
        """What `next_global_batch` will return, without advancing (for prefetching)."""
        state, perm = (self.epoch, self.step_in_epoch), self._perm
        batch = self.next_global_batch()
        (self.epoch, self.step_in_epoch), self._perm = state, perm
        return batch

    @staticmethod
    def micro_batches(global_batch: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
        share = len(global_batch) // world
        mine = global_batch[rank * share:(rank + 1) * share]
        return [mine[a:a + micro] for a in range(0, len(mine), micro)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "global_batch": self.global_batch, "num_blocks": len(self.indices), "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("seed", self.seed), ("global_batch", self.global_batch), ("num_blocks", len(self.indices)),
                          ("window", self.window)):
            if int(state[key]) != mine:
                raise DataError(f"the checkpoint's sampler had {key}={state[key]} but this run has {mine}; "
                                "resume with the same data, --seed and --global-batch")
        self.epoch, self.step_in_epoch, self._perm = int(state["epoch"]), int(state["step_in_epoch"]), None


def check_lse(data: TrainData) -> None:
    """`--teacher-tail bucket`: every candidate's records must carry the lse, refused before
    the first step rather than at the first batch."""
    sources = getattr(data.blocks, "teachers", None) or data.stores  # online: the live/stored candidates
    for name, src in zip(data.names, sources):
        enc = getattr(src, "encoding", None) or getattr(getattr(src, "store", None), "encoding", None)
        if enc is not None and not enc.lse:
            root = getattr(src, "root", name)
            raise DataError(f"--teacher-tail bucket: candidate {name}'s teacher store {root} has no log-sum-exp; run "
                            "`fusellm teacher` for it again with --store-lse, or use --teacher-tail renormalize")


def make_batch(data: TrainData, indices: list[int], *, fusion: bool, weighting: str, top_k: int,
               device: torch.device, store: BlockReader | None = None, with_lse: bool = False) -> TrainBatch:
    """The `TrainBatch` of some blocks; in CLM mode (or for evaluation) with one empty teacher slot."""
    reader = store or data.blocks
    if fusion:
        reader.prepare(indices)  # online: the candidates run once for the whole micro-batch
    blocks: list[Block] = [reader[i] for i in indices]
    if fusion:
        batch = build_batch(blocks, data.stores, data.vocab_maps, weighting=weighting, k=top_k or None, device=device,
                            empty_to_target=data.empty_to_target, with_lse=with_lse)
        reader.release(indices)
        return batch
    doc_index = torch.stack([b.doc_index for b in blocks]).long()
    n = doc_index.numel()
    return TrainBatch(
        input_ids=torch.stack([b.input_ids for b in blocks]).long().to(device),
        labels=torch.stack([b.labels for b in blocks]).long().to(device),
        position_ids=_positions(doc_index).to(device), segment_ids=torch.arange(n, device=device), doc_index=doc_index.to(device),
        attention_mask=(doc_index >= 0).to(device),
        teacher_ids=torch.full((1, n, 1), -1, dtype=torch.int32, device=device),
        teacher_logits=torch.zeros(1, n, 1, device=device), teacher_ce=torch.zeros(1, n, device=device),
    )


class Prefetcher:
    """Builds the next batch on one background thread while the current one trains.

    `get(indices, upcoming)` returns the batch of `indices` (the prefetched one when it was
    asked for, else built now) and starts building `upcoming`. Batches are the same either
    way; on CUDA the teacher gather runs on the same stream as training, so its kernels are
    ordered before the forward that reads them.
    """

    def __init__(self, build: Callable[[list[int]], TrainBatch], enabled: bool, device: torch.device) -> None:
        self.build, self.enabled = build, enabled
        # the current CUDA device is per thread: the builder's kernels (the teacher gather) must
        # launch on this rank's device, not on device 0
        init = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fusellm-batches", initializer=init) if enabled else None
        self._pending: tuple[list[int], Future[TrainBatch]] | None = None

    def get(self, indices: list[int], upcoming: list[int] | None) -> TrainBatch:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == indices:
            batch = pending[1].result()
        else:
            if pending is not None:
                pending[1].exception()  # wait (never two builds at once: the store readers are not shared safely)
            batch = self.build(indices)
        if upcoming and self._pool is not None:
            self._pending = (upcoming, self._pool.submit(self.build, upcoming))
        return batch

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].exception()  # wait; a failed speculative build is not this run's error
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown()
