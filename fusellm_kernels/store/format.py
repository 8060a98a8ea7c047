"""The teacher store: ragged, sharded safetensors plus a versioned JSON manifest.

Layout of a store directory::

    manifest.json                  written last; its presence means the store is complete
    settings.json                  the pass's settings, written first (resume checks them)
    shards/shard-00000.safetensors one file per shard of the corpus
    shards/shard-00000.json        sidecar: checksum and counts, written after the shard

One shard holds D documents and T tokens (rows) in these tensors, no padding anywhere:

    doc_ids             int64   [D]       stable corpus ids
    doc_text_hash       int64   [D]       hash of each document's text
    doc_flags           uint8   [D]       `DocFlag` bits
    doc_offsets         int64   [D+1]     document d owns rows offsets[d]:offsets[d+1]
    doc_nll_sum         float64 [D]       float32-accurate NLL sum per document (for scores)
    doc_predicted_bytes int64   [D]       bytes of the predicted tokens x_1..x_{T-1}
    ids                 [T, ...]          row t: the input token x_t, then the top-k ids
    topk_logits         [T, k]            descending
    nll                 [T]
    token_bytes         uint8/uint16 [T]  (uint16 only in shards with a token over 255 bytes)
    lse                 float32 [T]       only with ``store_lse``

Encodings (`StoreEncoding`):

* ``compact`` (default): ``ids`` is uint8 [T, ceil((k+1)*b/8)], each row's k+1 ids packed
  little-endian into b = bits(vocab-1) bits each (15 bits for 32 000, 17 for 128 256);
  logits float16 (or bfloat16), nll float16. At k = 10 and a 128k vocabulary:
  24 + 20 + 2 + 1 = 47 bytes per token (+4 with lse), against about 111 in the reference.
  Error: float16 rounds to nearest with a relative error <= 2**-11 (4.9e-4) for |x| in
  [6.1e-5, 65504] (and an absolute error <= 2**-25 below); bfloat16 <= 2**-8. Logits that a
  bf16 model computed are exact in float16 unless they are below 6.1e-5 in magnitude.
  Ids, token bytes, offsets and the per-document NLL sums are always exact.
* ``lossless``: ``ids`` int32 [T, k+1], logits and nll float32: exactly what the model's
  float32 (or lower) computation produced.
"""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
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
from fusellm_kernels.store.records import DocIndex, TeacherRecord

TEACHER_STORE_FORMAT = "fusellm-teacher-store"
# 2: paths of the model, tokenizer and corpus are recorded relative to the manifest
TEACHER_STORE_VERSION = 2
TEACHER_STORE_VERSIONS = (1, 2)
FP16_MAX = 65504.0

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class StoreEncoding:
    """How the teacher arrays are encoded on disk (see the module docstring)."""

    name: Literal["compact", "lossless"]
    ids: Literal["bitpack", "int32"]
    logits: Literal["float16", "bfloat16", "float32"]
    nll: Literal["float16", "float32"]
    lse: bool

    @staticmethod
    def compact(store_lse: bool = False, logit_dtype: Literal["float16", "bfloat16"] = "float16") -> StoreEncoding:
        if logit_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"--logit-dtype {logit_dtype!r}: the compact format stores float16 or bfloat16")
        return StoreEncoding("compact", "bitpack", logit_dtype, "float16", store_lse)

    @staticmethod
    def lossless(store_lse: bool = False) -> StoreEncoding:
        return StoreEncoding("lossless", "int32", "float32", "float32", store_lse)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(obj: dict[str, Any]) -> StoreEncoding:
        return StoreEncoding(**obj)


def id_bits(num_ids: int) -> int:
    """Bits that hold every id in range(num_ids)."""
    return max(1, int(num_ids - 1).bit_length())


# --- bit packing -----------------------------------------------------------------------------


