"""`fusellm assemble --score reference --labels shifted-block` against a float64
re-implementation of the original FuseLLM's packing and collator (`src/utils/packing.py`,
`data_collator.py`, the HF causal-LM label shift), on small synthetic stores whose documents
cross document and block boundaries: documents of different lengths, one longer than a block,
two of one token, one ending exactly at a block's end and a final partial block."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fusellm_kernels.cli import main as cli_main
from fusellm_kernels.functional import candidate_row_weights
from fusellm_kernels.pipeline.assemble import AssembleConfig, run_assemble
from fusellm_kernels.pipeline.batches import build_batch
from fusellm_kernels.store import StoreError, TeacherStore
from fusellm_kernels.store.alignment import DocAlignment, write_alignment_manifest, write_alignment_shard
from fusellm_kernels.store.blocks import BlockStore
from fusellm_kernels.store.format import ShardArrays, StoreEncoding, write_shard, write_teacher_manifest
from fusellm_kernels.store.manifest import ShardInfo, sha256_file
from fusellm_kernels.store.records import DocIndex

BLOCK = 8
# rows 0-4 | 5 (one token) | 6-18 (longer than a block, crosses two block ends) | 19-21 |
# 22-23 (ends with block 2) | 24 (one token, first of block 3) | 25-31 (ends with block 3) |
# 32-35 (the final partial block: 4 real rows, 4 padding)
TARGET_LENGTHS = [5, 1, 13, 3, 2, 1, 7, 4]
SOURCE_LENGTHS = [6, 1, 11, 3, 3, 1, 8, 4]  # a different tokenizer: other lengths, same texts
V_TARGET, V_SOURCE, K = 50, 40, 3


def _write_store(root: Path, lengths: list[int], vocab: int, g: torch.Generator) -> None:
    t = sum(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(lengths).cumsum(0)])
    nll = torch.rand(t, generator=g) * 5 + 0.25
    nll[offsets[1:] - 1] = 0.0  # a document's last row predicts nothing
    token_bytes = torch.randint(1, 5, (t,), generator=g)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    index = DocIndex(
        doc_ids=torch.arange(len(lengths), dtype=torch.int64),
        text_hash=torch.arange(len(lengths), dtype=torch.int64) * 7919 + 1,  # same texts in every store
        flags=torch.zeros(len(lengths), dtype=torch.uint8), offsets=offsets,
        nll_sum=torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, doc, nll.double()),
        predicted_bytes=torch.tensor([int(token_bytes[a + 1:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])]),
    )
    ids = torch.stack([torch.randperm(vocab, generator=g)[:K] for _ in range(t)])
    arrays = ShardArrays(index=index, input_ids=torch.randint(3, vocab, (t,), generator=g), topk_ids=ids,
                         topk_logits=(torch.randn(t, K, generator=g) * 3).sort(dim=1, descending=True).values,
                         nll=nll, token_bytes=token_bytes, lse=None)
    (root / "shards").mkdir(parents=True)
    enc = StoreEncoding.lossless()
    sha, size, array_bytes = write_shard(root / "shards/shard-00000.safetensors", arrays, enc, vocab, K)
    info = ShardInfo(0, "shards/shard-00000.safetensors", sha, size, len(lengths), t, 0, len(lengths) - 1,
                     {"array_bytes": array_bytes})
    write_teacher_manifest(root, [info], enc, K, vocab, {
        "model": {"path": root.name, "logits_size": vocab}, "corpus": {"fingerprint": "synthetic"},
        "settings_hash": f"{root.name}-settings"})


def _write_alignment(root: Path, g: torch.Generator) -> None:
    """A monotone stretch of target rows onto source rows, a few rows unaligned (next-token fallback)."""
    docs = []
    for d, (n, m) in enumerate(zip(TARGET_LENGTHS, SOURCE_LENGTHS)):
        t = torch.arange(n)
        pos = torch.round(t * (m - 1) / max(n - 1, 1)).long()
        pos[torch.rand(n, generator=g) < 0.25] = -1
        docs.append(DocAlignment(d, pos.int(), torch.where(pos < 0, torch.randint(3, V_TARGET, (n,), generator=g), -1).int()))
    (root / "shards").mkdir(parents=True)
    sha, size = write_alignment_shard(root / "shards/align-00000.safetensors", docs)
    info = ShardInfo(0, "shards/align-00000.safetensors", sha, size, len(docs), sum(TARGET_LENGTHS), 0, len(docs) - 1,
                     {"aligned_rows": sum(d.aligned for d in docs)})
    torch.save(torch.randint(-1, V_TARGET, (V_SOURCE,), generator=g, dtype=torch.int32), root / "vocab_map.pt")
    write_alignment_manifest(root, [info], {
        "target": {"path": str(root.parent / "target"), "corpus_fingerprint": "synthetic", "settings_hash": "target-settings"},
        "source": {"path": str(root.parent / "source"), "corpus_fingerprint": "synthetic", "settings_hash": "source-settings"},
        "vocab_map": "vocab_map.pt", "vocab_map_sha256": sha256_file(root / "vocab_map.pt"),
        "settings": {"reference": True}, "settings_hash": "align-settings"})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reference-mode")
    g = torch.Generator().manual_seed(3)
    _write_store(d / "target", TARGET_LENGTHS, V_TARGET, g)
    _write_store(d / "source", SOURCE_LENGTHS, V_SOURCE, g)
    _write_alignment(d / "align", g)
    return d


def _assemble(inputs: Path, out: Path, **kw) -> BlockStore:
    run_assemble(AssembleConfig(target=str(inputs / "target"), sources=(str(inputs / "align"),), output=str(out),
                                block_len=BLOCK, blocks_per_shard=2, progress=False, **kw))
    return BlockStore(out)


def _originals_blocks(inputs: Path) -> tuple[list[list[int]], list[list[float]]]:
    """The original, in float64: every document's score repeated once per target token,
    documents concatenated in corpus order and cut every BLOCK rows (the last block keeps its
    remainder; the collator pads it later), labels = the block's inputs shifted by one with
    −100 on its last row and on padding, block score = sum(x) / len(x) over the block's rows.

    Scores: the per-own-token mean, computed here from the stored per-row NLL. A score
    that is undefined (a one-token document predicts nothing) trips the original's NaN
    assertion; the library leaves those rows out of the mean, and so does this."""
    stores = [TeacherStore(inputs / "target"), TeacherStore(inputs / "source")]
    tokens, per_row = [], [[] for _ in stores]
    for d in range(len(TARGET_LENGTHS)):
        trec = stores[0].get(d)
        tokens += trec.input_ids.tolist()
        for s, st in enumerate(stores):
            rec = st.get(d)
            n = rec.num_tokens
            score = math.fsum(rec.nll[:n - 1].double().tolist()) / (n - 1) if n > 1 else math.nan
            per_row[s] += [score] * trec.num_tokens
    labels, block_ce = [], []
    for a in range(0, len(tokens), BLOCK):
        chunk = tokens[a:a + BLOCK]
        labels.append(chunk[1:] + [-100] * (BLOCK - len(chunk) + 1))
        rows = [[x for x in per_row[s][a:a + BLOCK] if not math.isnan(x)] for s in range(len(stores))]
        block_ce.append([sum(x) / len(x) for x in rows])
    return labels, block_ce


def _within_one_ulp(stored: torch.Tensor, exact: float) -> bool:
    """stored (float32) is the float64 value rounded to float32, or one float32 ulp off."""
    want = torch.tensor(exact, dtype=torch.float64).float()
    near = {float(want), *(float(torch.nextafter(want, torch.tensor(x))) for x in (math.inf, -math.inf))}
    return stored.dtype == torch.float32 and float(stored) in near


def test_reference_blocks_are_the_originals(inputs, tmp_path):
    bs = _assemble(inputs, tmp_path / "blocks", score="reference", labels="shifted-block")
    labels, block_ce = _originals_blocks(inputs)
    assert len(bs) == len(labels) == 5 and int((bs[4].doc_index >= 0).sum()) == 4
    assert bs.manifest["settings"]["labels"] == "shifted-block" and bs.manifest["labels"] == "shifted-block"
    for b in range(len(bs)):
        blk = bs[b]
        assert blk.labels.tolist() == labels[b], b
        for s in range(2):
            assert _within_one_ulp(blk.block_ce[s], block_ce[b][s]), (b, s, float(blk.block_ce[s]), block_ce[b][s])


def test_reference_block_score_weights_every_row(inputs, tmp_path):
    """The block score does not depend on the labels: with the default labels it is the same."""
    bs = _assemble(inputs, tmp_path / "blocks", score="reference")
    _, block_ce = _originals_blocks(inputs)
    for b in range(len(bs)):
        for s in range(2):
            assert _within_one_ulp(bs[b].block_ce[s], block_ce[b][s]), (b, s)


def test_default_labels_stay_within_the_document(inputs, tmp_path):
    bs = _assemble(inputs, tmp_path / "blocks")
    target = TeacherStore(inputs / "target")
    assert bs.manifest["settings"]["labels"] == "document"
    for b in range(len(bs)):
        blk = bs[b]
        assert bool((blk.labels[blk.doc_index < 0] == -100).all())
        for p, (doc_id, first) in enumerate(zip(blk.doc_ids.tolist(), blk.doc_first_row.tolist())):
            rows = (blk.doc_index == p).nonzero()[:, 0]
            ids = target.get(doc_id).input_ids.tolist() + [-100]
            assert blk.labels[rows].tolist() == ids[first + 1:first + 1 + rows.numel()]


def test_shifted_labels_reach_the_loss_unchanged(inputs, tmp_path):
    """build_batch passes the labels through; with block weighting every labelled block takes
    one MinCE decision from its block_ce (the segment mean over labelled rows of a constant);
    token_ce is NaN where the aligned source row is the source record's last (it predicts nothing)."""
    bs = _assemble(inputs, tmp_path / "blocks", score="reference", labels="shifted-block")
    stores = [TeacherStore(inputs / "target"), TeacherStore(inputs / "source")]
    blocks = [bs[i] for i in range(len(bs))]
    batch = build_batch(blocks, stores, [None, torch.load(inputs / "align" / "vocab_map.pt", weights_only=True)], weighting="block")
    assert torch.equal(batch.labels, torch.stack([blk.labels for blk in blocks]).long())
    w = candidate_row_weights(batch.teacher_ce, batch.labels.reshape(-1), batch.segment_ids, None, strategy="min_ce",
                              ce_temperature=1.0, ignore_index=-100, use_triton=False).reshape(2, len(blocks), BLOCK)
    for b, blk in enumerate(blocks):
        winner = int(torch.argmin(blk.block_ce))
        assert bool((w[winner, b] == 1).all()) and bool((w[1 - winner, b] == 0).all())
    src = stores[1]
    for blk in blocks:
        for p, doc_id in enumerate(blk.doc_ids.tolist()):
            rows = blk.doc_index == p
            last = blk.source_pos[1][rows] == src.get(doc_id).num_tokens - 1
            assert bool(torch.isnan(blk.token_ce[1][rows][last]).all())
            assert bool(torch.isfinite(blk.token_ce[1][rows][(blk.source_pos[1][rows] >= 0) & ~last]).all())


def test_resume_with_other_labels_is_refused_naming_the_flag(inputs, tmp_path, capsys):
    args = ["assemble", "--target", str(inputs / "target"), "--alignments", str(inputs / "align"),
            "--output", str(tmp_path / "bl"), "--block-len", str(BLOCK), "--score", "reference", "--no-progress"]
    assert cli_main(args + ["--labels", "shifted-block"]) == 0
    assert BlockStore(tmp_path / "bl").manifest["settings"]["labels"] == "shifted-block"
    (tmp_path / "bl" / "manifest.json").unlink()  # an interrupted run, resumed with another value
    with pytest.raises(StoreError, match="--labels"):
        run_assemble(AssembleConfig(target=str(inputs / "target"), sources=(str(inputs / "align"),),
                                    output=str(tmp_path / "bl"), block_len=BLOCK, score="reference", progress=False))
    assert cli_main(args) == 2 and "--labels" in capsys.readouterr().err
    assert cli_main(args + ["--labels", "shifted-block"]) == 0  # the same value resumes
    with pytest.raises(StoreError, match="--labels"):
        AssembleConfig(target="t", sources=(), output="o", labels="shifted")
