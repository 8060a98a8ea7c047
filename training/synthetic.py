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
from fusellm_kernels.store.manifest import ShardInfo, record_path, sha256_file
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
    # distinct ids per row without a [T, V] draw: a random start plus k steps that sum below V
    steps = torch.randint(1, max(2, vocab // k), (t, k), generator=g)
    topk_ids = ((torch.randint(0, vocab, (t, 1), generator=g) + steps.cumsum(1)) % vocab).int()
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
    blocks = root / "blocks"  # the manifest records paths relative to itself, as `fusellm assemble` does
    candidates = [{"name": "target", "store": record_path(root / "stores/target", blocks)}]
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
        candidates.append({"name": f"source{s}", "store": record_path(root / f"stores/source{s}", blocks),
                           "vocab_map": record_path(root / f"maps/source{s}.pt", blocks),
                           "vocab_map_sha256": sha256_file(root / f"maps/source{s}.pt")})
        source_lengths.append(lens)
    doc_ce = torch.tensor([[float(x[:-1].mean()) if len(x) > 1 else 0.0 for x in per_doc] for per_doc in nll])  # [S, D]
    return _write_blocks(blocks, spec, target_docs, source_lengths, nll, doc_ce, candidates, g)


def _write_blocks(out: Path, spec: SyntheticSpec, docs: list[torch.Tensor], source_lengths: list[list[int]],
                  nll: list[list[torch.Tensor]], doc_ce: torch.Tensor, candidates: list[dict], g: torch.Generator) -> Path:
    s_count, length = len(candidates), spec.block_len
    lengths = torch.tensor([len(x) for x in docs])
    doc = torch.repeat_interleave(torch.arange(len(docs)), lengths)            # each row's document
    t = torch.cat([torch.arange(n) for n in lengths.tolist()])                 # and its row in the document
    n_rows = int(lengths.sum())
    n_blocks = -(-n_rows // length)
    pad = n_blocks * length - n_rows
    tokens = torch.cat(docs)
    nexts = torch.cat([torch.cat([x[1:], torch.tensor([-100])]) for x in docs])  # −100 at a document's last row

    def blockify(x: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.cat([x, torch.full((pad,), fill, dtype=x.dtype)]).reshape(n_blocks, length)

    doc_b = blockify(doc, -1)
    starts = torch.ones_like(doc_b, dtype=torch.bool)
    starts[:, 1:] = doc_b[:, 1:] != doc_b[:, :-1]
    piece = torch.cumsum(starts.int(), dim=1) - 1                               # piece index within the block
    real = doc_b >= 0
    doc_index = torch.where(real, piece, -1).int()
    first = starts & real
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), first.sum(1).cumsum(0)])
    doc_ids = doc_b[first].long()
    first_rows = blockify(t, -1)[first].int()

    source_pos = torch.full((s_count, n_blocks, length), -1, dtype=torch.int32)
    fallback = torch.full((s_count, n_blocks, length), -1, dtype=torch.int32)
    tce = torch.full((s_count, n_blocks, length), float("nan"))
    labels = blockify(nexts, -100).int()
    source_pos[0] = blockify(t, -1).int()
    tce[0] = blockify(torch.cat(nll[0]), float("nan"))
    for s in range(1, s_count):
        n_src = torch.tensor(source_lengths[s - 1])[doc]
        j = torch.minimum(n_src - 1, torch.round(t * (n_src - 1) / (lengths[doc] - 1).clamp_min(1)).long())
        unaligned = torch.rand(n_rows, generator=g) < 0.15                     # these take the one-hot on the next token
        src_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(source_lengths[s - 1]).cumsum(0)])
        src_nll = torch.cat(nll[s])[src_offsets[doc] + j]
        source_pos[s] = blockify(torch.where(unaligned, -1, j), -1).int()
        fallback[s] = blockify(torch.where(unaligned, nexts.clamp_min(-1), -1), -1).int()
        tce[s] = blockify(torch.where(unaligned, float("nan"), src_nll), float("nan"))
    dce = torch.stack([blockify(doc_ce[s][doc], 0.0) for s in range(s_count)])
    block_ce = (dce * real).sum(-1) / real.sum(-1).clamp_min(1)
    shard = BlockShard(
        input_ids=blockify(tokens, 0).int(), labels=labels, doc_index=doc_index, block_doc_offsets=offsets,
        doc_ids=doc_ids, doc_first_row=first_rows, source_pos=source_pos, fallback_id=fallback, doc_ce=dce,
        token_ce=tce, block_ce=block_ce,
    )
    (out / "shards").mkdir(parents=True, exist_ok=True)
    sha, size = write_block_shard(out / "shards/blocks-00000.safetensors", shard)
    info = ShardInfo(index=0, file="shards/blocks-00000.safetensors", sha256=sha, size_bytes=size, documents=len(doc_ids),
                     tokens=int(real.sum()), first_doc_id=0, last_doc_id=len(docs) - 1, extra={"blocks": n_blocks})
    write_blocks_manifest(out, [info], block_len=length, candidates=candidates, header={"synthetic": True, "target_vocab": spec.vocab})
    return out
