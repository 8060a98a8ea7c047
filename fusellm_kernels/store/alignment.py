"""Alignment shards: per target document and source model, the position map.

`fusellm align` writes one alignment directory per source model; `fusellm assemble` reads it.

    manifest.json                        written last (format, tokenizers, mode, counts, checksums)
    shards/align-00000.safetensors       one file per shard of target documents

One shard holds D documents and T target rows:

    doc_ids      int64 [D]     corpus ids (the target store's order)
    doc_offsets  int64 [D+1]   document d owns rows doc_offsets[d]:doc_offsets[d+1]
    source_pos   int32 [T]     row of the source record whose top-k the target row takes, or −1
    fallback_id  int32 [T]     one-hot fallback target id where source_pos = −1 (−1: no teacher)

An *aligned-rows* shard (`fusellm align --method pta`, format version 3) holds, besides those
(source_pos still names the paired source row, which the CE scores use), each row's
finished teacher in target ids, W slots per row:

    row_ids      int32   [T, W]  target ids, −1 = empty slot (a row of −1 has no teacher)
    row_logits   float32 [T, W]  softmax over a row's filled slots is its teacher distribution

The manifest records `method` (`minED`, the default, or `pta`), `shard_type`
(`position_map` or `aligned_rows`), for PTA its settings, Sinkhorn's convergence (max / mean
row marginal error, iterations) and `bytes_per_token` of the shards.

Rows are the target model's own token rows (row t predicts target token t + 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusellm_kernels.store.manifest import (
    ShardInfo,
    StoreError,
    inside,
    read_json,
    recorded_path,
    sha256_bytes,
    verify_file,
    write_bytes_atomic,
    write_json_atomic,
)

ALIGNMENT_FORMAT = "fusellm-alignment"
# 2: store and tokenizer paths are recorded relative to the manifest
# 3: aligned-rows shards (method pta); position-map alignments are still written as 2
ALIGNMENT_VERSION = 2
ALIGNED_ROWS_VERSION = 3
ALIGNMENT_VERSIONS = (1, 2, 3)
METHODS = ("minED", "pta")


@dataclass(frozen=True)
class DocAlignment:
    """One document's alignment against one source: source_pos, fallback_id int32 [T]; for an
    aligned-rows alignment also row_ids int32 [T, W] and row_logits float32 [T, W]."""

    doc_id: int
    source_pos: Tensor
    fallback_id: Tensor
    row_ids: Tensor | None = None
    row_logits: Tensor | None = None

    @property
    def aligned(self) -> int:
        return int((self.source_pos >= 0).sum())


def write_alignment_shard(path: str | os.PathLike[str], docs: list[DocAlignment]) -> tuple[str, int]:
    """Write one shard atomically; returns (sha256, size)."""
    from safetensors.torch import save

    lengths = torch.tensor([d.source_pos.numel() for d in docs], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    empty = torch.zeros(0, dtype=torch.int32)
    tensors = {
        "doc_ids": torch.tensor([d.doc_id for d in docs], dtype=torch.int64),
        "doc_offsets": offsets,
        "source_pos": torch.cat([d.source_pos.to(torch.int32) for d in docs]) if docs else empty,
        "fallback_id": torch.cat([d.fallback_id.to(torch.int32) for d in docs]) if docs else empty,
    }
    version = ALIGNMENT_VERSION
    with_rows = [d.row_ids is not None for d in docs]
    if any(with_rows):
        if not all(with_rows) or any(d.row_logits is None for d in docs):
            raise ValueError("write_alignment_shard: either every document of a shard has aligned rows or none")
        widths = {int(d.row_ids.shape[1]) for d in docs}  # type: ignore[union-attr]
        if len(widths) != 1:
            raise ValueError(f"write_alignment_shard: aligned rows of one shard must share a width, got {sorted(widths)}")
        tensors["row_ids"] = torch.cat([d.row_ids.to(torch.int32) for d in docs]).contiguous()  # type: ignore[union-attr]
        tensors["row_logits"] = torch.cat([d.row_logits.to(torch.float32) for d in docs]).contiguous()  # type: ignore[union-attr]
        version = ALIGNED_ROWS_VERSION
    # one metadata key: safetensors writes metadata through a hash map whose order changes
    # between processes, and a resumed job must write byte-identical shards
    data = save(tensors, metadata={"format": f"{ALIGNMENT_FORMAT}/{version}"})
    write_bytes_atomic(path, data)
    return sha256_bytes(data), len(data)


def write_alignment_manifest(root: str | os.PathLike[str], shards: list[ShardInfo], header: dict[str, Any]) -> dict[str, Any]:
    """Write ``root/manifest.json`` last, atomically: its presence marks the alignment complete."""
    rows = sum(s.tokens for s in shards)
    aligned = sum(int(s.extra.get("aligned_rows", 0)) for s in shards)
    method = header.get("method", "minED")
    manifest = {
        **header,
        "format": ALIGNMENT_FORMAT,
        "format_version": ALIGNED_ROWS_VERSION if method == "pta" else ALIGNMENT_VERSION,
        "method": method,
        "shard_type": "aligned_rows" if method == "pta" else "position_map",
        "bytes_per_token": round(sum(s.size_bytes for s in shards) / rows, 2) if rows else 0.0,
        "counts": {"documents": sum(s.documents for s in shards), "rows": rows, "aligned_rows": aligned,
                   "aligned_fraction": aligned / rows if rows else 0.0},
        "shards": [s.to_json() for s in shards],
    }
    write_json_atomic(Path(root) / "manifest.json", manifest)
    return manifest


class AlignmentStore:
    """Read a complete alignment directory; `get(doc_id)` returns that document's map.

    An aligned-rows alignment (`--method pta`) opens only with `aligned_rows_ok=True`: a
    reader that knows only position maps would otherwise build MinED teachers from it."""

    def __init__(self, path: str | os.PathLike[str], verify: bool = True, *, aligned_rows_ok: bool = False) -> None:
        self.root = Path(path)
        if not self.root.exists():
            raise StoreError(f"the alignment {self.root} does not exist; run `fusellm align` to make it, or check the path")
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise StoreError(f"{self.root} is not a complete alignment: {mpath.name} is missing (run or resume `fusellm align`)")
        self.manifest: dict[str, Any] = read_json(mpath)
        if self.manifest.get("format") != ALIGNMENT_FORMAT or self.manifest.get("format_version") not in ALIGNMENT_VERSIONS:
            raise StoreError(f"{mpath} is {self.manifest.get('format')!r} v{self.manifest.get('format_version')}; "
                             f"expected {ALIGNMENT_FORMAT!r} v{ALIGNMENT_VERSIONS}")
        self.format_version = int(self.manifest["format_version"])
        self.method: str = self.manifest.get("method", "minED")
        if self.method not in METHODS:
            raise StoreError(f"{mpath} records method {self.method!r}; expected one of {METHODS}")
        self.aligned_rows = self.method == "pta"
        if self.aligned_rows and not aligned_rows_ok:
            raise StoreError(f"the alignment {self.root} holds PTA aligned rows (`fusellm align --method pta`), which "
                             "this stage cannot read yet; align with --method minED for it")
        self.shards = [ShardInfo.from_json(s) for s in self.manifest["shards"]]
        self._files = [inside(self.root, s.file, "shard") for s in self.shards]
        self._verify = verify
        self._loaded: dict[int, dict[str, Tensor]] = {}
        self._where: dict[int, tuple[int, int]] | None = None

    def _shard(self, i: int) -> dict[str, Tensor]:
        if i not in self._loaded:
            from safetensors.torch import load_file

            path = self._files[i]
            if self._verify:
                verify_file(path, self.shards[i].sha256, self.shards[i].size_bytes, kind="alignment")
            try:
                self._loaded[i] = load_file(str(path))
            except FileNotFoundError:
                raise StoreError(f"{path} is listed in {self.root / 'manifest.json'} but missing") from None
            except Exception as e:
                raise StoreError(f"{path} cannot be read as safetensors ({e}); the shard is corrupted") from None
            if self.aligned_rows:
                _check_aligned_rows(path, self._loaded[i])
        return self._loaded[i]

    def path_of(self, role: str) -> Path:
        """The teacher store the manifest records for "target" or "source"."""
        return recorded_path(self.manifest[role]["path"], self.root, self.format_version, relative_since=2)

    @property
    def vocab_map_path(self) -> Path:
        return inside(self.root, self.manifest["vocab_map"], "vocab_map")

    def verify_vocab_map(self) -> Path:
        """The vocabulary map's path, once its bytes match the manifest's hash."""
        path = self.vocab_map_path
        verify_file(path, self.manifest["vocab_map_sha256"], None, kind="alignment")
        return path

    def verify(self) -> None:
        """Check every shard's and the vocabulary map's checksum."""
        for i, s in enumerate(self.shards):
            verify_file(self._files[i], s.sha256, s.size_bytes, kind="alignment")
        self.verify_vocab_map()

    def doc_ids(self) -> list[int]:
        return [int(d) for i in range(len(self.shards)) for d in self._shard(i)["doc_ids"].tolist()]

    def get(self, doc_id: int) -> DocAlignment:
        if self._where is None:
            self._where = {d: (i, p) for i in range(len(self.shards)) for p, d in enumerate(self._shard(i)["doc_ids"].tolist())}
        if doc_id not in self._where:
            raise KeyError(f"document {doc_id} is not in the alignment {self.root}")
        i, p = self._where[doc_id]
        t = self._shard(i)
        a, b = int(t["doc_offsets"][p]), int(t["doc_offsets"][p + 1])
        if self.aligned_rows:
            return DocAlignment(doc_id, t["source_pos"][a:b], t["fallback_id"][a:b], t["row_ids"][a:b], t["row_logits"][a:b])
        return DocAlignment(doc_id, t["source_pos"][a:b], t["fallback_id"][a:b])

    def teacher_rows(self, doc_id: int) -> tuple[Tensor, Tensor]:
        """The document's teacher table from an aligned-rows alignment: (topk_ids int64 [T, W]
        target ids, −1 = empty slot; topk_logits float32 [T, W]). Target row t's teacher is
        table row t, already in target ids, so `gather_teacher_rows` takes it with
        `vocab_maps=[None]`, `source_rows` = the table row and `fallback_id` = −1."""
        if not self.aligned_rows:
            raise StoreError(f"the alignment {self.root} holds position maps (method {self.method}), not aligned rows; "
                             "build its teachers from the source's top-k with the position map")
        d = self.get(doc_id)
        return d.row_ids.long(), d.row_logits  # type: ignore[union-attr, return-value]


def _check_aligned_rows(path: Path, t: dict[str, Tensor]) -> None:
    """Refuse an aligned-rows shard whose arrays do not fit together (a checksum only proves
    the bytes are the ones written, not that the writer was this format's)."""
    def bad(what: str) -> StoreError:
        return StoreError(f"{path} is not a valid aligned-rows shard ({what}); the shard is corrupted: delete it and "
                          "its .json sidecar and resume `fusellm align` to rewrite it")

    for name, dtype in (("doc_offsets", torch.int64), ("source_pos", torch.int32), ("fallback_id", torch.int32),
                        ("row_ids", torch.int32), ("row_logits", torch.float32)):
        if name not in t:
            raise bad(f"no {name}")
        if t[name].dtype != dtype:
            raise bad(f"{name} is {t[name].dtype}, expected {dtype}")
    rows = t["source_pos"].numel()
    ids, logits = t["row_ids"], t["row_logits"]
    if ids.dim() != 2 or ids.shape[0] != rows or logits.shape != ids.shape:
        raise bad(f"row_ids {tuple(ids.shape)} and row_logits {tuple(logits.shape)} for {rows} rows")
    if t["doc_offsets"].numel() == 0 or int(t["doc_offsets"][-1]) != rows:
        raise bad("doc_offsets do not end at the row count")
    if ids.numel() and int(ids.min()) < -1:
        raise bad(f"a row id of {int(ids.min())}")
    if not bool(torch.isfinite(logits[ids >= 0]).all()):
        raise bad("a non-finite logit in a filled slot")
