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

`--method pta` (probabilistic token alignment, `fusellm_kernels.align.pta`) keeps the MinED
pairing and turns each paired row into the teacher an optimal-transport plan between the
source's and the target's top-k gives; the shards then hold finished rows in target ids
(aligned-rows shards), and the manifest records Sinkhorn's convergence. Documents of a shard
are solved together, in batches of up to `PTA_BATCH_ROWS` target rows.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fusellm_kernels.align.pta import PtaSettings
from fusellm_kernels.pipeline.summary import RunSummary
from fusellm_kernels.store.alignment import METHODS, DocAlignment, write_alignment_manifest, write_alignment_shard
from fusellm_kernels.store.format import TeacherStore
from fusellm_kernels.store.lock import LockSet, clear_directory
from fusellm_kernels.store.records import TeacherRecord
from fusellm_kernels.store.manifest import (
    SettingsMismatchError,
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
    method: str = "minED"  # or "pta": optimal-transport aligned rows
    pta_top_k: int = PtaSettings.top_k  # K', the authors' logits_number
    pta_lambda: float = PtaSettings.lam  # inverse entropic regulariser, the authors' lam
    pta_tolerance: float = PtaSettings.tol  # Sinkhorn's row marginal error, the authors' epsilon
    pta_max_iter: int = PtaSettings.max_iter

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("vocab-align", self.vocab_align, ("hard", "soft")),
            ("fallback", self.fallback, ("next", "current")),
            ("normalization", self.normalization, ("markers", "text")),
            ("method", self.method, METHODS),
        ):
            if value not in allowed:
                raise StoreError(f"--{name} {value!r}: choose one of {allowed}")
        if self.workers < 1:
            raise StoreError(f"--workers {self.workers} must be at least 1")
        try:
            self.pta_settings()
        except ValueError as e:
            raise StoreError(str(e)) from None

    def pta_settings(self) -> PtaSettings:
        return PtaSettings(top_k=self.pta_top_k, lam=self.pta_lambda, tol=self.pta_tolerance,
                           max_iter=self.pta_max_iter, reference=self.reference)


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
        # only PTA adds keys: MinED alignments keep the settings (and hash) they always had
        **({"method": "pta", "pta_top_k": cfg.pta_top_k, "pta_lambda": cfg.pta_lambda,
            "pta_tolerance": cfg.pta_tolerance, "pta_max_iter": cfg.pta_max_iter} if cfg.method == "pta" else {}),
    }


def _check_same_method(stored: dict[str, Any], cfg: AlignConfig, where: Path) -> None:
    method = stored.get("method", "minED")
    if method != cfg.method:
        raise SettingsMismatchError(
            f"{where} was aligned with --method {method}, but this run asks for --method {cfg.method}; resume with "
            f"--method {method}, or write to another --output (or pass --overwrite to discard the stored shards)")


PTA_BATCH_ROWS = 32768  # target rows per batched Sinkhorn call: ~40 MB of working tensors at K' = 10


