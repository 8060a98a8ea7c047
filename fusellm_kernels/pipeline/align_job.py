"""`fusellm align`: position maps of every document, one source model against the target.

For each document of the target model's teacher store, the source store's record of the same
document (paired by document id, verified by text hash) is aligned token by token with exact
MinED (`fusellm_kernels.align`), and the position map — which source row's top-k each target
row takes, or the one-hot fallback — is written to alignment shards that mirror the target
store's shards. The vocabulary map (source id → target id, `hard` or `soft`) is computed once
and saved beside them as `vocab_map.pt` (int32, sized by the source model's logits).

Markers and byte conventions are detected from each tokenizer (`--source-marker` /
`--target-marker` set them by hand). Resumable by shard; shards run in parallel worker
processes (`--workers`). The manifest records tokenizers, markers, mode, counts and the
fraction of target rows that got a real teacher distribution.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fusellm_kernels.pipeline.summary import RunSummary
from fusellm_kernels.store.alignment import DocAlignment, write_alignment_manifest, write_alignment_shard
from fusellm_kernels.store.format import TeacherStore
from fusellm_kernels.store.lock import LockSet, clear_directory
from fusellm_kernels.store.records import TeacherRecord
from fusellm_kernels.store.manifest import (
    ShardInfo,
    StoreError,
    check_same_settings,
    read_json,
    record_path,
    settings_hash,
    sha256_bytes,
    verify_file,
    write_bytes_atomic,
    write_json_atomic,
)


@dataclass(frozen=True)
class AlignConfig:
    target: str
    source: str
    output: str
    vocab_align: str = "soft"
    fallback: str = "next"
    reference: bool = False
    normalization: str = "markers"
    source_marker: str | None = None
    target_marker: str | None = None
    workers: int = 1
    overwrite: bool = False
    progress: bool = True
    verify: bool = True  # check every input shard's SHA-256 before its first use (--no-verify: unsafe)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("vocab-align", self.vocab_align, ("hard", "soft")),
            ("fallback", self.fallback, ("next", "current")),
            ("normalization", self.normalization, ("markers", "text")),
        ):
            if value not in allowed:
                raise StoreError(f"--{name} {value!r}: choose one of {allowed}")
        if self.workers < 1:
            raise StoreError(f"--workers {self.workers} must be at least 1")


def _tokenizer(store: TeacherStore) -> Any:
    """The tokenizer that made the store, refused when its files changed since: a swapped
    tokenizer would align against ids it never produced."""
    from fusellm_kernels.pipeline.corpus import load_tokenizer
    from fusellm_kernels.pipeline.teacher_pass import tokenizer_fingerprint

    path = store.path_of("tokenizer")
    if not path.exists():
        raise StoreError(f"the tokenizer {path} that made the teacher store {store.root} does not exist (any more); "
                         "restore it there or run `fusellm teacher` again")
    recorded = store.tokenizer_fingerprint
    found = tokenizer_fingerprint(str(path))
    if recorded is not None and found != recorded:
        raise StoreError(f"the tokenizer at {path} is not the one that made the teacher store {store.root} (fingerprint "
                         f"{found}, recorded {recorded}); restore the original tokenizer files or run `fusellm teacher` "
                         "again with this one")
    tok = load_tokenizer(str(path))
    size = store.manifest["tokenizer"].get("vocab_size")
    if size is not None and len(tok) != int(size):
        raise StoreError(f"the tokenizer at {path} has {len(tok)} tokens but made {store.root} with {size}")
    return tok


def _settings(cfg: AlignConfig, target: TeacherStore, source: TeacherStore) -> dict[str, Any]:
    return {
        "target_store": target.manifest["settings_hash"],
        "source_store": source.manifest["settings_hash"],
        "vocab_align": cfg.vocab_align, "fallback": cfg.fallback, "reference": cfg.reference,
        "normalization": cfg.normalization, "source_marker": cfg.source_marker, "target_marker": cfg.target_marker,
    }


class DocumentAligner:
    """Aligns one document's target and source records: the two tokenizers, their detected
    conventions and the vocabulary map, built once. `fusellm align` builds one per worker
    from the two teacher stores; online training (`pipeline/live.py`) builds one per
    candidate from the models' folders. `vocab_map` reuses a map computed before."""

    def __init__(self, target_tok: Any, source_tok: Any, *, target_logits_size: int, source_logits_size: int,
                 vocab_align: str = "soft", fallback: str = "next", reference: bool = False,
                 normalization: str = "markers", source_marker: str | None = None, target_marker: str | None = None,
                 vocab_map: torch.Tensor | None = None) -> None:
        from fusellm_kernels.align import detect_conventions, soft_lookup
        from fusellm_kernels.align import vocab_map as make_vocab_map

        self.target_tok, self.source_tok = target_tok, source_tok
        self.vocab_align, self.fallback, self.reference, self.normalization = vocab_align, fallback, reference, normalization
        self.target_conv = detect_conventions(target_tok, marker=target_marker)
        self.source_conv = detect_conventions(source_tok, marker=source_marker)
        if vocab_map is None:
            vocab_map = make_vocab_map(
                source_tok.get_vocab(), target_tok.get_vocab(),
                source_marker=self.source_conv.marker, target_marker=self.target_conv.marker, kind=vocab_align,
                source_logits_size=source_logits_size, target_logits_size=target_logits_size, workers=-1,
            )
        self.vocab_map = vocab_map
        self.lookup = None
        if vocab_align == "soft":
            self.lookup = soft_lookup(vocab_map, source_tok.get_vocab(), target_tok.get_vocab(),
                                      source_marker=self.source_conv.marker, target_marker=self.target_conv.marker)

    def align(self, trec: TeacherRecord, srec: TeacherRecord) -> DocAlignment:
        """The position map of the document both records hold (the caller pairs them)."""
        return self.align_ids(trec.doc_id, trec.input_ids.tolist(), srec.input_ids.tolist())

    def align_ids(self, doc_id: int, target_ids: list[int], source_ids: list[int]) -> DocAlignment:
        """The same from the two token id lists alone (what a worker process is sent)."""
        from fusellm_kernels.align import position_map

        pm = position_map(
            self.source_tok.convert_ids_to_tokens(source_ids),
            self.target_tok.convert_ids_to_tokens(target_ids), target_ids,
            source_marker=self.source_conv.marker, target_marker=self.target_conv.marker,
            vocab_align=self.vocab_align, soft_lookup=self.lookup, fallback=self.fallback,
            reference=self.reference, source_is_byte_level=self.source_conv.byte_level,
            normalization=self.normalization, source_conventions=self.source_conv, target_conventions=self.target_conv,
        )
        return DocAlignment(doc_id, torch.from_numpy(pm.source_pos), torch.from_numpy(pm.fallback_id))