def pack_ids(values: Tensor, bits: int) -> Tensor:
    """Pack int [n, m] values < 2**bits into uint8 [n, ceil(m*bits/8)], rows byte-aligned.

    Value j of a row occupies bits j*bits .. (j+1)*bits - 1, least significant first. Byte
    alignment per row lets a reader slice any row range straight out of the file.
    """
    if values.dim() != 2:
        raise ValueError(f"pack_ids expects [n, m] values, got shape {tuple(values.shape)}")
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    n, m = values.shape
    row_bytes = (m * bits + 7) // 8
    v = values.detach().to("cpu", torch.int64).numpy()
    if v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"ids must lie in [0, 2**{bits}); got range [{v.min()}, {v.max()}]")
    out = np.empty((n, row_bytes), dtype=np.uint8)
    step = max(1, (1 << 22) // max(m * 64, 1))  # bounds the [rows, m, 64] bit scratch to ~4 MiB
    for s in range(0, n, step):
        chunk = np.ascontiguousarray(v[s : s + step]).astype("<i8")
        bitarr = np.unpackbits(chunk.view(np.uint8).reshape(-1, m, 8), axis=2, bitorder="little")
        bitarr = bitarr[:, :, :bits].reshape(-1, m * bits)
        out[s : s + step] = np.packbits(bitarr, axis=1, bitorder="little")
    return torch.from_numpy(out)


def unpack_ids(packed: Tensor, m: int, bits: int) -> Tensor:
    """Inverse of `pack_ids`: uint8 [n, row_bytes] -> int64 [n, m]."""
    n = packed.shape[0]
    p = packed.numpy() if packed.device.type == "cpu" else packed.cpu().numpy()
    bitarr = np.unpackbits(p, axis=1, bitorder="little")[:, : m * bits].reshape(n, m, bits)
    full = np.zeros((n, m, 64), dtype=np.uint8)
    full[:, :, :bits] = bitarr
    return torch.from_numpy(np.packbits(full, axis=2, bitorder="little").view("<i8").reshape(n, m).copy())


# --- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardArrays:
    """One shard's data in memory, in computation dtypes (T rows, D documents, k per row).

    index: the `DocIndex` of the shard.  input_ids: int64 [T].  topk_ids: int32 or int64 [T, k].
    topk_logits, nll: float32 [T, k] and [T].  token_bytes: int64 [T].  lse: float32 [T] or None.
    """

    index: DocIndex
    input_ids: Tensor
    topk_ids: Tensor
    topk_logits: Tensor
    nll: Tensor
    token_bytes: Tensor
    lse: Tensor | None


def encode_shard(arrays: ShardArrays, enc: StoreEncoding, num_ids: int, k: int) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The safetensors dict and header metadata of one shard."""
    idx = arrays.index
    t = idx.num_tokens
    if arrays.topk_ids.shape != (t, k) or arrays.topk_logits.shape != (t, k):
        raise ValueError(f"top-k arrays must be [{t}, {k}], got {tuple(arrays.topk_ids.shape)} and {tuple(arrays.topk_logits.shape)}")
    ids = torch.cat([arrays.input_ids.reshape(t, 1).to(torch.int64), arrays.topk_ids.to(torch.int64)], dim=1)
    bits = id_bits(num_ids)
    if enc.ids == "bitpack":
        ids_t = pack_ids(ids, bits)
    else:
        ids_t = ids.to(torch.int32)
    logits = arrays.topk_logits.float()
    if enc.logits == "float16":
        finite = logits[torch.isfinite(logits)]
        if finite.numel() and float(finite.abs().max()) > FP16_MAX:
            raise ValueError(
                f"a top-k logit reaches {float(finite.abs().max()):.4g}, beyond float16's range; "
                "rerun with --logit-dtype bfloat16 or --format lossless"
            )
    max_bytes = int(arrays.token_bytes.max()) if t else 0
    if max_bytes > 65535:
        raise ValueError(f"a token covers {max_bytes} bytes of text; the store holds at most 65535 per token")
    tensors: dict[str, Tensor] = {
        "doc_ids": idx.doc_ids.to(torch.int64).contiguous(),
        "doc_text_hash": idx.text_hash.to(torch.int64).contiguous(),
        "doc_flags": idx.flags.to(torch.uint8).contiguous(),
        "doc_offsets": idx.offsets.to(torch.int64).contiguous(),
        "doc_nll_sum": idx.nll_sum.to(torch.float64).contiguous(),
        "doc_predicted_bytes": idx.predicted_bytes.to(torch.int64).contiguous(),
        "ids": ids_t.contiguous(),
        "topk_logits": logits.to(_DTYPES[enc.logits]).contiguous(),
        "nll": arrays.nll.float().to(_DTYPES[enc.nll]).contiguous(),
        "token_bytes": arrays.token_bytes.to(torch.uint8 if max_bytes <= 255 else torch.uint16).contiguous(),
    }
    if enc.lse:
        if arrays.lse is None:
            raise ValueError("the encoding stores lse but the shard has none")
        tensors["lse"] = arrays.lse.float().contiguous()
    # one metadata key: safetensors writes its metadata map in hash order, which would make
    # two runs' shards differ byte-wise; one JSON string with sorted keys keeps them identical
    meta = {
        "fusellm": json.dumps(
            {"format": "fusellm-teacher-shard", "format_version": TEACHER_STORE_VERSION, "k": k,
             "id_bits": bits, "ids_encoding": enc.ids},
            sort_keys=True,
        )
    }
    return tensors, meta


def write_shard(path: str | os.PathLike[str], arrays: ShardArrays, enc: StoreEncoding, num_ids: int, k: int) -> tuple[str, int, dict[str, int]]:
    """Write one shard atomically; returns (sha256, file size, bytes per array)."""
    from safetensors.torch import save

    tensors, meta = encode_shard(arrays, enc, num_ids, k)
    data = save(tensors, metadata=meta)
    write_bytes_atomic(path, data)
    array_bytes = {name: int(x.numel() * x.element_size()) for name, x in tensors.items()}
    return sha256_bytes(data), len(data), array_bytes


def summarize_shards(shards: list[ShardInfo]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Total counts and honest bytes per token (every byte of every file / tokens)."""
    tokens = sum(s.tokens for s in shards)
    counts: dict[str, Any] = {"documents": sum(s.documents for s in shards), "tokens": tokens, "shards": len(shards)}
    for key in ("predicted_tokens", "text_bytes", "nonfinite_docs", "nonfinite_rows", "truncated_docs",
                "windowed_docs", "empty_docs", "dropped_tokens"):
        counts[key] = sum(int(s.extra.get(key, 0)) for s in shards)
    file_bytes = sum(s.size_bytes for s in shards)
    by_array: dict[str, int] = {}
    for s in shards:
        for name, b in s.extra.get("array_bytes", {}).items():
            by_array[name] = by_array.get(name, 0) + int(b)
    per = max(tokens, 1)
    bpt = {
        "files": file_bytes / per,
        "by_array": {name: b / per for name, b in sorted(by_array.items())},
        "total_bytes": file_bytes,
    }
    return counts, bpt


def write_teacher_manifest(
    root: str | os.PathLike[str], shards: list[ShardInfo], enc: StoreEncoding, k: int, num_ids: int, header: dict[str, Any]
) -> dict[str, Any]:
    """Write ``root/manifest.json`` for completed shards (atomically; it marks the store
    complete). header: stage-specific sections (model, tokenizer, corpus, settings, ...)."""
    counts, bpt = summarize_shards(shards)
    bits = id_bits(num_ids)
    manifest: dict[str, Any] = {
        **header,
        "format": TEACHER_STORE_FORMAT,
        "format_version": TEACHER_STORE_VERSION,
        "k": k,
        "num_ids": num_ids,
        "id_bits": bits,
        "encoding": enc.to_json(),
        "dtypes": {
            "ids": f"uint8 [T, {(bits * (k + 1) + 7) // 8}] ({k + 1} ids x {bits} bits)" if enc.ids == "bitpack" else f"int32 [T, {k + 1}]",
            "topk_logits": enc.logits,
            "nll": enc.nll,
            "token_bytes": "uint8 (uint16 in shards with a token over 255 bytes)",
            "lse": "float32" if enc.lse else None,
            "doc_ids": "int64",
            "doc_text_hash": "int64",
            "doc_flags": "uint8",
            "doc_offsets": "int64",
            "doc_nll_sum": "float64",
            "doc_predicted_bytes": "int64",
        },
        "counts": counts,
        "bytes_per_token": bpt,
        "shards": [s.to_json() for s in shards],
    }
    write_json_atomic(Path(root) / "manifest.json", manifest)
    return manifest


# --- reading ---------------------------------------------------------------------------------


def decode_record(array: Callable[[str], Any], idx: DocIndex, pos: int, enc: StoreEncoding, k: int, bits: int) -> TeacherRecord:
    """The record of the pos-th document of an encoded shard. `array(name)` gives the shard's
    array `name` as anything sliceable along rows (a safetensors slice of a memory-mapped
    file, or a tensor of a shard encoded in memory by the online path): one decoder, so a
    record read back from a store and one made live are alike to the bit."""
    a, b = int(idx.offsets[pos]), int(idx.offsets[pos + 1])
    ids = array("ids")[a:b]
    ids = unpack_ids(ids, k + 1, bits) if enc.ids == "bitpack" else ids.to(torch.int64)
    return TeacherRecord(
        doc_id=int(idx.doc_ids[pos]),
        text_hash=int(idx.text_hash[pos]),
        flags=int(idx.flags[pos]),
        input_ids=ids[:, 0].contiguous(),
        topk_ids=ids[:, 1:].contiguous(),
        topk_logits=array("topk_logits")[a:b].float(),
        nll=array("nll")[a:b].float(),
        token_bytes=array("token_bytes")[a:b].to(torch.int32),
        lse=array("lse")[a:b].float() if enc.lse else None,
        nll_sum=float(idx.nll_sum[pos]),
    )


class TeacherStore:
    """Read a complete teacher store; shards are memory-mapped and read one slice at a time.

    ``verify=True`` checks each shard's SHA-256 the first time it is opened (one sequential
    read of that shard); pass ``verify=False`` for random access that touches only the rows
    asked for (``verify()`` checks everything at once).
    """

    def __init__(self, path: str | os.PathLike[str], verify: bool = True) -> None:
        self.root = Path(path)
        if not self.root.exists():
            raise StoreError(f"the teacher store {self.root} does not exist; run `fusellm teacher` to make it, or check the path")
        mpath = self.root / "manifest.json"
        if not mpath.exists():
            hint = (" — settings.json is there, so the teacher pass has not finished; run the same command again to resume it"
                    if (self.root / "settings.json").exists() else "")
            raise StoreError(f"{self.root} is not a complete teacher store: {mpath.name} is missing{hint}")
        self.manifest: dict[str, Any] = read_json(mpath)
        fmt, ver = self.manifest.get("format"), self.manifest.get("format_version")
        if fmt != TEACHER_STORE_FORMAT:
            raise StoreError(f"{mpath} is a {fmt!r} manifest, not a {TEACHER_STORE_FORMAT!r}")
        if ver not in TEACHER_STORE_VERSIONS:
            raise StoreError(f"{mpath} has format_version {ver}; this library reads versions {TEACHER_STORE_VERSIONS}")
        self.format_version = int(ver)
        self.encoding = StoreEncoding.from_json(self.manifest["encoding"])
        self.k: int = int(self.manifest["k"])
        self.id_bits: int = int(self.manifest["id_bits"])
        self.shards = [ShardInfo.from_json(s) for s in self.manifest["shards"]]
        self._files = [inside(self.root, s.file, "shard") for s in self.shards]
        self._verify = verify
        self._verified: set[int] = set()
        self._handles: dict[int, Any] = {}
        self._indices: dict[int, DocIndex] = {}
        self._ordered: bool | None = None
        self._firsts: list[int] = []
        self._nonempty: list[int] = []

    # context management keeps the memory maps' lifetime explicit
    def __enter__(self) -> TeacherStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()

    @property
    def num_docs(self) -> int:
        return int(self.manifest["counts"]["documents"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["counts"]["tokens"])

    def __len__(self) -> int:
        return self.num_docs

    @property
    def tokenizer_fingerprint(self) -> str | None:
        """The fingerprint of the tokenizer that made the store (None in hand-made stores)."""
        return self.manifest.get("tokenizer", {}).get("fingerprint")

    def path_of(self, section: str) -> Path:
        """The path the manifest records for "model", "tokenizer" or "corpus"."""
        return recorded_path(self.manifest[section]["path"], self.root, self.format_version, relative_since=2)

    def verify(self) -> None:
        """Check every shard's checksum; raises `ChecksumError` naming the first bad file."""
        for i, s in enumerate(self.shards):
            verify_file(self._files[i], s.sha256, s.size_bytes, kind="teacher store")
            self._verified.add(i)

    def _open(self, i: int) -> Any:
        h = self._handles.get(i)
        if h is not None:
            return h
        from safetensors import safe_open

        info = self.shards[i]
        path = self._files[i]
        if self._verify and i not in self._verified:
            verify_file(path, info.sha256, info.size_bytes, kind="teacher store")
            self._verified.add(i)
        try:
            h = safe_open(str(path), framework="pt")
        except FileNotFoundError:
            raise StoreError(f"{path} is listed in the manifest but missing") from None
        except Exception as e:
            raise StoreError(f"{path} cannot be read as safetensors ({e}); the shard is corrupted") from None
        self._handles[i] = h
        return h

    def shard_index(self, i: int) -> DocIndex:
        """The `DocIndex` of shard i (reads only the small per-document arrays)."""
        idx = self._indices.get(i)
        if idx is None:
            f = self._open(i)
            idx = DocIndex(
                doc_ids=f.get_tensor("doc_ids"),
                text_hash=f.get_tensor("doc_text_hash"),
                flags=f.get_tensor("doc_flags"),
                offsets=f.get_tensor("doc_offsets"),
                nll_sum=f.get_tensor("doc_nll_sum"),
                predicted_bytes=f.get_tensor("doc_predicted_bytes"),
            )
            self._indices[i] = idx
        return idx

    def doc_ids(self) -> list[int]:
        """Every document id in store order."""
        return [int(d) for i in range(len(self.shards)) for d in self.shard_index(i).doc_ids.tolist()]

    def locate(self, doc_id: int) -> tuple[int, int]:
        """(shard, position in shard) of a document id; KeyError when absent. Opens only the
        shards whose recorded id range holds the id (one, found by bisection, when the
        shards' ranges are ordered and disjoint, as the teacher pass writes them)."""
        doc_id = int(doc_id)
        if self._ordered is None:
            self._nonempty = [i for i, s in enumerate(self.shards) if s.documents]
            ranges = [(self.shards[i].first_doc_id, self.shards[i].last_doc_id) for i in self._nonempty]
            self._ordered = all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))
            self._firsts = [r[0] for r in ranges]
        if self._ordered:
            j = bisect.bisect_right(self._firsts, doc_id) - 1
            candidates = [self._nonempty[j]] if j >= 0 else []
        else:
            candidates = self._nonempty
        for i in candidates:
            s = self.shards[i]
            if s.documents and s.first_doc_id <= doc_id <= s.last_doc_id:
                hits = (self.shard_index(i).doc_ids == doc_id).nonzero()
                if hits.numel():
                    return i, int(hits[0, 0])
        raise KeyError(f"document id {doc_id} is not in the teacher store {self.root}")

    def record(self, shard: int, pos: int) -> TeacherRecord:
        """The record of the pos-th document of a shard, reading only its rows."""
        f = self._open(shard)
        return decode_record(f.get_slice, self.shard_index(shard), pos, self.encoding, self.k, self.id_bits)

    def get(self, doc_id: int) -> TeacherRecord:
        return self.record(*self.locate(doc_id))

    def __iter__(self) -> Iterator[TeacherRecord]:
        for i in range(len(self.shards)):
            for pos in range(self.shard_index(i).num_docs):
                yield self.record(i, pos)
