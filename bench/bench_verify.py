"""What checking every input file's SHA-256 costs: the stages' lazy check and `fusellm verify`.

    python -m bench.bench_verify                      # 8 shards x 1M tokens (about 0.4 GB), seconds
    python -m bench.bench_verify --shards 32 --out /tmp/v

A compact teacher store (k = 10, V = 128 256: 47 bytes per token, as `fusellm teacher` writes
for a Llama-3-sized vocabulary) is built from one random shard written under several names
(interleaved repeats: hashing cost depends on bytes, not content). Measured, on this machine:

  sha256        throughput of `sha256_file` over the store's files (page cache warm, as a stage
                that reads a store it just verified sees it)
  read          every record of every shard read back with verify=False
  read+verify   the same with verify=True: each shard hashed once, before its first use
  fusellm verify the complete check (hash, arrays, offsets, id ranges)

and, from the measured throughput, the cost for the `llama2-7b` training preset (MiniPile,
1.8 B tokens; three 32k-vocabulary stores at 44 bytes per token and blocks at 60 bytes per
token with three candidates): what each rank hashes once per process.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fusellm_kernels.store.format import ShardArrays, StoreEncoding, TeacherStore, write_shard, write_teacher_manifest
from fusellm_kernels.store.manifest import ShardInfo, forget_verified, sha256_file
from fusellm_kernels.store.records import DocIndex
from fusellm_kernels.store.verify import verify_path

V, K = 128_256, 10
LLAMA2_PRESET = {"tokens": 1.8e9, "stores": 3, "store_bytes_per_token": 44, "blocks_bytes_per_token": 60}


def build_store(root: Path, shards: int, tokens: int, doc_len: int = 1000) -> Path:
    g = torch.Generator().manual_seed(0)
    n_docs = tokens // doc_len
    offsets = torch.arange(n_docs + 1, dtype=torch.int64) * doc_len
    index = DocIndex(doc_ids=torch.arange(n_docs), text_hash=torch.arange(n_docs), flags=torch.zeros(n_docs, dtype=torch.uint8),
                     offsets=offsets, nll_sum=torch.zeros(n_docs, dtype=torch.float64),
                     predicted_bytes=torch.full((n_docs,), 4 * (doc_len - 1)))
    arrays = ShardArrays(index=index, input_ids=torch.randint(0, V, (tokens,), generator=g),
                         topk_ids=torch.randint(0, V, (tokens, K), generator=g),
                         topk_logits=torch.randn(tokens, K, generator=g).sort(dim=1, descending=True).values,
                         nll=torch.rand(tokens, generator=g), token_bytes=torch.full((tokens,), 4), lse=None)
    (root / "shards").mkdir(parents=True)
    enc = StoreEncoding.compact()
    first = root / "shards/shard-00000.safetensors"
    sha, size, array_bytes = write_shard(first, arrays, enc, V, K)
    infos = []
    for i in range(shards):
        rel = f"shards/shard-{i:05d}.safetensors"
        if i:
            shutil.copyfile(first, root / rel)
        # every shard holds the same document ids: the bench reads by shard, never by id
        infos.append(ShardInfo(i, rel, sha, size, n_docs, tokens, 0, n_docs - 1, {"array_bytes": array_bytes}))
    write_teacher_manifest(root, infos, enc, K, V, {"model": {"path": "synthetic"}, "corpus": {"fingerprint": "synthetic"}})
    return root


def _read_all(root: Path, verify: bool) -> float:
    forget_verified()
    t0 = time.perf_counter()
    with TeacherStore(root, verify=verify) as st:
        for i in range(len(st.shards)):
            for pos in range(st.shard_index(i).num_docs):
                st.record(i, pos)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens per shard")
    p.add_argument("--out", default=None, help="append the results as one JSON line to OUT/verify.jsonl")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = build_store(Path(tmp) / "store", a.shards, a.tokens)
        files = sorted((root / "shards").glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        for f in files:  # warm the page cache, as the other measurements see it
            f.read_bytes()
        t0 = time.perf_counter()
        for f in files:
            sha256_file(f)
        t_hash = time.perf_counter() - t0
        t_read = min(_read_all(root, False) for _ in range(2))
        t_read_verify = min(_read_all(root, True) for _ in range(2))
        t0 = time.perf_counter()
        report = verify_path(root)
        t_full = time.perf_counter() - t0
        assert report.ok, report.format()
    gbps = total / t_hash / 1e9
    preset = LLAMA2_PRESET
    per_rank = preset["tokens"] * (preset["stores"] * preset["store_bytes_per_token"] + preset["blocks_bytes_per_token"])
    result = {
        "store_bytes": total, "tokens": a.shards * a.tokens, "bytes_per_token": total / (a.shards * a.tokens),
        "sha256_gb_per_s": round(gbps, 3), "read_s": round(t_read, 3), "read_verify_s": round(t_read_verify, 3),
        "lazy_verify_overhead": round(t_read_verify / t_read - 1, 3), "fusellm_verify_s": round(t_full, 3),
        "llama2_7b_bytes_hashed_per_rank": per_rank, "llama2_7b_hash_s_per_rank": round(per_rank / 1e9 / gbps, 1),
    }
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        with open(Path(a.out) / "verify.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