class _Aligner:
    """Everything one worker needs to align documents of two stores (built once per process)."""

    def __init__(self, cfg: AlignConfig) -> None:
        self.cfg = cfg
        self.target = TeacherStore(cfg.target, verify=cfg.verify)
        self.source = TeacherStore(cfg.source, verify=cfg.verify)
        vocab_path = Path(cfg.output) / "vocab_map.pt"
        self.aligner = DocumentAligner(
            _tokenizer(self.target), _tokenizer(self.source),
            target_logits_size=int(self.target.manifest["model"]["logits_size"]),
            source_logits_size=int(self.source.manifest["model"]["logits_size"]),
            vocab_align=cfg.vocab_align, fallback=cfg.fallback, reference=cfg.reference, normalization=cfg.normalization,
            source_marker=cfg.source_marker, target_marker=cfg.target_marker,
            vocab_map=load_vocab_map(Path(cfg.output)) if vocab_path.exists() else None,
        )
        self.vocab_map = self.aligner.vocab_map
        self.target_conv, self.source_conv = self.aligner.target_conv, self.aligner.source_conv

    def document(self, doc_id: int) -> DocAlignment:
        trec = self.target.get(doc_id)
        try:
            srec = self.source.get(doc_id)
        except KeyError:
            raise StoreError(f"document {doc_id} of the target store is missing from the source store {self.source.root}") from None
        if srec.text_hash != trec.text_hash:
            raise StoreError(f"document {doc_id} holds different texts in {self.target.root} and {self.source.root}: "
                             "the stores were made from different corpora")
        return self.aligner.align(trec, srec)


