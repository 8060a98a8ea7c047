"""`fusellm verify PATH`: check a teacher store, an alignment, blocks or a checkpoint completely.

Every problem found is reported with the file it is in (the check goes on after the first):
manifest fields, shard paths inside the store, each file's size and SHA-256, that each shard
reads as safetensors with the arrays, dtypes and shapes its format has, that offsets and
counts agree with the manifest, ids within their vocabularies, and the files a manifest
points to (source stores, vocab maps) with their recorded hashes. A training run directory
or one DCP checkpoint is checked against the checksum list written with it.

The stages check hashes lazily, before each file's first use; this is the complete check,
for a store that was copied, restored from backup or left on a disk that failed.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fusellm_kernels.store.manifest import StoreError, read_json, recorded_path, sha256_file


@dataclass
class VerifyReport:
    path: Path
    kind: str
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        head = f"{self.path}: {self.kind}, {self.files} files, {self.bytes / 2**20:.1f} MiB read in {self.seconds:.1f} s"
        if self.ok:
            return f"{head}: OK"
        return "\n".join([f"{head}: {len(self.problems)} problem(s)", *(f"  - {p}" for p in self.problems)])


class _Checker:
    def __init__(self, report: VerifyReport) -> None:
        self.r = report

    def problem(self, text: str) -> None:
        self.r.problems.append(text)

    def file(self, root: Path, rel: Any, sha: Any, size: Any, what: str = "shard") -> Path | None:
        """Containment, presence, size and hash of one listed file; its path when all hold."""
        from fusellm_kernels.store.manifest import inside

        try:
            path = inside(root, rel, what)
        except StoreError as e:
            self.problem(str(e))
            return None
        if not path.is_file():
            self.problem(f"{path} is listed in {root / 'manifest.json'} but missing")
            return None
        n = path.stat().st_size
        self.r.files += 1
        self.r.bytes += n
        if size is not None and n != size:
            self.problem(f"{path} is {n} bytes; the manifest recorded {size}: truncated or damaged")
            return None
        if sha256_file(path) != sha:
            self.problem(f"{path} does not match its SHA-256 in {root / 'manifest.json'}: the file is damaged")
            return None
        return path

    def tensors(self, path: Path, expected: dict[str, tuple[torch.dtype, ...]]) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
        except Exception as e:
            self.problem(f"{path} cannot be read as safetensors ({e})")
            return None
        for name, dtypes in expected.items():
            if name not in t:
                self.problem(f"{path} lacks the array {name!r}")
                return None
            if t[name].dtype not in dtypes:
                self.problem(f"{path}: array {name!r} is {t[name].dtype}, expected {dtypes}")
                return None
        return t

    def offsets(self, path: Path, offsets: torch.Tensor, rows: int, name: str = "doc_offsets") -> bool:
        ok = (offsets.numel() >= 1 and int(offsets[0]) == 0 and int(offsets[-1]) == rows
              and bool((offsets[1:] >= offsets[:-1]).all()))
        if not ok:
            self.problem(f"{path}: {name} are not a non-decreasing run from 0 to its {rows} rows")
        return ok


def _manifest(ch: _Checker, root: Path) -> dict[str, Any] | None:
    try:
        m = read_json(root / "manifest.json")
    except StoreError as e:
        ch.problem(str(e))
        return None
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        ch.problem(f"{root / 'manifest.json'} has no shard list")
        return None
    return m


def _shard_fields(ch: _Checker, root: Path, s: Any) -> tuple[Any, ...] | None:
    try:
        return s["file"], s["sha256"], s["size_bytes"], int(s["documents"]), int(s["tokens"])
    except (KeyError, TypeError, ValueError):
        ch.problem(f"{root / 'manifest.json'}: a shard entry lacks file/sha256/size_bytes/documents/tokens: {s!r}")
        return None


def _teacher(ch: _Checker, root: Path, m: dict[str, Any]) -> None:
    from fusellm_kernels.store.format import TEACHER_STORE_VERSIONS, unpack_ids

    if m.get("format_version") not in TEACHER_STORE_VERSIONS:
        ch.problem(f"{root / 'manifest.json'}: format_version {m.get('format_version')} is not one of {TEACHER_STORE_VERSIONS}")
        return
    k, bits, num_ids = int(m["k"]), int(m["id_bits"]), int(m["num_ids"])
    bitpack = m["encoding"]["ids"] == "bitpack"
    docs = tokens = 0
    for s in m["shards"]:
        f = _shard_fields(ch, root, s)
        path = f and ch.file(root, f[0], f[1], f[2])
        if not f or path is None:
            continue
        t = ch.tensors(path, {"doc_ids": (torch.int64,), "doc_offsets": (torch.int64,), "ids": (torch.uint8, torch.int32),
                              "topk_logits": (torch.float16, torch.bfloat16, torch.float32),
                              "nll": (torch.float16, torch.float32), "token_bytes": (torch.uint8, torch.uint16)})
        if t is None:
            continue
        rows = t["ids"].shape[0]
        if t["doc_ids"].numel() != f[3] or rows != f[4]:
            ch.problem(f"{path} holds {t['doc_ids'].numel()} documents and {rows} rows; the manifest says {f[3]} and {f[4]}")
        ch.offsets(path, t["doc_offsets"], rows)
        if t["topk_logits"].shape != (rows, k):
            ch.problem(f"{path}: topk_logits is {tuple(t['topk_logits'].shape)}, expected ({rows}, {k})")
        ids = unpack_ids(t["ids"], k + 1, bits) if bitpack else t["ids"].long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_ids):
            ch.problem(f"{path}: ids reach {int(ids.max())}, beyond the store's {num_ids} ids")
        docs += t["doc_ids"].numel()
        tokens += rows
    counts = m.get("counts", {})
    if not ch.r.problems and (counts.get("documents") != docs or counts.get("tokens") != tokens):
        ch.problem(f"{root / 'manifest.json'} counts {counts.get('documents')} documents / {counts.get('tokens')} tokens; "
                   f"the shards hold {docs} / {tokens}")


def _alignment(ch: _Checker, root: Path, m: dict[str, Any]) -> None:
    from fusellm_kernels.store.alignment import ALIGNMENT_VERSIONS, _check_aligned_rows

    if m.get("format_version") not in ALIGNMENT_VERSIONS:
        ch.problem(f"{root / 'manifest.json'}: format_version {m.get('format_version')} is not one of {ALIGNMENT_VERSIONS}")
        return
    aligned_rows = m.get("method", "minED") == "pta"  # aligned-rows shards (`fusellm align --method pta`)
    width = (m.get("pta") or {}).get("width")
    target_ids = None  # the target store's id count: aligned rows hold target ids
    if aligned_rows:
        with contextlib.suppress(StoreError, KeyError, TypeError, ValueError):
            tpath = recorded_path(m["target"]["path"], root, int(m["format_version"]), relative_since=2)
            target_ids = int(read_json(tpath / "manifest.json")["num_ids"])
    for s in m["shards"]:
        f = _shard_fields(ch, root, s)
        path = f and ch.file(root, f[0], f[1], f[2])
        if not f or path is None:
            continue
        t = ch.tensors(path, {"doc_ids": (torch.int64,), "doc_offsets": (torch.int64,), "source_pos": (torch.int32,),
                              "fallback_id": (torch.int32,)})
        if t is None:
            continue
        rows = t["source_pos"].numel()
        if rows != f[4] or t["fallback_id"].numel() != rows:
            ch.problem(f"{path} holds {rows} rows; the manifest says {f[4]}")
        ch.offsets(path, t["doc_offsets"], rows)
        if rows and (int(t["source_pos"].min()) < -1 or int(t["fallback_id"].min()) < -1):
            ch.problem(f"{path}: source_pos or fallback_id below −1")
        if aligned_rows:
            try:
                _check_aligned_rows(path, t)
            except StoreError as e:
                ch.problem(str(e))
                continue
            ids = t["row_ids"]
            if width is not None and ids.shape[1] != int(width):
                ch.problem(f"{path}: aligned rows of {ids.shape[1]} slots; the manifest records width {width}")
            if target_ids is not None and ids.numel() and int(ids.max()) >= target_ids:
                ch.problem(f"{path}: row_ids reach {int(ids.max())}, beyond the target store's {target_ids} ids")
    vm = ch.file(root, m.get("vocab_map", "vocab_map.pt"), m.get("vocab_map_sha256"), None, "vocab_map")
    if vm is not None:
        try:
            vmap = torch.load(vm, map_location="cpu", weights_only=True)
            if not isinstance(vmap, torch.Tensor) or vmap.dim() != 1:
                ch.problem(f"{vm} does not hold a 1-D id map")
        except Exception as e:
            ch.problem(f"{vm} cannot be read as a tensor ({e})")
    for role in ("target", "source"):
        store = recorded_path(m[role]["path"], root, int(m["format_version"]), relative_since=2)
        _linked_store(ch, store, m[role].get("settings_hash"), f"the {role} store of {root}")


def _linked_store(ch: _Checker, path: Path, settings_hash: str | None, what: str) -> None:
    mpath = path / "manifest.json"
    if not mpath.exists():
        ch.problem(f"{what}, {path}, has no manifest.json (moved, deleted or incomplete)")
        return
    try:
        recorded = read_json(mpath).get("settings_hash")
    except StoreError as e:
        ch.problem(str(e))
        return
    if settings_hash is not None and recorded != settings_hash:
        ch.problem(f"{what}, {path}, was rewritten with other settings since (settings_hash {recorded}, recorded {settings_hash})")


def _blocks(ch: _Checker, root: Path, m: dict[str, Any]) -> None:
    from fusellm_kernels.store.blocks import _ARRAY_DTYPES, BLOCKS_VERSIONS, BlockShard

    if m.get("format_version") not in BLOCKS_VERSIONS:
        ch.problem(f"{root / 'manifest.json'}: format_version {m.get('format_version')} is not one of {BLOCKS_VERSIONS}")
        return
    n_cand = len(m.get("candidates", []))
    vocab = m.get("target_vocab_size")
    for s in m["shards"]:
        f = _shard_fields(ch, root, s)
        path = f and ch.file(root, f[0], f[1], f[2])
        if not f or path is None:
            continue
        t = ch.tensors(path, {name: (dt,) for name, dt in _ARRAY_DTYPES.items()})
        if t is None:
            continue
        try:
            shard = BlockShard(**t)
        except StoreError as e:
            ch.problem(f"{path}: {e}")
            continue
        if shard.source_pos.shape[0] != n_cand:
            ch.problem(f"{path} holds {shard.source_pos.shape[0]} candidates; the manifest names {n_cand}")
        if int(shard.block_doc_offsets[-1]) != shard.doc_ids.numel():
            ch.problem(f"{path}: block_doc_offsets end at {int(shard.block_doc_offsets[-1])}, not at its {shard.doc_ids.numel()} pieces")
        if vocab is not None and shard.input_ids.numel() and int(shard.input_ids.max()) >= int(vocab):
            ch.problem(f"{path}: input ids reach {int(shard.input_ids.max())}, beyond the target vocabulary of {vocab}")
        bad_labels = (shard.labels != -100) & ((shard.labels < 0) | (shard.labels >= int(vocab or 2**31 - 1)))
        if bool(bad_labels.any()):
            ch.problem(f"{path}: {int(bad_labels.sum())} labels outside the vocabulary and not −100")
    version = int(m["format_version"])
    for i, cand in enumerate(m.get("candidates", [])):
        store = cand.get("store") and recorded_path(cand["store"], root, version, relative_since=2)
        if store:
            if version < 2 and not store.is_absolute() and not store.exists():
                store = root / store
            if not (store / "manifest.json").exists():
                ch.problem(f"candidate {i}'s teacher store {store} has no manifest.json (moved, deleted or incomplete)")
        vm = cand.get("vocab_map") and recorded_path(cand["vocab_map"], root, version, relative_since=2)
        sha = cand.get("vocab_map_sha256")
        if vm is not None and not vm.is_file():
            ch.problem(f"candidate {i}'s vocab map {vm} is missing")
        elif vm is not None and sha is not None:
            ch.r.files += 1
            ch.r.bytes += vm.stat().st_size
            if sha256_file(vm) != sha:
                ch.problem(f"candidate {i}'s vocab map {vm} does not match the SHA-256 recorded in {root / 'manifest.json'}")


def _checkpoints(ch: _Checker, root: Path) -> None:
    try:
        from fusellm_kernels.training.checkpoint import CHECKSUMS, verify_checkpoint
    except ModuleNotFoundError:
        ch.problem("checking a checkpoint needs the repository's training/ package (run from a checkout)")
        return
    dirs = [root] if (root / CHECKSUMS).exists() or (root / ".metadata").exists() else sorted(
        p for p in (root / "checkpoints").glob("step-*") if p.is_dir())
    if not dirs:
        ch.problem(f"{root} holds no checkpoint (no {CHECKSUMS}, .metadata or checkpoints/step-*)")
    for d in dirs:
        for p in d.iterdir():
            if p.is_file():
                ch.r.files += 1
                ch.r.bytes += p.stat().st_size
        ch.r.problems.extend(verify_checkpoint(d))


_KINDS: dict[str, tuple[str, Callable[[_Checker, Path, dict[str, Any]], None]]] = {
    "fusellm-teacher-store": ("teacher store", _teacher),
    "fusellm-alignment": ("alignment", _alignment),
    "fusellm-blocks": ("blocks", _blocks),
}


def verify_path(path: str | Path) -> VerifyReport:
    """Check whatever `path` holds completely; the report lists every problem found."""
    root = Path(path)
    t0 = time.perf_counter()
    if not root.is_dir():
        raise StoreError(f"{root} does not exist or is not a directory; give a teacher store, an alignment, blocks, "
                         "a training run directory or a checkpoint")
    if (root / "manifest.json").exists():
        report = VerifyReport(root, "store")
        ch = _Checker(report)
        m = _manifest(ch, root)
        if m is not None:
            kind = _KINDS.get(str(m.get("format")))
            if kind is None:
                ch.problem(f"{root / 'manifest.json'} is a {m.get('format')!r} manifest, not one `fusellm verify` knows")
            else:
                report.kind = kind[0]
                try:
                    kind[1](ch, root, m)
                except (KeyError, TypeError, ValueError) as e:
                    ch.problem(f"{root / 'manifest.json'} lacks or mistypes a field ({type(e).__name__}: {e})")
    elif (root / "checkpoints").is_dir() or (root / ".metadata").exists() or (root / "fusellm_checksums.json").exists():
        report = VerifyReport(root, "checkpoint")
        _checkpoints(_Checker(report), root)
    elif (root / "settings.json").exists():
        report = VerifyReport(root, "incomplete stage output",
                              problems=[f"{root} has settings.json but no manifest.json: the stage that writes it has "
                                        "not finished; run the same command again to resume it"])
    else:
        raise StoreError(f"{root} is not a fusellm store, alignment, blocks directory or checkpoint (no manifest.json, "
                         "checkpoints/ or DCP .metadata)")
    report.seconds = time.perf_counter() - t0
    return report
