"""Online fusion: the candidates run inside training, on the documents a batch needs.

Offline, every candidate is run once over the corpus (`fusellm teacher`), aligned
(`fusellm align`) and packed into blocks (`fusellm assemble`). Online, the same three
stages run on demand, with the same code, for the blocks a micro-batch is about to train:

- `LiveTeacher` runs one model over some documents with the teacher pass's tokenizer
  settings and its `_ShardRunner` (top-k ids and logits, per-token NLL, token bytes), and
  passes the result through the store encoding and `decode_record`: a live record is what
  `fusellm teacher` would have stored with the same `--format` (lossless by default: nothing
  is stored, so nothing needs compacting).
- `DocumentAligner` (the aligner of `fusellm align`) maps each source record onto the
  target's tokens; its vocabulary map is computed once and cached on disk by the two
  tokenizers' fingerprints.
- `OnlineBlocks` packs the corpus's documents into target blocks exactly as `fusellm
  assemble` does (`plan_blocks`, the target tokenizer's lengths) and builds a block with
  assemble's `_build_shard` from the live records. Blocks and teacher tables then go through
  the offline path unchanged (`build_batch`, the gather, segment weights, the fused head).

Where a candidate's rows come from is the one thing that differs: `build_batch` asks each
candidate for `get(doc_id)`, which a `TeacherStore` answers from disk and a live view from
the records just computed, so stored and live candidates mix.

Whole documents. A candidate needs a whole document (its context, its per-document CE
score), but a document may straddle two blocks that train at different steps. The records
of a document are computed when the first block holding it is built and kept until every
block holding it has been built in this epoch (a count per document), then dropped. The
sampler shuffles blocks within windows of `--shuffle-window` (4) shards of 512 blocks, so
at most about 2048 straddling documents are held at once (one per block boundary; a 2048-row
llama2-7b block's document records are ~45 B/token per candidate: ~0.4 GB for three
candidates at worst); documents are not re-packed to avoid straddling, because the blocks
must equal `fusellm assemble`'s.
Documents whose logits turn out non-finite cannot be left out before packing as assemble
does (nothing has run yet): their rows keep the target's CE and get no teacher.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fusellm_kernels.pipeline.align_job import DocumentAligner, load_vocab_map, save_vocab_map
from fusellm_kernels.pipeline.assemble import AssembleConfig, _build_shard, plan_blocks
from fusellm_kernels.pipeline.teacher_pass import (
    TeacherConfig,
    TeacherPassError,
    _Runtime,
    _ShardRunner,
    load_model,
    load_tokenizer_and_config,
    model_dtype,
    model_fingerprint,
    pass_limits,
    tokenize_documents,
    tokenizer_fingerprint,
)
from fusellm_kernels.store.alignment import DocAlignment
from fusellm_kernels.store.blocks import Block
from fusellm_kernels.store.format import decode_record, encode_shard, id_bits
from fusellm_kernels.store.manifest import StoreError
from fusellm_kernels.store.records import DocFlag, TeacherRecord


class CorpusTexts:
    """A prepared corpus's texts by document id (the corpus of `fusellm prepare`)."""

    def __init__(self, path: str) -> None:
        from fusellm_kernels.pipeline.corpus import load_corpus

        self.path = path
        self.ds, self.info = load_corpus(path)
        cols = self.ds.select_columns(["doc_id", "text_hash"])[:]
        self.doc_ids: list[int] = [int(d) for d in cols["doc_id"]]
        self.hashes: list[int] = [int(h) for h in cols["text_hash"]]
        self._row = {d: i for i, d in enumerate(self.doc_ids)}

    def texts(self, doc_ids: Sequence[int]) -> tuple[list[str], list[int]]:
        rows = [self._row[d] for d in doc_ids]
        return list(self.ds[rows]["text"]) if rows else [], [self.hashes[r] for r in rows]


