"""`fusellm align` and `fusellm assemble` end to end on tiny models with different tokenizers,
then the training batch built from the blocks, checked against the original's algorithms."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from fusellm_kernels import fusion_loss
from fusellm_kernels.cli import main as cli_main
from fusellm_kernels.pipeline.align_job import AlignConfig, run_align
from fusellm_kernels.pipeline.assemble import AssembleConfig, plan_blocks, run_assemble
from fusellm_kernels.pipeline.batches import build_batch
from fusellm_kernels.pipeline.corpus import load_tokenizer
from fusellm_kernels.pipeline.scores import record_score
from fusellm_kernels.pipeline.teacher_pass import TeacherConfig, run_teacher_pass
from fusellm_kernels.reference.alignment import transform_step_logits
from fusellm_kernels.store import StoreError, TeacherStore
from fusellm_kernels.store.alignment import AlignmentStore
from fusellm_kernels.store.blocks import BlockStore
from tests.fixtures_models import (  # noqa: F401 (fixtures)
    corpus_texts,
    models_dir,
    tiny_corpus,
    tiny_gpt2,
    tiny_llama,
    tok_bytelevel,
    tok_metaspace,
    write_jsonl,
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_corpus, tiny_llama, tiny_gpt2):
    """Teacher stores of the target (Llama, byte-level BPE) and a source (GPT-2, Metaspace)."""
    d = tmp_path_factory.mktemp("pipeline")
    kw = dict(corpus=str(tiny_corpus), progress=False, docs_per_shard=10, top_k=6)
    run_teacher_pass(TeacherConfig(model=str(tiny_llama), output=str(d / "target"), **kw))
    run_teacher_pass(TeacherConfig(model=str(tiny_gpt2), output=str(d / "source"), **kw))
    return d


@pytest.fixture(scope="module")
def aligned(stores):
    """Two alignments of the same source: soft/next (the default) and hard/current (the original's)."""
    out = {}
    for name, kw in {"soft": {}, "hard": dict(vocab_align="hard", fallback="current")}.items():
        run_align(AlignConfig(target=str(stores / "target"), source=str(stores / "source"),
                              output=str(stores / f"align-{name}"), progress=False, **kw))
        out[name] = stores / f"align-{name}"
    return out


@pytest.fixture(scope="module")
def blocks(stores, aligned) -> Path:
    """The default blocks (soft alignment, block_len 48); tests that read them need not run
    after the test that checks their assembly."""
    out = stores / "blocks"
    run_assemble(AssembleConfig(target=str(stores / "target"), sources=(str(aligned["soft"]),), output=str(out),
                                block_len=48, blocks_per_shard=3, progress=False))
    return out


def _row_teacher(ids, logits):
    """What the loss sees of one row: the first slot of each valid id, in order."""
    seen = {}
    for i, x in zip(ids.tolist(), logits.tolist()):
        if i >= 0 and i not in seen:
            seen[i] = x
    return list(seen), list(seen.values())


def test_alignment_manifest_and_maps(stores, aligned):
    al = AlignmentStore(aligned["soft"])
    target = TeacherStore(stores / "target")
    m = al.manifest
    assert m["target"]["conventions"]["marker"] == "Ġ" and m["source"]["conventions"]["marker"] == "▁"
    assert 0.1 < m["counts"]["aligned_fraction"] <= 1.0  # tiny, differently trained tokenizers
    assert sorted(al.doc_ids()) == sorted(target.doc_ids())
    vmap = torch.load(aligned["soft"] / m["vocab_map"], weights_only=True)
    assert vmap.dtype == torch.int32 and vmap.numel() == TeacherStore(stores / "source").manifest["model"]["logits_size"]
    for doc_id in target.doc_ids()[:6]:
        rec, amap = target.get(doc_id), al.get(doc_id)
        assert amap.source_pos.numel() == rec.num_tokens
        unaligned = amap.source_pos < 0
        # `next` fallback: the token the row predicts; none on the last row
        expected = torch.cat([rec.input_ids[1:], torch.tensor([-1])]).to(torch.int32)
        assert torch.equal(amap.fallback_id[unaligned], expected[unaligned])


def test_batches_reproduce_transform_step_logits(stores, aligned):
    """hard + current fallback = the original: per target row, the teacher the loss sees from
    the gathered batch equals the seed's transform_step_logits on the same records."""
    blocks_dir = stores / "blocks-hard"
    run_assemble(AssembleConfig(target=str(stores / "target"), sources=(str(aligned["hard"]),), output=str(blocks_dir),
                                block_len=64, score="reference", progress=False))
    bs = BlockStore(blocks_dir)
    target, source = TeacherStore(stores / "target"), TeacherStore(stores / "source")
    ttok = load_tokenizer(str(target.path_of("tokenizer")))
    stok = load_tokenizer(str(source.path_of("tokenizer")))
    vmap = torch.load(aligned["hard"] / "vocab_map.pt", weights_only=True)
    blocks = [bs[i] for i in range(min(len(bs), 4))]
    batch = build_batch(blocks, [target, source], [None, vmap], weighting="document")
    checked = 0
    for b, blk in enumerate(blocks):
        for p, (doc_id, first) in enumerate(zip(blk.doc_ids.tolist(), blk.doc_first_row.tolist())):
            trec, srec = target.get(doc_id), source.get(doc_id)
            ref_logits, ref_ids = transform_step_logits(
                ttok.convert_ids_to_tokens(trec.input_ids.tolist()), stok.convert_ids_to_tokens(srec.input_ids.tolist()),
                ttok.get_vocab(), srec.topk_logits.tolist(), srec.topk_ids.tolist(), stok.convert_ids_to_tokens,
                blending_marker="▁", base_marker="Ġ", vocab_align_type="hard",
            )
            rows = (blk.doc_index == p).nonzero()[:, 0]
            for r in rows.tolist():
                t = first + r - int(rows[0])
                n = b * 64 + r
                ids, logits = _row_teacher(batch.teacher_ids[1, n], batch.teacher_logits[1, n])
                assert ids == ref_ids[t], (doc_id, t)
                assert logits == pytest.approx(ref_logits[t], abs=2e-3)  # fp16-stored logits
                # candidate 0 is the target's own top-k at its own row
                own = _row_teacher(batch.teacher_ids[0, n], batch.teacher_logits[0, n])[0]
                assert own == list(dict.fromkeys(trec.topk_ids[t].tolist()))
                checked += 1
    assert checked > 50


def test_blocks_and_scores(stores, aligned):
    out = stores / "blocks"
    summary = run_assemble(AssembleConfig(target=str(stores / "target"), sources=(str(aligned["soft"]),), output=str(out),
                                          block_len=48, blocks_per_shard=3, progress=False))
    bs = BlockStore(out)
    target, source = TeacherStore(stores / "target"), TeacherStore(stores / "source")
    lengths = {d: target.get(d).num_tokens for d in target.doc_ids()}
    assert summary.tokens == sum(lengths.values())
    assert len(bs) == len(plan_blocks(list(lengths), list(lengths.values()), 48))
    seen_rows: dict[int, list[int]] = {}
    for i in range(len(bs)):
        blk = bs[i]
        real = blk.doc_index >= 0
        assert bool((blk.labels[~real] == -100).all())
        weights, scores = [], []
        for p, (doc_id, first) in enumerate(zip(blk.doc_ids.tolist(), blk.doc_first_row.tolist())):
            rows = (blk.doc_index == p).nonzero()[:, 0]
            trec, srec = target.get(doc_id), source.get(doc_id)
            t = torch.arange(first, first + rows.numel())
            assert torch.equal(blk.input_ids[rows].long(), trec.input_ids[t])
            nxt = torch.where(t + 1 < trec.num_tokens, trec.input_ids[(t + 1).clamp_max(trec.num_tokens - 1)], -100)
            assert torch.equal(blk.labels[rows].long(), nxt)
            doc_scores = [record_score(trec, "per_byte"), record_score(srec, "per_byte")]
            for s, want in enumerate(doc_scores):
                if not math.isnan(want):
                    assert float(blk.doc_ce[s, rows[0]]) == pytest.approx(want, rel=1e-5)
            predicted = float(trec.token_bytes[first + 1:first + rows.numel() + 1].sum())
            weights.append(predicted)
            scores.append(doc_scores)
            seen_rows.setdefault(doc_id, []).extend(t.tolist())
        # the block score: the byte-weighted mean of its pieces' document scores
        for s in range(2):
            pairs = [(w, sc[s]) for w, sc in zip(weights, scores) if w > 0 and not math.isnan(sc[s])]
            if pairs:
                want = sum(w * x for w, x in pairs) / sum(w for w, _ in pairs)
                assert float(blk.block_ce[s]) == pytest.approx(want, rel=1e-5)
    # every row of every document appears exactly once, in order
    assert all(rows == list(range(lengths[d])) for d, rows in seen_rows.items())


def test_reference_block_score_is_the_originals(stores, aligned):
    out = stores / "blocks-ref"
    run_assemble(AssembleConfig(target=str(stores / "target"), sources=(str(aligned["soft"]),), output=str(out),
                                block_len=40, score="reference", progress=False))
    bs = BlockStore(out)
    target = TeacherStore(stores / "target")
    blk = bs[1]
    n_d = [int((blk.doc_index == p).sum()) for p in range(len(blk.doc_ids))]
    ce_d = [record_score(target.get(d), "reference") for d in blk.doc_ids.tolist()]
    pairs = [(n, c) for n, c in zip(n_d, ce_d) if not math.isnan(c)]
    # the original: token-weighted mean of per-document CEs (tokens of each document in the block)
    expected = sum(n * c for n, c in pairs) / sum(n for n, _ in pairs)
    assert float(blk.block_ce[0]) == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_training_batch_feeds_the_loss(stores, aligned, blocks):
    bs = BlockStore(blocks)
    target, source = TeacherStore(stores / "target"), TeacherStore(stores / "source")
    vmap = torch.load(aligned["soft"] / "vocab_map.pt", weights_only=True)
    for weighting in ("block", "document", "token"):
        batch = build_batch([bs[0], bs[1]], [target, source], [None, vmap], weighting=weighting)
        v = int(target.manifest["model"]["logits_size"])
        logits = torch.randn(batch.num_tokens, v, requires_grad=True)
        loss, parts = fusion_loss(logits, batch.labels.reshape(-1), batch.teacher_ids, batch.teacher_logits,
                                  teacher_ce=batch.teacher_ce, segment_ids=batch.segment_ids, validate=True,
                                  return_parts=True)
        loss.backward()
        assert torch.isfinite(loss) and int(parts.wins.sum()) > 0
        assert batch.position_ids[0, 0] == 0


def test_resume_rebuilds_only_what_is_missing(stores, aligned):
    out = stores / "blocks-resume"
    cfg = AssembleConfig(target=str(stores / "target"), sources=(str(aligned["soft"]),), output=str(out),
                         block_len=48, blocks_per_shard=3, progress=False)
    run_assemble(cfg)
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.safetensors")}
    victim = sorted(before)[1]
    (out / "shards" / victim).write_bytes(b"half a shard")  # a killed write
    (out / "manifest.json").unlink()
    run_assemble(cfg)
    after = {p.name: p.read_bytes() for p in (out / "shards").glob("*.safetensors")}
    assert after == before

    al_out = stores / "align-resume"
    acfg = AlignConfig(target=str(stores / "target"), source=str(stores / "source"), output=str(al_out), progress=False)
    run_align(acfg)
    first = (al_out / "shards" / "align-00001.safetensors").read_bytes()
    (al_out / "shards" / "align-00001.safetensors").unlink()
    (al_out / "manifest.json").unlink()
    run_align(acfg)
    assert (al_out / "shards" / "align-00001.safetensors").read_bytes() == first
    with pytest.raises(StoreError, match="fallback"):
        run_align(AlignConfig(**{**acfg.__dict__, "fallback": "current"}))


def test_stores_of_different_corpora_are_refused(stores, tmp_path, tiny_gpt2):
    from fusellm_kernels.pipeline.corpus import PrepareConfig, prepare_corpus

    src = write_jsonl(tmp_path / "other.jsonl", corpus_texts(5, seed=9))
    prepare_corpus(PrepareConfig(inputs=(str(src),), output=str(tmp_path / "corpus"), progress=False))
    run_teacher_pass(TeacherConfig(corpus=str(tmp_path / "corpus"), model=str(tiny_gpt2), output=str(tmp_path / "other"),
                                   progress=False, top_k=6))
    with pytest.raises(StoreError, match="different"):
        run_align(AlignConfig(target=str(stores / "target"), source=str(tmp_path / "other"), output=str(tmp_path / "a"), progress=False))


def test_cli_align_and_assemble(stores, tmp_path, capsys):
    assert cli_main(["align", "--target", str(stores / "target"), "--source", str(stores / "source"),
                     "--output", str(tmp_path / "al"), "--vocab-align", "hard", "--no-progress"]) == 0
    assert cli_main(["assemble", "--target", str(stores / "target"), "--alignments", str(tmp_path / "al"),
                     "--output", str(tmp_path / "bl"), "--block-len", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fusellm align: done" in out and "fusellm assemble: done" in out and "aligned_fraction" in out
    shutil.rmtree(tmp_path / "al" / "shards")
    (tmp_path / "al" / "manifest.json").unlink()
    assert cli_main(["assemble", "--target", str(stores / "target"), "--alignments", str(tmp_path / "al"),
                     "--output", str(tmp_path / "bl2"), "--no-progress"]) == 2
    assert "is not a complete alignment" in capsys.readouterr().err


def test_reference_empty_rows_take_the_targets_distribution(stores, aligned, blocks):
    bs = BlockStore(blocks)
    target, source = TeacherStore(stores / "target"), TeacherStore(stores / "source")
    vmap = torch.full_like(torch.load(aligned["soft"] / "vocab_map.pt", weights_only=True), -1)  # nothing maps: every aligned row is empty
    plain = build_batch([bs[0]], [target, source], [None, vmap])
    ref = build_batch([bs[0]], [target, source], [None, vmap], empty_to_target=True)
    aligned_rows = bs[0].source_pos[1].reshape(-1) >= 0
    assert bool(aligned_rows.any())
    assert bool((plain.teacher_ids[1][aligned_rows] < 0).all())
    assert torch.equal(ref.teacher_ids[1][aligned_rows], ref.teacher_ids[0][aligned_rows])
    assert torch.equal(ref.teacher_ids[1][~aligned_rows], plain.teacher_ids[1][~aligned_rows])


def test_documents_with_nonfinite_logits_are_left_out(stores, tmp_path, tiny_corpus, models_dir, tok_bytelevel):
    """A source whose logits are NaN on some documents: those documents stay out of the blocks
    and every score left is finite."""
    from tests.fixtures_models import build_model

    bad = tok_bytelevel.convert_tokens_to_ids("Ġfusion")
    nan_model = build_model(models_dir / "nan-src", tok_bytelevel, nan_token=bad, seed=5)
    with pytest.warns(RuntimeWarning):
        run_teacher_pass(TeacherConfig(corpus=str(tiny_corpus), model=str(nan_model), output=str(tmp_path / "nan"),
                                       progress=False, docs_per_shard=10, top_k=6))
    run_align(AlignConfig(target=str(stores / "target"), source=str(tmp_path / "nan"), output=str(tmp_path / "al"), progress=False))
    summary = run_assemble(AssembleConfig(target=str(stores / "target"), sources=(str(tmp_path / "al"),),
                                          output=str(tmp_path / "bl"), block_len=48, progress=False))
    bs = BlockStore(tmp_path / "bl")
    excluded = set(bs.manifest["excluded_nonfinite_docs"])
    assert excluded and summary.extra["excluded nonfinite docs"] == len(excluded)
    kept = set()
    for i in range(len(bs)):
        blk = bs[i]
        kept.update(blk.doc_ids.tolist())
        assert bool(torch.isfinite(blk.block_ce).all())
        labelled = blk.labels >= 0
        assert bool(torch.isfinite(blk.doc_ce[:, labelled]).all())
    assert not (kept & excluded)
