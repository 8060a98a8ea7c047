"""`fusellm assemble`: pack aligned documents into fixed-length training blocks.

Documents are concatenated in corpus order and cut into blocks of `block_len` rows, as the
original's packing does; a document that does not fit the room left continues in the next
block (its piece there starts without the earlier context). The last block is padded (labels
−100) instead of dropped. (The original packs each `datasets.map` batch of 1000 documents on
its own, so it leaves a partial block every 1000 documents; here only the last one is.) Per
row and candidate the block holds the position map (which row of the candidate's record to
take the top-k from), the one-hot fallback and three CE scores, so the weighting (per block,
document or token) is chosen at training time:

    doc_ce    the document's score (`pipeline/scores.py`; `per_byte` by default, the
              original's per-token mean with `--score reference`). Where the per-byte score is
              undefined (no predicted bytes, e.g. a document that is one token + EOS) the
              per-token score stands in.
    token_ce  the candidate's NLL at the aligned row (the target's own NLL for candidate 0);
              NaN where the row has no aligned row or the aligned row predicts nothing (a
              record's last row; training then uses doc_ce there).
    block_ce  the block's score. `reference` (exactly the original's packing): the mean over
              the block's real rows of the score of the document each row belongs to, i.e.
              each piece weighted by its rows in the block; padding rows are no document
              token and do not count (the original packs before padding, so its block average
              never sees them). `per_byte`: the pieces' scores weighted by the bytes their
              rows predict. Either way documents with an undefined (NaN) score are left out
              (the original asserts that no score is NaN).

Labels (`--labels`): `document` (default) labels each row with the next token of its own
document, also across a block boundary, and gives a document's last row (its EOS) −100:
no row is trained on a token of another document. `shifted-block` is the original's: the
block's inputs shifted by one, so a document's last row is trained on the next document's
first token in the same block and the block's last real row has no label even when its
document continues. Padding is −100 in both. It is an option of its own, not part of
`--score reference`, because it changes what the CLM term trains on, not how candidates are
ranked; the reference preset passes both. The trainer and the loss take the labels as they
are; with `--weighting block` a block's segment mean of its constant block_ce is the same
whichever of its rows are labelled, so the per-block decision does not depend on them.

A PTA alignment (`fusellm align --method pta`) is assembled the same way: its source_pos
still names each row's paired source row (token_ce reads the source's NLL there), and the
blocks manifest records `method: pta` for that candidate, whose teacher the trainer then
takes from the alignment's aligned rows (`build_batch`) instead of the source's top-k.

Documents flagged NONFINITE (NaN/inf logits) in any candidate's store are left out. Pairing
of target and source records is by document id and text hash, verified for every document; stores and alignments must come from the same prepared corpus (fingerprints).
Resumable by shard: the packing is planned from document lengths alone, so a restarted job
rebuilds only the shards whose files are missing or damaged.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusellm_kernels.pipeline.scores import SCORE_MODES, record_score
from fusellm_kernels.pipeline.summary import RunSummary
from fusellm_kernels.store.alignment import AlignmentStore
from fusellm_kernels.store.blocks import BlockShard, write_block_shard, write_blocks_manifest
from fusellm_kernels.store.format import TeacherStore
from fusellm_kernels.store.lock import LockSet, clear_directory
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
from fusellm_kernels.store.records import DocFlag, TeacherRecord

LABEL_MODES: tuple[str, ...] = ("document", "shifted-block")


@dataclass(frozen=True)
class AssembleConfig:
    """target: the target model's teacher store (candidate 0). sources: one alignment
    directory per source model (written by `fusellm align`, which records its source store)."""

    target: str
    sources: tuple[str, ...]
    output: str
    block_len: int = 2048
    score: str = "per_byte"
    labels: str = "document"  # or "shifted-block", the original's (module docstring)
    blocks_per_shard: int = 512
    overwrite: bool = False
    progress: bool = True
    verify: bool = True  # check every input shard's SHA-256 before its first use (--no-verify: unsafe)

    def __post_init__(self) -> None:
        if self.block_len < 2:
            raise StoreError(f"--block-len {self.block_len} must be at least 2")
        if self.blocks_per_shard < 1:
            raise StoreError(f"--blocks-per-shard {self.blocks_per_shard} must be at least 1")
        if self.score not in SCORE_MODES:
            raise StoreError(f"--score {self.score!r}: choose one of {SCORE_MODES}")
        if self.labels not in LABEL_MODES:
            raise StoreError(f"--labels {self.labels!r}: choose one of {LABEL_MODES}")


@dataclass(frozen=True)
class _Piece:
    doc_id: int
    start: int  # first row in the document
    stop: int
    block: int
    offset: int  # first row in the block


def plan_blocks(doc_ids: list[int], lengths: list[int], block_len: int) -> list[list[_Piece]]:
    """Pieces per block: documents in order, cut at block boundaries."""
    blocks: list[list[_Piece]] = [[]]
    room = block_len
    for doc_id, length in zip(doc_ids, lengths):
        start = 0
        while start < length:
            if room == 0:
                blocks.append([])
                room = block_len
            take = min(room, length - start)
            blocks[-1].append(_Piece(doc_id, start, start + take, len(blocks) - 1, block_len - room))
            start += take
            room -= take
    return [b for b in blocks if b]


def _score(record: TeacherRecord, mode: str) -> float:
    value = record_score(record, mode)  # type: ignore[arg-type]
    if math.isnan(value) and mode == "per_byte":
        value = record_score(record, "reference")
    return value


def _open_inputs(cfg: AssembleConfig, locks: LockSet):
    locks.read(cfg.target)
    target = TeacherStore(cfg.target, verify=cfg.verify)
    corpus_fp = target.manifest["corpus"]["fingerprint"]
    aligns, stores = [], []
    for path in cfg.sources:
        locks.read(path)
        al = AlignmentStore(path, verify=cfg.verify, aligned_rows_ok=True)
        for role in ("target", "source"):
            if al.manifest[role]["corpus_fingerprint"] != corpus_fp:
                raise StoreError(f"alignment {path} was made from a {role} store of another corpus than the target store {cfg.target}")
        # the settings hash covers the store's model and tokenizer fingerprints
        if al.manifest["target"]["settings_hash"] != target.manifest["settings_hash"]:
            raise StoreError(f"alignment {path} was made against another target store than {cfg.target} (settings differ); run `fusellm align` again")
        src_path = al.path_of("source")
        locks.read(src_path)
        src = TeacherStore(src_path, verify=cfg.verify)
        if src.manifest["settings_hash"] != al.manifest["source"]["settings_hash"]:
            raise StoreError(f"the source store {src.root} changed since alignment {path} was made; run `fusellm align` again")
        if cfg.verify:
            al.verify_vocab_map()
        aligns.append(al)
        stores.append(src)
    return target, aligns, stores


def _build_shard(blocks: list[list[_Piece]], target: TeacherStore, aligns, stores, cfg: AssembleConfig) -> BlockShard:
    n_blocks, length, s_count = len(blocks), cfg.block_len, 1 + len(stores)
    shard = dict(
        input_ids=torch.zeros(n_blocks, length, dtype=torch.int32),
        labels=torch.full((n_blocks, length), -100, dtype=torch.int32),
        doc_index=torch.full((n_blocks, length), -1, dtype=torch.int32),
        source_pos=torch.full((s_count, n_blocks, length), -1, dtype=torch.int32),
        fallback_id=torch.full((s_count, n_blocks, length), -1, dtype=torch.int32),
        doc_ce=torch.zeros(s_count, n_blocks, length),
        token_ce=torch.full((s_count, n_blocks, length), float("nan")),
        block_ce=torch.zeros(s_count, n_blocks),
    )
    doc_ids, first_rows, offsets = [], [], [0]
    cache: dict[int, tuple[TeacherRecord, list[TeacherRecord], list[Any], list[float]]] = {}
    # the reference block score is accumulated in float64 (the original averages Python
    # floats) and rounded once to the stored float32; per_byte keeps its float32 sums
    acc = torch.float64 if cfg.score == "reference" else torch.float32
    for b, pieces in enumerate(blocks):
        weights = torch.zeros(len(pieces), dtype=acc)
        piece_scores = torch.zeros(s_count, len(pieces), dtype=acc)
        for p, pc in enumerate(pieces):
            if pc.doc_id not in cache:
                trec = target.get(pc.doc_id)
                srecs, maps = [], []
                for al, st in zip(aligns, stores):
                    srec, amap = st.get(pc.doc_id), al.get(pc.doc_id)
                    if srec.text_hash != trec.text_hash:
                        raise StoreError(f"document {pc.doc_id}: source store {st.root} holds another text than the target store")
                    if amap.source_pos.numel() != trec.num_tokens:
                        raise StoreError(f"document {pc.doc_id}: alignment {al.root} has {amap.source_pos.numel()} rows, the target record {trec.num_tokens}")
                    srecs.append(srec)
                    maps.append(amap)
                scores = [_score(r, cfg.score) for r in [trec, *srecs]]
                cache = {pc.doc_id: (trec, srecs, maps, scores)}  # pieces of one document are adjacent
            trec, srecs, maps, scores = cache[pc.doc_id]
            rows = slice(pc.offset, pc.offset + pc.stop - pc.start)
            doc_rows = torch.arange(pc.start, pc.stop)
            shard["input_ids"][b, rows] = trec.input_ids[pc.start:pc.stop].to(torch.int32)
            nxt = doc_rows + 1
            has_next = nxt < trec.num_tokens
            shard["labels"][b, rows] = torch.where(has_next, trec.input_ids[nxt.clamp_max(trec.num_tokens - 1)], -100).to(torch.int32)
            shard["doc_index"][b, rows] = p
            shard["source_pos"][0, b, rows] = doc_rows.to(torch.int32)
            shard["token_ce"][0, b, rows] = torch.where(has_next, trec.nll[pc.start:pc.stop], float("nan"))
            for s, (srec, amap) in enumerate(zip(srecs, maps), start=1):
                sp = amap.source_pos[pc.start:pc.stop]
                shard["source_pos"][s, b, rows] = sp
                shard["fallback_id"][s, b, rows] = amap.fallback_id[pc.start:pc.stop]
                # a record's last row predicts nothing (its stored nll is 0); with shifted-block
                # labels the target's EOS row is labelled and would otherwise score 0 there
                predicts = (sp >= 0) & (sp < srec.num_tokens - 1)
                shard["token_ce"][s, b, rows] = torch.where(predicts, srec.nll[sp.clamp_min(0).long()], float("nan"))
            for s in range(s_count):
                shard["doc_ce"][s, b, rows] = scores[s]
            piece_scores[:, p] = torch.tensor(scores, dtype=acc)
            # reference: the original repeats the document's score once per token of the block
            weights[p] = float(trec.token_bytes[pc.start + 1:pc.stop + 1].sum() if cfg.score == "per_byte" else pc.stop - pc.start)
            doc_ids.append(pc.doc_id)
            first_rows.append(pc.start)
        ok = torch.isfinite(piece_scores) & (weights > 0)
        w = torch.where(ok, weights, 0.0)
        shard["block_ce"][:, b] = ((torch.where(ok, piece_scores, 0.0) * w).sum(1) / w.sum(1).clamp_min(1e-12)).float()
        if cfg.labels == "shifted-block":
            real = int(shard["doc_index"][b].ge(0).sum())  # real rows come first, padding after
            shard["labels"][b] = -100
            shard["labels"][b, :real - 1] = shard["input_ids"][b, 1:real]
        offsets.append(offsets[-1] + len(pieces))
    return BlockShard(
        **shard, block_doc_offsets=torch.tensor(offsets, dtype=torch.int64),
        doc_ids=torch.tensor(doc_ids, dtype=torch.int64), doc_first_row=torch.tensor(first_rows, dtype=torch.int32),
    )


def _corpus_section(target: TeacherStore, out: Path) -> dict[str, Any]:
    """The target store's corpus record, its path re-recorded relative to the blocks."""
    section = dict(target.manifest["corpus"])
    if "path" in section:
        section["path"] = record_path(target.path_of("corpus"), out)
    return section