class LiveTeacher:
    """One candidate model run on demand: `records(doc_ids)` returns the documents'
    `TeacherRecord`s as `fusellm teacher` with `cfg` would store them. The model is frozen
    (inference mode); `cfg.device`/`cfg.dtype` place it (auto: the training device, bf16 on
    CUDA)."""

    def __init__(self, cfg: TeacherConfig, corpus: CorpusTexts, device: torch.device, load: bool = True,
                 shard: Callable[[Any], Any] | None = None) -> None:
        tok, mconf, logits_size = load_tokenizer_and_config(cfg)
        self.max_length, self.num_ids = pass_limits(cfg, tok, mconf, logits_size)
        self._rt = _Runtime(rank=0, world=1, local_rank=0, device=device, dtype=model_dtype(cfg, device), owns_group=False)
        self._mconf = mconf
        self.cfg, self.corpus, self.tokenizer, self.logits_size = cfg, corpus, tok, logits_size
        self.root = Path(cfg.model)  # named in errors, as a store's root is
        self.k = cfg.top_k
        self.encoding = cfg.encoding()
        self.fingerprint = model_fingerprint(cfg.model)
        self.tokenizer_path = cfg.tokenizer or cfg.model
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer_path)
        self._runner: _ShardRunner | None = None
        # sharded (FSDP2) across the ranks of `shard`'s group: every rank must make the same
        # number of model calls, in step (see `records`)
        self._shard, self._group = shard, getattr(shard, "group", None)
        if load:
            self.load()

    def load(self) -> None:
        """Load the model (frozen, in inference mode) unless it is loaded."""
        if self._runner is not None:
            return
        model = load_model(self.cfg, self._mconf, self._rt, len(self.tokenizer))
        for p in model.parameters():
            p.requires_grad_(False)
        if self._shard is not None:
            self._shard(model)
        self._runner = _ShardRunner(model, self.cfg, self._rt, self.max_length, self.num_ids, self.logits_size)

    def tokenize(self, doc_ids: Sequence[int]) -> list[Any]:
        texts, hashes = self.corpus.texts(doc_ids)
        return tokenize_documents(self.tokenizer, texts, list(doc_ids), hashes, self.cfg.add_bos, self.cfg.add_eos,
                                  self.max_length, self.cfg.overflow)

    def token_records(self, doc_ids: Sequence[int]) -> dict[int, TeacherRecord]:
        """Records holding only the tokens (and their bytes): what blocks for CE alone need,
        with no model run. Their top-k slots are empty (id −1) and their NLL 0."""
        out = {}
        for d in self.tokenize(doc_ids):
            n = int(d.ids.shape[0])
            out[d.doc_id] = TeacherRecord(
                doc_id=d.doc_id, text_hash=d.text_hash, flags=d.flags, input_ids=torch.from_numpy(d.ids),
                topk_ids=torch.full((n, self.k), -1, dtype=torch.int64), topk_logits=torch.zeros(n, self.k),
                nll=torch.zeros(n), token_bytes=torch.from_numpy(d.token_bytes).to(torch.int32), lse=None, nll_sum=0.0)
        return out

    @property
    def sharded(self) -> bool:
        return self._shard is not None

    def records(self, doc_ids: Sequence[int]) -> dict[int, TeacherRecord]:
        """The documents' records. Sharded, this is a collective: every rank of the group calls
        it the same number of times (with documents or none), and ranks with fewer model calls
        than the busiest make empty ones, so the layers' all-gathers stay in step."""
        self.load()
        assert self._runner is not None
        docs = self.tokenize(doc_ids) if doc_ids else []
        if self._group is not None:
            import torch.distributed as dist

            mine = self._runner.num_batches(docs)
            most = torch.tensor([mine], device=self._rt.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self._group)
            with torch.inference_mode():
                for _ in range(int(most) - mine):
                    self._runner.model(input_ids=torch.zeros(1, 1, dtype=torch.int64, device=self._rt.device), use_cache=False)
        if not docs:
            return {}
        arrays, _ = self._runner.run(docs, lambda docs, rows: None)
        tensors, _ = encode_shard(arrays, self.encoding, self.num_ids, self.k)  # the store's rounding, in memory
        bits = id_bits(self.num_ids)
        return {int(d): decode_record(tensors.__getitem__, arrays.index, pos, self.encoding, self.k, bits)
                for pos, d in enumerate(arrays.index.doc_ids.tolist())}


