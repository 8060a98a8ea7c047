"""Random but well-formed teacher stores and assembled blocks, for tests and benchmarks.

The trainer's inputs come from three earlier stages (teacher pass, alignment, assembly); the
trainer's tests and its benchmark must not depend on running them. `write_synthetic_run`
writes, with the library's own writers, what those stages would: one teacher store per
candidate (candidate 0 = the target model, in the target vocabulary; the sources in their own
vocabularies with a vocab map each), and blocks of `block_len` rows packing the documents
end to end, a document that does not fit continuing in the next block. Source rows align
to target rows by a monotone stretch with a few unaligned rows (which take the one-hot
fallback on the next token), as token alignment produces them. Everything is a function of
`seed`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fusellm_kernels.store.blocks import BlockShard, write_block_shard, write_blocks_manifest
from fusellm_kernels.store.format import ShardArrays, StoreEncoding, write_shard, write_teacher_manifest
from fusellm_kernels.store.manifest import ShardInfo
from fusellm_kernels.store.records import DocIndex


@dataclass(frozen=True)
class SyntheticSpec:
    vocab: int = 100              # target vocabulary (the model's)
    source_vocabs: tuple[int, ...] = (120, 90)
    num_docs: int = 24
    min_len: int = 8
    max_len: int = 80
    block_len: int = 64
    k: int = 4
    seed: int = 0


def _store(root: Path, docs: list[torch.Tensor], vocab: int, k: int, g: torch.Generator) -> list[torch.Tensor]:
    """Write one candidate's store; returns each document's per-row NLL (for the CE scores)."""
    lengths = torch.tensor([len(d) for d in docs])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    t = int(offsets[-1])
    scores = torch.rand(t, vocab, generator=g)
    topk_ids = scores.topk(k, dim=1).indices.int()  # distinct ids per row
    topk_logits = (torch.randn(t, k, generator=g) * 3).sort(dim=1, descending=True).values
    nll = torch.rand(t, generator=g) * 4 + 0.5
    nll[offsets[1:] - 1] = 0.0  # a document's last row predicts nothing
    nll_per_doc = list(nll.split(lengths.tolist()))
    index = DocIndex(
        doc_ids=torch.arange(len(docs), dtype=torch.int64), text_hash=torch.arange(len(docs), dtype=torch.int64) * 7919,
        flags=torch.zeros(len(docs), dtype=torch.uint8), offsets=offsets,
        nll_sum=torch.stack([x.double().sum() for x in nll_per_doc]), predicted_bytes=lengths - 1,
    )
    arrays = ShardArrays(index=index, input_ids=torch.cat(docs).long(), topk_ids=topk_ids, topk_logits=topk_logits,
                         nll=nll, token_bytes=torch.ones(t, dtype=torch.int64), lse=None)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    enc = StoreEncoding.lossless()
    sha, size, array_bytes = write_shard(root / "shards/shard-00000.safetensors", arrays, enc, vocab, k)
    info = ShardInfo(index=0, file="shards/shard-00000.safetensors", sha256=sha, size_bytes=size, documents=len(docs),
                     tokens=t, first_doc_id=0, last_doc_id=len(docs) - 1, extra={"array_bytes": array_bytes})
    write_teacher_manifest(root, [info], enc, k, vocab, {"model": {"name": root.name}, "synthetic": True})
    return nll_per_doc


def write_synthetic_run(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write stores under root/stores/, vocab maps under root/maps/ and blocks under root/blocks/;
    returns the blocks directory."""
    root = Path(root)
    g = torch.Generator().manual_seed(spec.seed)
    lengths = torch.randint(spec.min_len, spec.max_len + 1, (spec.num_docs,), generator=g).tolist()
    target_docs = [torch.randint(3, spec.vocab, (n,), generator=g) for n in lengths]
    candidates = [{"name": "target", "store": str(root / "stores/target")}]
    nll = [_store(root / "stores/target", target_docs, spec.vocab, spec.k, g)]
    source_lengths: list[list[int]] = []
    for s, v in enumerate(spec.source_vocabs, start=1):
        # a source tokenises the same text into a few more or fewer tokens
        lens = [max(2, n + int(torch.randint(-3, 4, (1,), generator=g))) for n in lengths]
        docs = [torch.randint(3, v, (n,), generator=g) for n in lens]
        nll.append(_store(root / f"stores/source{s}", docs, v, spec.k, g))
        vocab_map = torch.randint(0, spec.vocab, (v,), generator=g, dtype=torch.int32)
        vocab_map[torch.rand(v, generator=g) < 0.1] = -1  # source tokens without a target counterpart
        (root / "maps").mkdir(parents=True, exist_ok=True)
        torch.save(vocab_map, root / f"maps/source{s}.pt")
        candidates.append({"name": f"source{s}", "store": str(root / f"stores/source{s}"), "vocab_map": str(root / f"maps/source{s}.pt")})
        source_lengths.append(lens)
    doc_ce = torch.tensor([[float(x[:-1].mean()) if len(x) > 1 else 0.0 for x in per_doc] for per_doc in nll])  # [S, D]
    return _write_blocks(root / "blocks", spec, target_docs, source_lengths, nll, doc_ce, candidates, g)


