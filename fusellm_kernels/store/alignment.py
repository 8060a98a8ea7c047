"""Alignment shards: per target document and source model, the position map.

`fusellm align` writes one alignment directory per source model; `fusellm assemble` reads it.

    manifest.json                        written last (format, tokenizers, mode, counts, checksums)
    shards/align-00000.safetensors       one file per shard of target documents

One shard holds D documents and T target rows:

    doc_ids      int64 [D]     corpus ids (the target store's order)
    doc_offsets  int64 [D+1]   document d owns rows doc_offsets[d]:doc_offsets[d+1]
    source_pos   int32 [T]     row of the source record whose top-k the target row takes, or −1
    fallback_id  int32 [T]     one-hot fallback target id where source_pos = −1 (−1: no teacher)

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
ALIGNMENT_VERSION = 2
ALIGNMENT_VERSIONS = (1, 2)


@dataclass(frozen=True)
class DocAlignment:
    """One document's position map against one source: source_pos, fallback_id int32 [T]."""

    doc_id: int
    source_pos: Tensor
    fallback_id: Tensor

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
    # one metadata key: safetensors writes metadata through a hash map whose order changes
    # between processes, and a resumed job must write byte-identical shards
    data = save(tensors, metadata={"format": f"{ALIGNMENT_FORMAT}/{ALIGNMENT_VERSION}"})
    write_bytes_atomic(path, data)
    return sha256_bytes(data), len(data)


def write_alignment_manifest(root: str | os.PathLike[str], shards: list[ShardInfo], header: dict[str, Any]) -> dict[str, Any]:
    """Write ``root/manifest.json`` last, atomically: its presence marks the alignment complete."""
    rows = sum(s.tokens for s in shards)
    aligned = sum(int(s.extra.get("aligned_rows", 0)) for s in shards)
    manifest = {
        **header,
        "format": ALIGNMENT_FORMAT,
        "format_version": ALIGNMENT_VERSION,
        "counts": {"documents": sum(s.documents for s in shards), "rows": rows, "aligned_rows": aligned,
                   "aligned_fraction": aligned / rows if rows else 0.0},
        "shards": [s.to_json() for s in shards],
    }
    write_json_atomic(Path(root) / "manifest.json", manifest)
    return manifest


class AlignmentStore:
    """Read a complete alignment directory; `get(doc_id)` returns that document's map."""

    def __init__(self, path: str | os.PathLike[str], verify: bool = True) -> None:
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
        return DocAlignment(doc_id, t["source_pos"][a:b], t["fallback_id"][a:b])