class StoredTeacher:
    """A source candidate whose records come from its teacher store (`fusellm teacher`)
    rather than from a live model: the same `records(doc_ids)` as `LiveTeacher`, so stored
    and live candidates mix in one run. The store must be of the training corpus."""

    def __init__(self, path: str, corpus: CorpusTexts, verify: bool = True) -> None:
        from fusellm_kernels.pipeline.align_job import _tokenizer
        from fusellm_kernels.store.format import TeacherStore

        self.store = TeacherStore(path, verify=verify)
        if self.store.manifest["corpus"]["fingerprint"] != corpus.info.fingerprint:
            raise StoreError(f"--candidate {path}: this teacher store was made from another corpus than --corpus {corpus.path}")
        self.root, self.k = self.store.root, self.store.k
        self.tokenizer = _tokenizer(self.store)  # refused if its files changed since the store was made
        self.tokenizer_path = str(self.store.path_of("tokenizer"))
        self.logits_size = int(self.store.manifest["model"]["logits_size"])
        self.fingerprint = str(self.store.manifest["model"]["fingerprint"])
        self.tokenizer_fingerprint = str(self.store.tokenizer_fingerprint)

    def records(self, doc_ids: Sequence[int]) -> dict[int, TeacherRecord]:
        out = {}
        for d in doc_ids:
            try:
                out[int(d)] = self.store.get(int(d))
            except KeyError:
                raise StoreError(f"document {d} of --corpus is missing from the teacher store {self.root}") from None
        return out


def is_teacher_store(path: str) -> bool:
    """Whether `path` is a teacher store (a --candidate may name one instead of a model folder)."""
    from fusellm_kernels.store.format import TEACHER_STORE_FORMAT
    from fusellm_kernels.store.manifest import read_json

    manifest = Path(path) / "manifest.json"
    try:
        return manifest.is_file() and read_json(manifest).get("format") == TEACHER_STORE_FORMAT
    except (OSError, ValueError, StoreError):
        return False


@dataclass(frozen=True)
class AlignerSpec:
    """How to build a source candidate's aligner again, in a worker process: the two
    tokenizers' paths, the aligner's options and the folder of its cached vocabulary map."""

    target_tokenizer: str
    source_tokenizer: str
    options: dict[str, Any]
    vocab_map_dir: str

    def build(self) -> DocumentAligner:
        from fusellm_kernels.pipeline.corpus import load_tokenizer

        return DocumentAligner(load_tokenizer(self.target_tokenizer), load_tokenizer(self.source_tokenizer),
                               vocab_map=load_vocab_map(Path(self.vocab_map_dir)), **self.options)


def cached_aligner(cache_dir: Path, options: dict[str, Any], target: Any, source: Any) -> tuple[DocumentAligner, AlignerSpec]:
    """The aligner of a source candidate against the target (`LiveTeacher`/`StoredTeacher`s),
    its vocabulary map computed once per pair of tokenizers and the options the map depends
    on, and kept under `cache_dir/<source fp>-<target fp>-<options>/` with its hash (a
    resumed or second run reuses it); and the spec that builds it again."""
    import hashlib
    import json

    keyed = {k: options.get(k) for k in ("vocab_align", "source_marker", "target_marker", "source_logits_size",
                                         "target_logits_size")}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir / f"{source.tokenizer_fingerprint[:16]}-{target.tokenizer_fingerprint[:16]}-{digest}"
    vm = None
    if (folder / "vocab_map.pt").exists():
        try:
            vm = load_vocab_map(folder)
        except StoreError as e:  # a cache: a damaged entry is computed again, not trusted
            import warnings

            warnings.warn(f"the cached vocabulary map in {folder} cannot be used ({e}); computing it again",
                          UserWarning, stacklevel=2)
    aligner = DocumentAligner(target.tokenizer, source.tokenizer, vocab_map=vm, **options)
    if vm is None:
        folder.mkdir(parents=True, exist_ok=True)
        save_vocab_map(folder, aligner.vocab_map)
    return aligner, AlignerSpec(str(target.tokenizer_path), str(source.tokenizer_path), dict(options), str(folder))