def _shard_name(i: int) -> str:
    return f"blocks-{i:05d}"


def run_assemble(cfg: AssembleConfig) -> RunSummary:
    """Plan, build and write the blocks; returns the run summary."""
    t0 = time.perf_counter()
    with LockSet("fusellm assemble") as locks:
        target, aligns, stores = _open_inputs(cfg, locks)
        locks.write(cfg.output)  # before --overwrite deletes anything
        return _run_assemble(cfg, target, aligns, stores, t0)


def _run_assemble(cfg: AssembleConfig, target: TeacherStore, aligns: list[AlignmentStore], stores: list[TeacherStore],
                  t0: float) -> RunSummary:
    from tqdm.auto import tqdm

    out = Path(cfg.output)
    settings = {
        "target_settings": target.manifest["settings_hash"],
        "alignments": [al.manifest.get("settings_hash") for al in aligns],
        "block_len": cfg.block_len, "score": cfg.score, "labels": cfg.labels, "blocks_per_shard": cfg.blocks_per_shard,
    }
    methods = [al.method for al in aligns]
    if any(m != "minED" for m in methods):  # MinED-only blocks keep the settings (and hash) they always had
        settings["methods"] = methods
    if cfg.overwrite and out.exists():
        (out / "manifest.json").unlink(missing_ok=True)  # first: a half-cleared directory never looks complete
        clear_directory(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    spath = out / "settings.json"
    if spath.exists():
        stored = read_json(spath)
        stored.setdefault("labels", "document")  # written before --labels existed: the document labels
        check_same_settings(stored, settings, spath)
    else:
        write_json_atomic(spath, settings)

    # Documents whose logits held NaN/inf in any candidate's pass have no usable scores or
    # teachers: they are left out of the blocks (counted in the summary and manifest).
    nonfinite: set[int] = set()
    for store in (target, *stores):
        for i in range(len(store.shards)):
            idx = store.shard_index(i)
            nonfinite.update(idx.doc_ids[(idx.flags.long() & DocFlag.NONFINITE) != 0].tolist())
    doc_ids, lengths = [], []
    for i in range(len(target.shards)):
        idx = target.shard_index(i)
        for d, n in zip(idx.doc_ids.tolist(), idx.lengths().tolist()):
            if d not in nonfinite:
                doc_ids.append(d)
                lengths.append(n)
    for al in aligns:
        missing = set(doc_ids) - set(al.doc_ids())
        if missing:
            raise StoreError(f"alignment {al.root} lacks {len(missing)} documents of the target store (e.g. id {min(missing)}); run `fusellm align` again")
    blocks = plan_blocks(doc_ids, lengths, cfg.block_len)
    n_shards = max(1, math.ceil(len(blocks) / cfg.blocks_per_shard))
    infos: list[ShardInfo] = []
    for i in tqdm(range(n_shards), desc="assemble", unit="shard", disable=not cfg.progress):
        name = _shard_name(i)
        sidecar = out / "shards" / f"{name}.json"
        if sidecar.exists():
            info = ShardInfo.from_json(read_json(sidecar))
            try:
                verify_file(out / info.file, info.sha256, info.size_bytes, kind="blocks")
                infos.append(info)
                continue
            except StoreError:
                pass  # damaged or half-written: build it again
        part = blocks[i * cfg.blocks_per_shard:(i + 1) * cfg.blocks_per_shard]
        shard = _build_shard(part, target, aligns, stores, cfg)
        rel = f"shards/{name}.safetensors"
        sha, size = write_block_shard(out / rel, shard)
        ids = shard.doc_ids.tolist()
        info = ShardInfo(i, rel, sha, size, documents=len(ids), tokens=int((shard.doc_index >= 0).sum()),
                         first_doc_id=min(ids), last_doc_id=max(ids), extra={"blocks": shard.num_blocks})
        write_json_atomic(sidecar, info.to_json())
        infos.append(info)

    # paths relative to this manifest; each candidate's tokenizer fingerprint (train and eval
    # compare the model's against candidate 0's) and the vocab map's hash (train verifies it)
    candidates = [{"name": str(target.path_of("model")), "store": record_path(target.root, out), "vocab_map": None,
                   "tokenizer_fingerprint": target.tokenizer_fingerprint,
                   "aligned_fraction": 1.0}]
    for al, st in zip(aligns, stores):
        candidates.append({"name": str(st.path_of("model")), "store": record_path(st.root, out),
                           "alignment": record_path(al.root, out),
                           "vocab_map": record_path(al.vocab_map_path, out), "vocab_map_sha256": al.manifest["vocab_map_sha256"],
                           "tokenizer_fingerprint": st.tokenizer_fingerprint,
                           "reference": bool(al.manifest["settings"]["reference"]),
                           # pta: the teacher is the alignment's aligned rows, not the store's top-k
                           "method": al.method,
                           "aligned_fraction": al.manifest["counts"]["aligned_fraction"]})
    manifest = write_blocks_manifest(out, infos, block_len=cfg.block_len, candidates=candidates, header={
        "corpus": _corpus_section(target, out), "score": cfg.score, "labels": cfg.labels, "settings": settings, "settings_hash": settings_hash(settings),
        "excluded_nonfinite_docs": sorted(nonfinite),
        "target_vocab_size": target.manifest["model"]["logits_size"],
    })
    total_bytes = sum(s.size_bytes for s in infos)
    return RunSummary(
        stage="assemble", documents=len(doc_ids), tokens=int(manifest["counts"]["tokens"]), bytes_written=total_bytes,
        seconds=time.perf_counter() - t0,
        extra={"blocks": manifest["counts"]["blocks"], "excluded nonfinite docs": len(nonfinite),
               "aligned_fraction": {c["name"]: round(c["aligned_fraction"], 4) for c in candidates}},
    )