class DocumentAligner:
    """Aligns one document's target and source records: the two tokenizers, their detected
    conventions and the vocabulary map, built once. `fusellm align` builds one per worker
    from the two teacher stores; online training (`pipeline/live.py`) builds one per
    candidate from the models' folders. `vocab_map` reuses a map computed before."""

    def __init__(self, target_tok: Any, source_tok: Any, *, target_logits_size: int, source_logits_size: int,
                 vocab_align: str = "soft", fallback: str = "next", reference: bool = False,
                 normalization: str = "markers", source_marker: str | None = None, target_marker: str | None = None,
                 vocab_map: torch.Tensor | None = None, method: str = "minED", pta: PtaSettings | None = None) -> None:
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
        self.method = method
        self.pta = (pta or PtaSettings(reference=reference)) if method == "pta" else None
        self.token_cost = None
        if self.pta is not None:
            from fusellm_kernels.align import vocab_list
            from fusellm_kernels.align.pta import TokenCost

            # the authors strip the source's marker from mapped strings (already target tokens)
            strip = (self.source_conv.marker, self.target_conv.marker) if self.pta.reference else ("", "")
            self.token_cost = TokenCost(vocab_list(target_tok.get_vocab()), strip_rows=strip[0], strip_cols=strip[1])

    def align_documents(self, pairs: list[tuple[TeacherRecord, TeacherRecord]]) -> tuple[list[DocAlignment], dict[str, Any]]:
        """Align many documents (target and source record of each, paired by the caller):
        MinED position maps, or with method pta the aligned rows, whose Sinkhorn problems are
        solved together in batches of up to PTA_BATCH_ROWS rows. Returns the alignments and,
        for pta, Sinkhorn's record (`sinkhorn_stats`)."""
        maps = [self.align(t, s) for t, s in pairs]
        if self.pta is None:
            return maps, {}
        out: list[DocAlignment] = []
        errors, iterations, converged = [], [], []
        start = 0
        while start < len(pairs):
            stop, rows = start + 1, pairs[start][0].num_tokens
            while stop < len(pairs) and rows + pairs[stop][0].num_tokens <= PTA_BATCH_ROWS:
                rows += pairs[stop][0].num_tokens
                stop += 1
            done, stats = self._pta_batch(pairs[start:stop], maps[start:stop])
            out += done
            errors.append(stats.marginal_error)
            iterations.append(stats.iterations)
            converged.append(stats.converged)
            start = stop
        return out, sinkhorn_stats(torch.cat(errors) if errors else torch.zeros(0),
                                   torch.cat(iterations) if iterations else torch.zeros(0, dtype=torch.int32),
                                   torch.cat(converged) if converged else torch.zeros(0, dtype=torch.bool))

    def _pta_batch(self, pairs: list[tuple[TeacherRecord, TeacherRecord]], maps: list[DocAlignment]) -> tuple[list[DocAlignment], Any]:
        from fusellm_kernels.align.pta import paired_source_rows, pta_teacher_rows

        assert self.pta is not None and self.token_cost is not None
        rows = pta_teacher_rows(
            paired_source_rows([m.source_pos for m in maps], [s.num_tokens for _, s in pairs]),
            torch.cat([m.fallback_id for m in maps]),
            torch.cat([t.topk_ids for t, _ in pairs]), torch.cat([t.topk_logits for t, _ in pairs]),
            torch.cat([s.topk_ids for _, s in pairs]), torch.cat([s.topk_logits for _, s in pairs]),
            self.vocab_map, self.token_cost, self.pta,
            transport=not (self.pta.reference and self.vocab_align == "hard"),  # the authors' hard branch: MinED
        )
        out, start = [], 0
        for m in maps:
            n = m.source_pos.numel()
            out.append(DocAlignment(m.doc_id, m.source_pos, m.fallback_id, rows.ids[start:start + n].clone(),
                                    rows.logits[start:start + n].clone()))
            start += n
        return out, rows

    def align(self, trec: TeacherRecord, srec: TeacherRecord) -> DocAlignment:
        """The position map of the document both records hold (the caller pairs them); also
        the pairing PTA starts from."""
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
            method=cfg.method, pta=cfg.pta_settings(),
        )
        self.vocab_map = self.aligner.vocab_map
        self.target_conv, self.source_conv = self.aligner.target_conv, self.aligner.source_conv

    def documents(self, doc_ids: list[int]) -> tuple[list[DocAlignment], dict[str, Any]]:
        return self.aligner.align_documents([self.records(d) for d in doc_ids])

    def records(self, doc_id: int) -> tuple[TeacherRecord, TeacherRecord]:
        trec = self.target.get(doc_id)
        try:
            srec = self.source.get(doc_id)
        except KeyError:
            raise StoreError(f"document {doc_id} of the target store is missing from the source store {self.source.root}") from None
        if srec.text_hash != trec.text_hash:
            raise StoreError(f"document {doc_id} holds different texts in {self.target.root} and {self.source.root}: "
                             "the stores were made from different corpora")
        return trec, srec


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
    docs, stats = _WORKER.documents(doc_ids)
    rel = f"shards/align-{i:05d}.safetensors"
    sha, size = write_alignment_shard(out / rel, docs)
    info = ShardInfo(i, rel, sha, size, documents=len(docs), tokens=sum(d.source_pos.numel() for d in docs),
                     first_doc_id=min(doc_ids, default=0), last_doc_id=max(doc_ids, default=0),
                     extra={"aligned_rows": sum(d.aligned for d in docs), **stats,
                            **({"row_width": int(docs[0].row_ids.shape[1])} if docs and docs[0].row_ids is not None else {})})
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
        stored = read_json(spath)
        _check_same_method(stored, cfg, spath)
        check_same_settings(stored, settings, spath)
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
        "method": cfg.method,
        **({"pta": {**asdict(cfg.pta_settings()), "width": _row_width(shards)},
            "sinkhorn": merge_sinkhorn_stats([s.extra for s in shards])} if cfg.method == "pta" else {}),
    })
    counts = manifest["counts"]
    return RunSummary(
        stage="align", documents=counts["documents"], tokens=counts["rows"],
        bytes_written=sum(s.size_bytes for s in shards) + vocab_path.stat().st_size, seconds=time.perf_counter() - t0,
        extra={"aligned_fraction": round(counts["aligned_fraction"], 4), "workers": cfg.workers, "method": cfg.method,
               "bytes_per_token": manifest["bytes_per_token"],
               **({"transported_fraction": round(manifest["sinkhorn"]["problems"] / counts["rows"], 4) if counts["rows"] else 0.0,
                   "sinkhorn_max_error": manifest["sinkhorn"]["max_marginal_error"],
                   "sinkhorn_mean_iterations": manifest["sinkhorn"]["mean_iterations"]} if cfg.method == "pta" else {})},
    )