# --- alignment in worker processes -----------------------------------------------------------
# The exact MinED alignment is Python and CPU-bound: on the prefetch thread it would hold the
# GIL against the training loop's own Python. Worker processes (spawned: a CUDA parent cannot
# fork) each build the aligners once, from their specs.

_WORKER_ALIGNERS: list[DocumentAligner] = []


def _init_align_worker(specs: list[AlignerSpec]) -> None:
    torch.set_num_threads(1)
    _WORKER_ALIGNERS[:] = [spec.build() for spec in specs]


def _align_in_worker(job: tuple[int, list[int], list[list[int]]]) -> list[DocAlignment]:
    doc_id, target_ids, source_ids = job
    return [al.align_ids(doc_id, target_ids, ids) for al, ids in zip(_WORKER_ALIGNERS, source_ids)]


@dataclass
class _Entry:
    records: list[TeacherRecord]  # per candidate, target first
    maps: list[DocAlignment]  # per source candidate
    left: int  # blocks holding the document not built yet in this epoch


class _View:
    """What `_build_shard` and `build_batch` ask of a candidate: `get(doc_id)`, `k`, `root`."""

    def __init__(self, owner: OnlineBlocks, s: int, kind: str, root: Path, k: int) -> None:
        self.owner, self.s, self.kind, self.root, self.k = owner, s, kind, root, k

    def get(self, doc_id: int) -> Any:
        entry = self.owner._entries[doc_id]
        return entry.records[self.s] if self.kind == "record" else entry.maps[self.s - 1]


