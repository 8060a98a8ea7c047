"""Assembled training blocks: fixed-length packed rows with position maps and CE scores.

`fusellm assemble` writes them; the trainer reads them and builds the teacher tensors on the
device from the candidates' teacher stores (`fusellm_kernels.pipeline.batches`). Nothing
here holds a teacher distribution: a block row points into each candidate's stored top-k.

Layout of a block directory::

    manifest.json                   written last (format, candidates, counts, checksums)
    shards/blocks-00000.safetensors one file per shard of blocks

One shard holds B blocks of L rows and D document pieces (a document longer than the room
left in a block continues in the next block):

    input_ids       int32   [B, L]     target token ids (0 at padding)
    labels          int32   [B, L]     next target token of the same document; −100 at a
                                       document's last row and at padding (`--labels
                                       shifted-block`, the original's: the block's next
                                       row's input; −100 at its last real row and padding)
    doc_index       int32   [B, L]     which piece of the block's document table the row
                                       belongs to (0, 1, ... within the block; −1 padding)
    block_doc_offsets int64 [B+1]      block b owns pieces block_doc_offsets[b]:[b+1]
    doc_ids         int64   [D]        corpus document id of each piece
    doc_first_row   int32   [D]        the piece's first row in the target document
    source_pos      int32   [S, B, L]  row of candidate s's record of the same document whose
                                       top-k the row takes, or −1
    fallback_id     int32   [S, B, L]  the one-hot fallback's target id where source_pos = −1
                                       (−1: no teacher at that row)
    doc_ce          float32 [S, B, L]  candidate s's score of the row's document
    token_ce        float32 [S, B, L]  candidate s's NLL at the aligned source row (NaN where
                                       the row has no aligned source row or it predicts
                                       nothing: the record's last row)
    block_ce        float32 [S, B]     the block score: the mean of the pieces' document
                                       scores weighted by their rows (`--score reference`,
                                       the original's) or their predicted bytes (`per_byte`)

Candidate 0 is the target model itself by convention; its source_pos is the row's own
position in the document.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
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
)

BLOCKS_FORMAT = "fusellm-blocks"
# 2: candidates' stores, alignments and vocab maps are recorded relative to the manifest, with
# their tokenizer fingerprints and vocab-map hashes
BLOCKS_VERSION = 2
BLOCKS_VERSIONS = (1, 2)


@dataclass(frozen=True)
class BlockShard:
    """The arrays of one shard of blocks (shapes and dtypes in the module docstring)."""

    input_ids: Tensor
    labels: Tensor
    doc_index: Tensor
    block_doc_offsets: Tensor
    doc_ids: Tensor
    doc_first_row: Tensor
    source_pos: Tensor
    fallback_id: Tensor
    doc_ce: Tensor
    token_ce: Tensor
    block_ce: Tensor

    def __post_init__(self) -> None:
        b, length = self.input_ids.shape
        s = self.source_pos.shape[0]
        expected = {
            "labels": (b, length), "doc_index": (b, length), "block_doc_offsets": (b + 1,),
            "source_pos": (s, b, length), "fallback_id": (s, b, length), "doc_ce": (s, b, length),
            "token_ce": (s, b, length), "block_ce": (s, b),
            "doc_first_row": tuple(self.doc_ids.shape),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise StoreError(f"block shard array {name} has shape {tuple(getattr(self, name).shape)}; expected {shape}")

    @property
    def num_blocks(self) -> int:
        return int(self.input_ids.shape[0])

    def block(self, b: int) -> Block:
        """Block b of the shard as a `Block`."""
        lo, hi = int(self.block_doc_offsets[b]), int(self.block_doc_offsets[b + 1])
        return Block(
            input_ids=self.input_ids[b], labels=self.labels[b], doc_index=self.doc_index[b],
            doc_ids=self.doc_ids[lo:hi], doc_first_row=self.doc_first_row[lo:hi],
            source_pos=self.source_pos[:, b], fallback_id=self.fallback_id[:, b],
            doc_ce=self.doc_ce[:, b], token_ce=self.token_ce[:, b], block_ce=self.block_ce[:, b],
        )


@dataclass(frozen=True)
class Block:
    """One training block of L rows (S candidates, P document pieces).

    input_ids, labels, doc_index: int32 [L]; doc_ids int64 [P]; doc_first_row int32 [P];
    source_pos, fallback_id int32 [S, L]; doc_ce, token_ce float32 [S, L]; block_ce float32 [S].
    """

    input_ids: Tensor
    labels: Tensor
    doc_index: Tensor
    doc_ids: Tensor
    doc_first_row: Tensor
    source_pos: Tensor
    fallback_id: Tensor
    doc_ce: Tensor
    token_ce: Tensor
    block_ce: Tensor


_ARRAY_DTYPES = {
    "input_ids": torch.int32, "labels": torch.int32, "doc_index": torch.int32, "block_doc_offsets": torch.int64,
    "doc_ids": torch.int64, "doc_first_row": torch.int32, "source_pos": torch.int32, "fallback_id": torch.int32,
    "doc_ce": torch.float32, "token_ce": torch.float32, "block_ce": torch.float32,
}


def write_block_shard(path: str | os.PathLike[str], shard: BlockShard) -> tuple[str, int]:
    """Write one shard atomically (temp file, then rename). Returns (sha256, size in bytes)."""
    from safetensors.torch import save

    tensors = {f.name: getattr(shard, f.name).to(_ARRAY_DTYPES[f.name]).contiguous() for f in fields(shard)}
    # one metadata key: safetensors writes metadata through a hash map whose order changes
    # between processes, and a resumed job must write byte-identical shards
    data = save(tensors, metadata={"format": f"{BLOCKS_FORMAT}/{BLOCKS_VERSION}"})
    write_bytes_atomic(path, data)
    return sha256_bytes(data), len(data)


def write_blocks_manifest(
    root: str | os.PathLike[str], shards: list[ShardInfo], *, block_len: int, candidates: list[dict[str, Any]], header: dict[str, Any]
) -> dict[str, Any]:
    """Write ``root/manifest.json`` (atomically; it marks the blocks complete).

    shards: one `ShardInfo` per shard file (documents = pieces, tokens = real rows,
        extra["blocks"] = blocks in the shard). candidates: per candidate s, at least
        {"name", "store"} (the teacher store's path) and optionally "vocab_map" (a .pt file of
        the int32 source → target map; absent for the target model). header: stage sections
        (corpus, settings, aligned fractions, ...).
    """
    from fusellm_kernels.store.manifest import write_json_atomic

    manifest = {
        **header,
        "format": BLOCKS_FORMAT,
        "format_version": BLOCKS_VERSION,
        "block_len": block_len,
        "candidates": candidates,
        "counts": {
            "blocks": sum(int(s.extra["blocks"]) for s in shards),
            "pieces": sum(s.documents for s in shards),
            "tokens": sum(s.tokens for s in shards),
        },
        "shards": [s.to_json() for s in shards],
    }
    write_json_atomic(Path(root) / "manifest.json", manifest)
    return manifest


class BlockStore:
    """Read a complete block directory; every shard's checksum is verified when first opened."""

    def __init__(self, path: str | os.PathLike[str], verify: bool = True) -> None:
        self.root = Path(path)
        if not self.root.exists():
            raise StoreError(f"the block directory {self.root} does not exist; run `fusellm assemble` to make it, or check the path")
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            raise StoreError(f"{self.root} holds no complete assembled blocks: {mpath.name} is missing (run `fusellm assemble`)")
        self.manifest: dict[str, Any] = read_json(mpath)
        if self.manifest.get("format") != BLOCKS_FORMAT:
            raise StoreError(f"{mpath} is a {self.manifest.get('format')!r} manifest, not {BLOCKS_FORMAT!r}")
        if self.manifest.get("format_version") not in BLOCKS_VERSIONS:
            raise StoreError(f"{mpath} has format_version {self.manifest.get('format_version')}; this library reads {BLOCKS_VERSIONS}")
        self.format_version = int(self.manifest["format_version"])
        self.shards = [ShardInfo.from_json(s) for s in self.manifest["shards"]]
        self._files = [inside(self.root, s.file, "shard") for s in self.shards]
        self.block_len: int = int(self.manifest["block_len"])
        self.candidates: list[dict[str, Any]] = list(self.manifest["candidates"])
        self._verify = verify
        self._cache: dict[int, BlockShard] = {}
        counts = [int(s.extra["blocks"]) for s in self.shards]
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)

    def __len__(self) -> int:
        return self._starts[-1]

    def candidate_path(self, s: int, key: str) -> Path | None:
        """Candidate s's recorded "store", "alignment" or "vocab_map" path (None where absent)."""
        value = self.candidates[s].get(key)
        if not value:
            return None
        return recorded_path(value, self.root, self.format_version, relative_since=2)

    def verify(self) -> None:
        """Check every shard's checksum."""
        for i, s in enumerate(self.shards):
            verify_file(self._files[i], s.sha256, s.size_bytes, kind="blocks")

    def shard(self, i: int) -> BlockShard:
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        from safetensors.torch import load_file

        info = self.shards[i]
        path = self._files[i]
        if not path.exists():
            raise StoreError(f"{path} is listed in {self.root / 'manifest.json'} but missing")
        if self._verify:  # once per process per file (`verify_file` remembers it)
            verify_file(path, info.sha256, info.size_bytes, kind="blocks")
        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise StoreError(f"{path} cannot be read as safetensors ({e}); the shard is corrupted") from None
        shard = BlockShard(**{name: tensors[name] for name in _ARRAY_DTYPES})
        self._cache = {i: shard}  # one shard in memory at a time: blocks are read in order
        return shard

    def __getitem__(self, index: int) -> Block:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        lo, hi = 0, len(self.shards) - 1
        while lo < hi:  # the shard whose range holds `index`
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        return self.shard(lo).block(index - self._starts[lo])