def sinkhorn_stats(errors: torch.Tensor, iterations: torch.Tensor, converged: torch.Tensor) -> dict[str, Any]:
    """One shard's Sinkhorn record (plain JSON numbers; `merge_sinkhorn_stats` adds shards up)."""
    n = int(errors.numel())
    return {"sinkhorn_problems": n, "sinkhorn_error_sum": float(errors.double().sum()) if n else 0.0,
            "sinkhorn_max_error": float(errors.max()) if n else 0.0,
            "sinkhorn_iterations_sum": int(iterations.long().sum()) if n else 0,
            "sinkhorn_max_iterations": int(iterations.max()) if n else 0,
            "sinkhorn_not_converged": int((~converged).sum()) if n else 0}


def merge_sinkhorn_stats(extras: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's `sinkhorn` section: problems (transported rows), max / mean row marginal
    error, mean / max iterations, and how many problems stopped at the cap unconverged."""
    n = sum(int(e.get("sinkhorn_problems", 0)) for e in extras)
    return {
        "problems": n,
        "max_marginal_error": max((float(e.get("sinkhorn_max_error", 0.0)) for e in extras), default=0.0),
        "mean_marginal_error": sum(float(e.get("sinkhorn_error_sum", 0.0)) for e in extras) / n if n else 0.0,
        "mean_iterations": round(sum(int(e.get("sinkhorn_iterations_sum", 0)) for e in extras) / n, 2) if n else 0.0,
        "max_iterations": max((int(e.get("sinkhorn_max_iterations", 0)) for e in extras), default=0),
        "not_converged": sum(int(e.get("sinkhorn_not_converged", 0)) for e in extras),
    }


def _row_width(shards: list[ShardInfo]) -> int:
    return max((int(s.extra.get("row_width", 0)) for s in shards), default=0)