class OnlineBlocks:
    """Target blocks of a corpus with live candidates: reads like a `BlockReader`.

    teachers: [frozen target (a `LiveTeacher`), source, ...] (`LiveTeacher` or `StoredTeacher`);
    aligners: one per source; aligner_specs: how to build them in `align_workers` processes.
    blocks_per_shard: blocks grouped into virtual shards for the sampler's shard-local shuffle;
    512, `fusellm assemble`'s default, makes the sampler visit blocks in the offline order.
    """

    def __init__(self, corpus: CorpusTexts, teachers: list[Any], aligners: list[DocumentAligner], *,
                 aligner_specs: Sequence[AlignerSpec] = (),
                 block_len: int, score: str = "per_byte", labels: str = "document", blocks_per_shard: int = 512,
                 align_workers: int = 0, progress: bool = False) -> None:
        if len(aligners) != len(teachers) - 1:
            raise ValueError("one aligner per source candidate")
        self.corpus, self.teachers, self.aligners = corpus, teachers, aligners
        self._acfg = AssembleConfig(target="-", sources=(), output="-", block_len=block_len, score=score, labels=labels,
                                    progress=False)
        target = teachers[0]
        from tqdm.auto import tqdm

        lengths: list[int] = []
        bar = tqdm(total=len(corpus.doc_ids), unit="doc", desc="online: packing blocks", disable=not progress)
        for a in range(0, len(corpus.doc_ids), 1024):  # the target tokenizer's lengths: no model needed to pack
            lengths += [int(d.ids.shape[0]) for d in target.tokenize(corpus.doc_ids[a:a + 1024])]
            bar.update(min(1024, len(corpus.doc_ids) - a))
        bar.close()
        self.plan = plan_blocks(corpus.doc_ids, lengths, block_len)
        self.block_len = block_len
        self._lengths = dict(zip(corpus.doc_ids, lengths))
        self.pieces: dict[int, int] = {}
        for pieces in self.plan:
            for pc in pieces:
                self.pieces[pc.doc_id] = self.pieces.get(pc.doc_id, 0) + 1
        self.starts = list(range(0, len(self.plan), blocks_per_shard)) + [len(self.plan)]
        self._labels = [self._count_labels(pieces) for pieces in self.plan]
        self._entries: dict[int, _Entry] = {}
        self._times = {"candidates_s": 0.0, "align_s": 0.0}  # work done since `take_times`
        self._rows = torch.zeros(len(teachers), dtype=torch.int64)  # real rows / aligned rows per source, since then
        self._lock = threading.RLock()  # the prefetch thread and the training thread both read blocks
        self._lockstep = any(getattr(t, "sharded", False) for t in teachers)
        self.stores = [_View(self, s, "record", t.root, t.k) for s, t in enumerate(teachers)]
        self._aligns = [_View(self, s, "map", t.root, t.k) for s, t in enumerate(teachers) if s > 0]
        self.vocab_maps: list[torch.Tensor | None] = [None] + [al.vocab_map for al in aligners]
        short = [t.root.name or str(t.root) for t in teachers]  # folder names, unless two candidates share one
        self.names = short if len(set(short)) == len(short) else [str(t.root) for t in teachers]
        self._pool = None
        if align_workers > 0 and aligners:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            if len(aligner_specs) != len(aligners):
                raise ValueError("align_workers needs one aligner spec per source")
            self._pool = ProcessPoolExecutor(align_workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_align_worker, initargs=(list(aligner_specs),))

    def close(self) -> None:
        """Stop the alignment workers (if any)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _count_labels(self, pieces: list[Any]) -> int:
        rows = sum(pc.stop - pc.start for pc in pieces)
        if self._acfg.labels == "shifted-block":
            return max(rows - 1, 0)
        # document labels: every row but a document's last has a next token
        return sum(pc.stop - pc.start - (1 if pc.stop == self._lengths[pc.doc_id] else 0) for pc in pieces)

    def __len__(self) -> int:
        return len(self.plan)

    def num_labels(self, index: int) -> int:
        """Rows of block `index` with a next token (the step's token count), without building it."""
        return self._labels[index]

    def prepare(self, indices: Sequence[int]) -> None:
        """Run every candidate on the documents of these blocks that are not held yet (one
        model batch per candidate for all of them) and align them."""
        with self._lock:
            want = [pc.doc_id for i in indices for pc in self.plan[i] if pc.doc_id not in self._entries]
            want = list(dict.fromkeys(want))
            if not want and not self._lockstep:  # sharded candidates join every call, with documents or none
                return
            t0 = time.perf_counter()
            if len(self.teachers) == 1:  # CE alone (no source): the target's tokens, no model run
                per_model = [self.teachers[0].token_records(want)]
            else:
                per_model = [t.records(want) for t in self.teachers]
            t1 = time.perf_counter()
            if self._pool is not None and len(self.teachers) > 1:
                jobs = [(d, per_model[0][d].input_ids.tolist(), [m[d].input_ids.tolist() for m in per_model[1:]]) for d in want]
                aligned = dict(zip(want, self._pool.map(_align_in_worker, jobs, chunksize=max(1, len(jobs) // 8))))
            else:
                aligned = {}
            for d in want:
                recs = [m[d] for m in per_model]
                for t, r in zip(self.teachers[1:], recs[1:]):
                    if r.text_hash != recs[0].text_hash:
                        raise StoreError(f"document {d} holds another text in {t.root} than in --corpus {self.corpus.path}")
                bad = any(r.flags & DocFlag.NONFINITE for r in recs)
                maps = []
                for s, (al, src) in enumerate(zip(self.aligners, recs[1:])):
                    m = aligned[d][s] if d in aligned else al.align(recs[0], src)
                    if bad:  # no teacher from a candidate whose pass was not finite (see the module docstring)
                        m = DocAlignment(d, torch.full_like(m.source_pos, -1), torch.full_like(m.fallback_id, -1))
                    maps.append(m)
                if recs[0].num_tokens != self._lengths[d]:
                    raise StoreError(f"document {d}: the target tokenizer gave {recs[0].num_tokens} tokens now but "
                                     f"{self._lengths[d]} when the blocks were packed")
                self._entries[d] = _Entry(recs, maps, self.pieces[d])
            self._times["candidates_s"] += t1 - t0
            self._times["align_s"] += time.perf_counter() - t1

    def __getitem__(self, index: int) -> Block:
        if not 0 <= index < len(self.plan):
            raise IndexError(f"block {index} of {len(self.plan)} online blocks")
        with self._lock:
            self.prepare([index])
            shard = _build_shard([self.plan[index]], self.stores[0], self._aligns, self.stores[1:], self._acfg)
            real = shard.doc_index[0] >= 0
            self._rows[0] += int(real.sum())
            self._rows[1:] += (shard.source_pos[1:, 0] >= 0)[:, real].sum(-1)
        return shard.block(0)

    def release(self, indices: Sequence[int]) -> None:
        """These blocks are built into a batch: drop the records no other block of the epoch
        still needs (a later epoch computes them again)."""
        with self._lock:
            for i in indices:
                for pc in self.plan[i]:
                    entry = self._entries.get(pc.doc_id)
                    if entry is not None:
                        entry.left -= 1
                        if entry.left <= 0:
                            del self._entries[pc.doc_id]

    def take_times(self) -> dict[str, float]:
        """Seconds spent running the candidates and aligning since the last call (on the
        prefetch thread this work overlaps the training step), and the fraction of the target
        rows built since then that each source aligned: for the step's log."""
        with self._lock:
            out, self._times = dict(self._times), {"candidates_s": 0.0, "align_s": 0.0}
            rows, self._rows = self._rows, torch.zeros_like(self._rows)
        if rows[0] > 0:  # the fraction of target rows each source gave a distribution (as assemble's manifest)
            out["aligned_fraction"] = {name: float(a) / float(rows[0]) for name, a in zip(self.names[1:], rows[1:].tolist())}
        return out

    @property
    def held_documents(self) -> int:
        return len(self._entries)


def open_online(corpus_path: str, target_model: str, candidates: Sequence[str], *, block_len: int, top_k: int,
                score: str, labels: str = "document", device: torch.device, cache_dir: Path,
                teacher_options: dict[str, Any] | None = None, aligner_options: dict[str, Any] | None = None,
                source_markers: Sequence[str | None] | None = None, target_marker: str | None = None,
                blocks_per_shard: int = 512, align_workers: int = 0, shard: Callable[[Any], Any] | None = None,
                progress: bool = False) -> OnlineBlocks:
    """Load the corpus, the frozen target copy and every candidate (a model folder, run
    live, or a teacher store of the corpus, read), check what can be checked before the
    first step, and pack the blocks. `shard(model)`, when given, shards each live model
    across ranks (FSDP2: `fusellm_kernels.training.parallel.FrozenSharding`); its `group` attribute is the
    process group whose ranks then run the candidates in step. Without it every rank holds
    every candidate whole."""
    corpus = CorpusTexts(corpus_path)
    base = TeacherConfig(corpus=corpus_path, model=target_model, output="-", top_k=top_k, format="lossless",
                         progress=False, **(teacher_options or {}))
    teachers: list[Any] = [LiveTeacher(base, corpus, device, load=bool(candidates), shard=shard if candidates else None)]
    for path in candidates:  # a teacher store is read, a model folder is run
        if not Path(path).exists():
            raise TeacherPassError(f"--candidate {path} does not exist: give a local transformers model folder (with its "
                                   "tokenizer) or a teacher store of --corpus")
        try:
            teachers.append(StoredTeacher(path, corpus) if is_teacher_store(path)
                            else LiveTeacher(replace(base, model=path), corpus, device, shard=shard))
        except TeacherPassError as e:  # the teacher pass names its own flag
            raise TeacherPassError(str(e).replace("--model", "--candidate")) from None
    from fusellm_kernels.align import ConventionError

    target = teachers[0]
    markers = list(source_markers or [None] * len(candidates))
    aligners, specs = [], []
    for t, path, marker in zip(teachers[1:], candidates, markers):
        options = dict(target_logits_size=target.logits_size, source_logits_size=t.logits_size,
                       source_marker=marker or None, target_marker=target_marker or None, **(aligner_options or {}))
        try:
            aligner, spec = cached_aligner(cache_dir, options, target, t)
        except ConventionError as e:  # name the flags that set the markers by hand
            raise ConventionError(f"--candidate {path} against --model {target_model}: {e}; set the word-start markers "
                                  "with --source-marker (one per --candidate) or --target-marker") from None
        aligners.append(aligner)
        specs.append(spec)
    return OnlineBlocks(corpus, teachers, aligners, aligner_specs=specs, block_len=block_len, score=score, labels=labels,
                        blocks_per_shard=blocks_per_shard, align_workers=align_workers, progress=progress)