def _write_blocks(out: Path, spec: SyntheticSpec, docs: list[torch.Tensor], source_lengths: list[list[int]],
                  nll: list[list[torch.Tensor]], doc_ce: torch.Tensor, candidates: list[dict], g: torch.Generator) -> Path:
    s_count, length = len(candidates), spec.block_len
    rows: list[tuple[int, int]] = [(d, t) for d, doc in enumerate(docs) for t in range(len(doc))]  # (document, row)
    n_blocks = -(-len(rows) // length)
    shape = (n_blocks, length)
    input_ids = torch.zeros(shape, dtype=torch.int32)
    labels = torch.full(shape, -100, dtype=torch.int32)
    doc_index = torch.full(shape, -1, dtype=torch.int32)
    source_pos = torch.full((s_count, *shape), -1, dtype=torch.int32)
    fallback = torch.full((s_count, *shape), -1, dtype=torch.int32)
    dce = torch.zeros((s_count, *shape))
    tce = torch.full((s_count, *shape), float("nan"))
    offsets, doc_ids, first_rows = [0], [], []
    for b in range(n_blocks):
        pieces: list[int] = []
        for r, (d, t) in enumerate(rows[b * length:(b + 1) * length]):
            if not pieces or pieces[-1] != d:
                pieces.append(d)
                doc_ids.append(d)
                first_rows.append(t)
            input_ids[b, r] = docs[d][t]
            if t + 1 < len(docs[d]):
                labels[b, r] = docs[d][t + 1]
            doc_index[b, r] = len(pieces) - 1
            source_pos[0, b, r] = t
            dce[:, b, r] = doc_ce[:, d]
            tce[0, b, r] = nll[0][d][t]
            for s in range(1, s_count):
                n_src = source_lengths[s - 1][d]
                j = min(n_src - 1, round(t * (n_src - 1) / max(len(docs[d]) - 1, 1)))
                if float(torch.rand(1, generator=g)) < 0.15:  # unaligned row: one-hot on the next token
                    fallback[s, b, r] = labels[b, r] if labels[b, r] >= 0 else -1
                else:
                    source_pos[s, b, r] = j
                    tce[s, b, r] = nll[s][d][j]
        offsets.append(len(doc_ids))
    real = (doc_index >= 0).float()
    block_ce = (dce * real).sum(-1) / real.sum(-1).clamp_min(1)
    shard = BlockShard(
        input_ids=input_ids, labels=labels, doc_index=doc_index, block_doc_offsets=torch.tensor(offsets),
        doc_ids=torch.tensor(doc_ids, dtype=torch.int64), doc_first_row=torch.tensor(first_rows, dtype=torch.int32),
        source_pos=source_pos, fallback_id=fallback, doc_ce=dce, token_ce=tce, block_ce=block_ce,
    )
    (out / "shards").mkdir(parents=True, exist_ok=True)
    sha, size = write_block_shard(out / "shards/blocks-00000.safetensors", shard)
    info = ShardInfo(index=0, file="shards/blocks-00000.safetensors", sha256=sha, size_bytes=size, documents=len(doc_ids),
                     tokens=int(real.sum()), first_doc_id=0, last_doc_id=len(docs) - 1, extra={"blocks": n_blocks})
    write_blocks_manifest(out, [info], block_len=length, candidates=candidates, header={"synthetic": True, "target_vocab": spec.vocab})
    return out