_WORKER: _Aligner | None = None

VOCAB_MAP_RECORD = "vocab_map.json"  # its SHA-256, written with it: a resume reuses only this map


def save_vocab_map(out: Path, vocab_map: torch.Tensor) -> str:
    """Write vocab_map.pt and its record atomically; returns the map's SHA-256."""
    import io

    buf = io.BytesIO()
    torch.save(vocab_map, buf)
    data = buf.getvalue()
    write_bytes_atomic(out / "vocab_map.pt", data)
    sha = sha256_bytes(data)
    write_json_atomic(out / VOCAB_MAP_RECORD, {"file": "vocab_map.pt", "sha256": sha, "size_bytes": len(data)})
    return sha


def load_vocab_map(out: Path) -> torch.Tensor:
    """The map a resumed align wrote before, checked against its record (tensors only: no
    pickled objects are ever loaded)."""
    path, record = out / "vocab_map.pt", out / VOCAB_MAP_RECORD
    if not record.exists():
        raise StoreError(f"{path} has no {record.name} beside it (made by an older version, or a killed run); "
                         "pass --overwrite to align again")
    info = read_json(record)
    verify_file(path, info["sha256"], info["size_bytes"], kind="alignment")
    try:
        m = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StoreError(f"{path} cannot be read as a tensor ({e}); pass --overwrite to align again") from None
    if not isinstance(m, torch.Tensor) or m.dim() != 1:
        raise StoreError(f"{path} does not hold a 1-D id map; pass --overwrite to align again")
    return m


def _init_worker(cfg: AlignConfig) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = _Aligner(cfg)


def _align_shard(args: tuple[int, list[int]]) -> dict[str, Any]:
    """Align the documents of target shard i and write alignment shard i; returns its ShardInfo."""
    i, doc_ids = args
    assert _WORKER is not None
    out = Path(_WORKER.cfg.output)
    docs = [_WORKER.document(d) for d in doc_ids]
    rel = f"shards/align-{i:05d}.safetensors"
    sha, size = write_alignment_shard(out / rel, docs)
    info = ShardInfo(i, rel, sha, size, documents=len(docs), tokens=sum(d.source_pos.numel() for d in docs),
                     first_doc_id=min(doc_ids, default=0), last_doc_id=max(doc_ids, default=0),
                     extra={"aligned_rows": sum(d.aligned for d in docs)})
    write_json_atomic(out / "shards" / f"align-{i:05d}.json", info.to_json())
    return info.to_json()


def _done(out: Path, i: int) -> ShardInfo | None:
    sidecar = out / "shards" / f"align-{i:05d}.json"
    if not sidecar.exists():
        return None
    info = ShardInfo.from_json(read_json(sidecar))
    try:
        verify_file(out / info.file, info.sha256, info.size_bytes, kind="alignment")
    except StoreError:
        return None  # half-written or damaged: align it again
    return info


def run_align(cfg: AlignConfig) -> RunSummary:
    t0 = time.perf_counter()
    with LockSet("fusellm align") as locks:
        locks.read(cfg.target, cfg.source)
        target = TeacherStore(cfg.target, verify=cfg.verify)
        source = TeacherStore(cfg.source, verify=cfg.verify)
        locks.write(cfg.output)  # before --overwrite deletes anything
        return _run_align(cfg, target, source, t0)


def _run_align(cfg: AlignConfig, target: TeacherStore, source: TeacherStore, t0: float) -> RunSummary:
    import multiprocessing as mp

    from tqdm.auto import tqdm

    if target.manifest["corpus"]["fingerprint"] != source.manifest["corpus"]["fingerprint"]:
        raise StoreError(f"the target store {cfg.target} and the source store {cfg.source} were made from different "
                         "corpora (fingerprints differ); run both teacher passes on the same `fusellm prepare` output")
    out = Path(cfg.output)
    if cfg.overwrite and out.exists():
        (out / "manifest.json").unlink(missing_ok=True)  # first: a half-cleared directory never looks complete
        clear_directory(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg, target, source)
    spath = out / "settings.json"
    if spath.exists():
        check_same_settings(read_json(spath), settings, spath)
    else:
        write_json_atomic(spath, settings)

    aligner = _Aligner(cfg)  # detects conventions (clear errors before any work) and builds the vocab map once
    vocab_path = out / "vocab_map.pt"
    if not vocab_path.exists():
        save_vocab_map(out, aligner.vocab_map)
    shard_docs = [target.shard_index(i).doc_ids.tolist() for i in range(len(target.shards))]
    infos: dict[int, ShardInfo] = {}
    todo = []
    for i, docs in enumerate(shard_docs):
        info = _done(out, i)
        if info is None:
            todo.append((i, docs))
        else:
            infos[i] = info
    bar = tqdm(total=len(shard_docs), initial=len(infos), desc="align", unit="shard", disable=not cfg.progress)
    if cfg.workers == 1 or len(todo) <= 1:
        global _WORKER
        _WORKER = aligner
        results = map(_align_shard, todo)
        for r in results:
            infos[r["index"]] = ShardInfo.from_json(r)
            bar.update()
    else:
        with mp.get_context("spawn").Pool(cfg.workers, initializer=_init_worker, initargs=(cfg,)) as pool:
            for r in pool.imap_unordered(_align_shard, todo):
                infos[r["index"]] = ShardInfo.from_json(r)
                bar.update()
    bar.close()

    shards = [infos[i] for i in range(len(shard_docs))]
    manifest = write_alignment_manifest(out, shards, header={
        "target": {"path": record_path(target.root, out), "settings_hash": target.manifest["settings_hash"],
                   "corpus_fingerprint": target.manifest["corpus"]["fingerprint"],
                   "tokenizer": record_path(target.path_of("tokenizer"), out),
                   "tokenizer_fingerprint": target.tokenizer_fingerprint,
                   "conventions": asdict(aligner.target_conv)},
        "source": {"path": record_path(source.root, out), "settings_hash": source.manifest["settings_hash"],
                   "corpus_fingerprint": source.manifest["corpus"]["fingerprint"],
                   "tokenizer": record_path(source.path_of("tokenizer"), out),
                   "tokenizer_fingerprint": source.tokenizer_fingerprint,
                   "conventions": asdict(aligner.source_conv)},
        # the hash of the map this run aligned with (checked against its record above), so a
        # map replaced after alignment is refused downstream rather than trained on
        "vocab_map": vocab_path.name, "vocab_map_sha256": read_json(out / VOCAB_MAP_RECORD)["sha256"],
        "vocab_map_mapped_fraction": float((aligner.vocab_map >= 0).float().mean()),
        "settings": settings, "settings_hash": settings_hash(settings),
    })
    counts = manifest["counts"]
    return RunSummary(
        stage="align", documents=counts["documents"], tokens=counts["rows"],
        bytes_written=sum(s.size_bytes for s in shards) + vocab_path.stat().st_size, seconds=time.perf_counter() - t0,
        extra={"aligned_fraction": round(counts["aligned_fraction"], 4), "workers": cfg.workers},
    )
