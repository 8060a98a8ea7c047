"""Probabilistic token alignment (`fusellm align --method pta`): the batched Sinkhorn against
float64 and closed forms, the aligned rows against a float64 re-statement of the authors'
`transform_step_logits_ot` and of this library's default semantics, and the stage end to end
(manifest, resume refusal, damaged shards, the loss's teacher tables)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from fusellm_kernels.align.pta import PtaSettings, TokenCost, pta_teacher_rows
from fusellm_kernels.align.sinkhorn import sinkhorn_log
from fusellm_kernels.cli import main as cli_main
from fusellm_kernels.functional import gather_teacher_rows
from fusellm_kernels.pipeline.align_job import AlignConfig, run_align
from fusellm_kernels.pipeline.corpus import load_tokenizer
from fusellm_kernels.pipeline.teacher_pass import TeacherConfig, run_teacher_pass
from fusellm_kernels.reference.pta import sinkhorn_reference, transform_step_logits_ot
from fusellm_kernels.store import StoreError, TeacherStore
from fusellm_kernels.store.alignment import AlignmentStore
from fusellm_kernels.store.manifest import forget_verified
from tests.fixtures_models import (  # noqa: F401 (fixtures)
    models_dir,
    tiny_corpus,
    tiny_gpt2,
    tiny_llama,
    tok_bytelevel,
    tok_metaspace,
)

# ---------------------------------------------------------------------------- Sinkhorn


def _random_problems(batch: int, n_max: int, m_max: int, seed: int, integer: bool):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, n_max + 1, (batch,), generator=g)
    m = torch.randint(1, m_max + 1, (batch,), generator=g)
    cost = torch.randint(0, 6, (batch, n_max, m_max), generator=g).float() if integer else \
        torch.rand(batch, n_max, m_max, generator=g) * 4
    rows = torch.arange(n_max)[None, :] < n[:, None]
    cols = torch.arange(m_max)[None, :] < m[:, None]
    log_a = torch.log_softmax(torch.where(rows, torch.randn(batch, n_max, generator=g) * 2, float("-inf")), 1)
    log_b = torch.log_softmax(torch.where(cols, torch.randn(batch, m_max, generator=g) * 2, float("-inf")), 1)
    return cost, log_a, log_b, n, m


@pytest.mark.parametrize("lam,integer", [(30.0, True), (3.0, False)])
def test_sinkhorn_matches_float64_reference(lam, integer):
    batch = 64
    cost, log_a, log_b, n, m = _random_problems(batch, 10, 9, seed=int(lam), integer=integer)
    out = sinkhorn_log(cost, log_a, log_b, lam=lam, tol=1e-6, max_iter=2000)
    assert out.log_plan.dtype == torch.float32 and out.log_plan.shape == (batch, 10, 9)
    both = 0
    for b in range(batch):
        nb, mb = int(n[b]), int(m[b])
        plan, err, iters = sinkhorn_reference(cost[b, :nb, :mb].double().numpy(), log_a[b, :nb].exp().double().numpy(),
                                              log_b[b, :mb].exp().double().numpy(), lam=lam, tol=1e-6, max_iter=2000)
        got = out.log_plan[b].exp()
        if err <= 1e-6 and bool(out.converged[b]):  # the same plan (within the tolerance), as fast
            np.testing.assert_allclose(got[:nb, :mb].double().numpy(), plan, atol=2e-5, rtol=0)
            if iters < 4:  # Sinkhorn alone (after newton_after = 5 iterations the rest are solved
                # again by ε-scaling and Newton); float32 measures the error to ~1e-7 at tol 1e-6,
                # so the stopping iterate may differ by a few
                assert abs(int(out.iterations[b]) - iters) <= max(3, iters // 4)
            both += 1
        assert float(got[nb:].sum()) == 0.0 and float(got[:, mb:].sum()) == 0.0
        cols = got[:nb, :mb].sum(0).double()
        np.testing.assert_allclose(cols.numpy(), log_b[b, :mb].exp().double().numpy(), atol=1e-5)
    assert both >= batch * 3 // 4
    assert bool(out.converged.all()) and float(out.marginal_error.max()) <= 2e-6
    if lam == 30.0:  # Sinkhorn alone leaves some near-degenerate problems unconverged: what Newton is for
        plain = sinkhorn_log(cost, log_a, log_b, lam=lam, tol=1e-6, max_iter=2000, newton_after=None)
        assert int(plain.iterations.max()) == 2000 and not bool(plain.converged.all())


def test_sinkhorn_constant_cost_gives_the_product_of_the_marginals():
    cost, log_a, log_b, _, _ = _random_problems(16, 7, 7, seed=3, integer=True)
    out = sinkhorn_log(torch.full_like(cost, 2.5), log_a, log_b, lam=30.0)
    product = log_a.exp()[:, :, None] * log_b.exp()[:, None, :]
    torch.testing.assert_close(out.log_plan.exp(), product, atol=1e-6, rtol=1e-5)
    assert bool(out.converged.all()) and int(out.iterations.max()) == 1


@pytest.mark.parametrize("lam,a1,b1", [(1.0, 0.3, 0.6), (2.0, 0.5, 0.5), (30.0, 0.8, 0.25), (0.5, 0.1, 0.9)])
def test_sinkhorn_two_by_two_closed_form(lam, a1, b1):
    """Cost [[0, 1], [1, 0]]: the plan is [[x, a1 − x], [b1 − x, 1 − a1 − b1 + x]] with
    x (1 − a1 − b1 + x) = e^{2λ} (a1 − x)(b1 − x), a quadratic in x."""
    k = math.exp(2 * lam)
    qa, qb, qc = 1 - k, (1 - a1 - b1) + k * (a1 + b1), -k * a1 * b1
    roots = [(-qb + s * math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa) for s in (1, -1)]
    x = next(r for r in roots if max(0.0, a1 + b1 - 1) - 1e-12 <= r <= min(a1, b1) + 1e-12)
    expected = torch.tensor([[x, a1 - x], [b1 - x, 1 - a1 - b1 + x]])
    out = sinkhorn_log(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), torch.tensor([[a1, 1 - a1]]).log(),
                       torch.tensor([[b1, 1 - b1]]).log(), lam=lam, tol=1e-7, max_iter=10000)
    torch.testing.assert_close(out.log_plan[0].exp(), expected.float(), atol=2e-6, rtol=0)


def test_sinkhorn_refuses_bad_input():
    with pytest.raises(ValueError, match="at least one row"):
        sinkhorn_log(torch.zeros(1, 2, 2), torch.full((1, 2), float("-inf")), torch.zeros(1, 2).log_softmax(1))
    with pytest.raises(ValueError, match="lam > 0"):
        sinkhorn_log(torch.zeros(1, 2, 2), torch.zeros(1, 2), torch.zeros(1, 2), lam=0.0)


def test_teacher_rows_reproduce_the_plan_distribution():
    """A hand-made row: softmax over the stored slots is m / Σ m of the plan; an unpaired row
    keeps its one-hot fallback, a paired row without mapped entries has no teacher."""
    vocab = ["a", "b", "ab", "ba", "c", "abc"]
    cost = TokenCost(vocab)
    vmap = torch.tensor([0, 1, 2, -1, 4], dtype=torch.int32)  # source id 3 has no target id
    source_ids = torch.tensor([[0, 1, 2], [3, 3, 3]])
    source_logits = torch.tensor([[2.0, 1.0, 0.5], [1.0, 0.0, -1.0]])
    target_ids = torch.tensor([[1, 0, 5], [0, 1, 2], [2, 4, 0]])
    target_logits = torch.tensor([[1.5, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    settings = PtaSettings(top_k=3)
    rows = pta_teacher_rows(torch.tensor([0, -1, 1]), torch.tensor([-1, 5, -1], dtype=torch.int32), target_ids,
                            target_logits, source_ids, source_logits, vmap, cost, settings)
    assert rows.transported.tolist() == [True, False, False]
    assert rows.ids[1].tolist() == [5, -1, -1] and rows.logits[1, 0] == 1.0
    assert rows.ids[2].tolist() == [-1, -1, -1]
    a = torch.softmax(source_logits[0].double(), 0).numpy()
    b = torch.softmax(target_logits[0].double(), 0).numpy()
    c = np.array([[float(cost(np.array(p), np.array(q))) for q in target_ids[0].tolist()] for p in [0, 1, 2]])
    plan, _, _ = sinkhorn_reference(c, a, b, lam=30.0, tol=1e-9, max_iter=100000)
    mass = {}
    for p in range(3):
        q = int(plan[p].argmax())
        mass[int(target_ids[0, q])] = mass.get(int(target_ids[0, q]), 0.0) + plan[p, q]
    total = sum(mass.values())
    keep = rows.ids[0] >= 0
    got = dict(zip(rows.ids[0][keep].tolist(), torch.softmax(rows.logits[0][keep].double(), 0).tolist()))
    assert set(got) == set(mass)
    for i in mass:
        assert got[i] == pytest.approx(mass[i] / total, abs=1e-5)


# ---------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def pta_stores(tmp_path_factory, tiny_corpus, tiny_llama, tiny_gpt2):
    """Teacher stores with k = 10 (the authors' logits_number) of the target (Llama,
    byte-level BPE) and a source (GPT-2, Metaspace), lossless so the float64 checks see the
    logits the fast path sees."""
    d = tmp_path_factory.mktemp("pta")
    kw = dict(corpus=str(tiny_corpus), progress=False, docs_per_shard=10, top_k=10, format="lossless", store_lse=True)
    run_teacher_pass(TeacherConfig(model=str(tiny_llama), output=str(d / "target"), **kw))
    run_teacher_pass(TeacherConfig(model=str(tiny_gpt2), output=str(d / "source"), **kw))
    return d


def _align(root, name, source="source", **kw):
    out = root / name
    if not (out / "manifest.json").exists():
        run_align(AlignConfig(target=str(root / "target"), source=str(root / source), output=str(out), progress=False,
                              method="pta", **kw))
    return AlignmentStore(out, aligned_rows_ok=True)


def _row(ids: torch.Tensor, logits: torch.Tensor) -> dict[int, float]:
    """What the loss sees of a stored row: the first slot of each filled id."""
    seen: dict[int, float] = {}
    for i, x in zip(ids.tolist(), logits.tolist()):
        if i >= 0 and i not in seen:
            seen[i] = x
    return seen


def _rows_against_reference(root, al: AlignmentStore, doc_ids: list[int], **kw):
    """Every row of the documents: (doc_id, row, the stored row as the loss sees it (`_row`),
    the float64 statement's ids and values of that row). Stores, tokenizers and the soft
    lookup are loaded once for all the documents."""
    target, source = TeacherStore(root / "target"), TeacherStore(root / "source")
    ttok = load_tokenizer(str(target.path_of("tokenizer")))
    stok = load_tokenizer(str(source.path_of("tokenizer")))
    from fusellm_kernels.align import soft_lookup

    vmap = torch.load(al.vocab_map_path, weights_only=True)
    lookup = soft_lookup(vmap, stok.get_vocab(), ttok.get_vocab(), source_marker="▁", target_marker="Ġ")
    for doc_id in doc_ids:
        trec, srec = target.get(doc_id), source.get(doc_id)
        values, ids = transform_step_logits_ot(
            ttok.convert_ids_to_tokens(trec.input_ids.tolist()), stok.convert_ids_to_tokens(srec.input_ids.tolist()),
            ttok.get_vocab(), srec.topk_logits.tolist(), srec.topk_ids.tolist(), lambda i: stok.convert_ids_to_tokens(i),
            trec.topk_logits.tolist(), trec.topk_ids.tolist(), lambda i: ttok.convert_ids_to_tokens(i),
            blending_marker="▁", base_marker="Ġ", vocab_align_type="soft", blending_to_base_mapping=lookup, **kw)
        d = al.get(doc_id)
        for t in range(d.source_pos.numel()):
            yield doc_id, t, _row(d.row_ids[t], d.row_logits[t]), ids[t], values[t]


def test_pta_default_equals_its_float64_statement(pta_stores):
    al = _align(pta_stores, "align-pta")
    m = al.manifest
    assert m["method"] == "pta" and m["shard_type"] == "aligned_rows" and m["format_version"] == 3
    assert m["pta"] == {"top_k": 10, "lam": 30.0, "tol": 1e-5, "max_iter": 1000, "reference": False, "width": 10}
    s = m["sinkhorn"]
    # near-degenerate problems (λ = 30, integer costs) converge sublinearly under Sinkhorn;
    # the Newton finish brings every one within the tolerance
    assert s["problems"] > 100 and s["not_converged"] == 0 and s["max_marginal_error"] <= 2e-5
    assert s["max_iterations"] < 1000
    assert m["bytes_per_token"] > 88  # 8 + 10 × 8 per row, plus the index
    checked = 0
    for doc_id, t, got, ids, values in _rows_against_reference(pta_stores, al, sorted(al.doc_ids())[:5],
                                                               authors=False, fallback="next"):
        assert sorted(got) == sorted(ids), (doc_id, t)
        if len(ids) > 1:
            p = torch.softmax(torch.tensor(list(got.values()), dtype=torch.float64), 0).tolist()
            expected = dict(zip(ids, np.exp(values).tolist()))
            for i, pi in zip(got, p):
                assert pi == pytest.approx(expected[i], abs=2e-4), (doc_id, t)
            checked += 1
    assert checked > 20


def test_pta_reference_equals_the_authors_semantics(pta_stores):
    al = _align(pta_stores, "align-pta-ref", reference=True, fallback="current")
    assert al.manifest["pta"]["reference"] is True
    transported = 0
    for doc_id, t, got, ids, values in _rows_against_reference(pta_stores, al, sorted(al.doc_ids())[:8],
                                                               authors=True, fallback="current"):
        assert list(got) == ids or sorted(got) == sorted(ids), (doc_id, t)
        expected = dict(zip(ids, values))
        for i, v in got.items():
            assert v == pytest.approx(expected[i], abs=1e-3), (doc_id, t)
        transported += 0 < sum(got.values()) <= 1.0 + 1e-6 and len(got) > 1
    assert transported >= 8


def test_identical_tokenizations_give_the_identity_alignment(pta_stores):
    """The target aligned against itself: every row paired with itself, and the plan sends
    each top-k entry to itself, so the row's teacher is the target's own top-k softmax."""
    al = _align(pta_stores, "align-self", source="target")
    target = TeacherStore(pta_stores / "target")
    for doc_id in sorted(al.doc_ids())[:6]:
        rec, d = target.get(doc_id), al.get(doc_id)
        assert torch.equal(d.source_pos, torch.arange(rec.num_tokens, dtype=torch.int32))
        assert torch.equal(d.row_ids.long(), rec.topk_ids)
        torch.testing.assert_close(torch.softmax(d.row_logits, 1), torch.softmax(rec.topk_logits, 1), atol=1e-5, rtol=0)


def test_teacher_rows_feed_gather_teacher_rows(pta_stores):
    al = _align(pta_stores, "align-pta")
    doc_ids = sorted(al.doc_ids())[:3]
    tables = [al.teacher_rows(d) for d in doc_ids]
    ids, logits = torch.cat([t[0] for t in tables]), torch.cat([t[1] for t in tables])
    n = ids.shape[0]
    out_ids, out_logits = gather_teacher_rows([ids], [logits], torch.arange(n)[None], torch.full((1, n), -1, dtype=torch.int32),
                                              [None], backend="torch")
    assert torch.equal(out_ids[0], ids.int()) and torch.equal(out_logits[0], logits)


def test_cli_pta_resume_with_another_method_is_refused(pta_stores, tmp_path, capsys):
    base = ["align", "--target", str(pta_stores / "target"), "--source", str(pta_stores / "source"),
            "--output", str(tmp_path / "al"), "--no-progress"]
    assert cli_main([*base, "--method", "pta", "--pta-max-iter", "500"]) == 0
    out = capsys.readouterr().out
    assert "pta" in out
    manifest = json.loads((tmp_path / "al" / "manifest.json").read_text())
    assert manifest["method"] == "pta" and manifest["pta"]["max_iter"] == 500
    assert cli_main([*base, "--method", "pta", "--pta-max-iter", "500"]) == 0  # resumes: nothing to do
    capsys.readouterr()
    assert cli_main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--method pta" in err and "--method minED" in err and "Traceback" not in err
    assert cli_main([*base, "--pta-top-k", "4"]) == 2
    assert "--pta-top-k applies to --method pta only" in capsys.readouterr().err
    assert cli_main([*base, "--method", "pta", "--pta-tolerance", "0"]) == 2
    assert "--pta-tolerance" in capsys.readouterr().err


def test_a_minED_alignment_refuses_a_pta_resume(pta_stores, tmp_path):
    cfg = dict(target=str(pta_stores / "target"), source=str(pta_stores / "source"), output=str(tmp_path / "al"),
               progress=False)
    run_align(AlignConfig(**cfg))
    assert AlignmentStore(tmp_path / "al").manifest["method"] == "minED"
    with pytest.raises(StoreError, match="aligned with --method minED, but this run asks for --method pta"):
        run_align(AlignConfig(**cfg, method="pta"))


def test_damaged_aligned_rows_shards_are_refused(pta_stores, tmp_path):
    src = pta_stores / "align-pta"
    _align(pta_stores, "align-pta")
    with pytest.raises(StoreError, match="--method pta"):
        AlignmentStore(src)  # a position-map reader must not read aligned rows as MinED
    al = tmp_path / "al"
    shutil.copytree(src, al)
    shard = al / "shards" / "align-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    forget_verified()
    store = AlignmentStore(al, aligned_rows_ok=True)
    with pytest.raises(StoreError, match="corrupted"):
        store.get(store.shards[0].first_doc_id)

    # well-formed bytes, recorded checksum, but not an aligned-rows shard: refused by structure
    from safetensors.torch import load_file, save

    from fusellm_kernels.store.manifest import sha256_bytes

    shutil.copy(src / "shards" / "align-00000.safetensors", shard)
    t = load_file(str(shard))
    t["row_ids"] = t["row_ids"][:-1].contiguous()
    data = save(t, metadata={"format": "fusellm-alignment/3"})
    shard.write_bytes(data)
    m = json.loads((al / "manifest.json").read_text())
    m["shards"][0]["sha256"], m["shards"][0]["size_bytes"] = sha256_bytes(data), len(data)
    (al / "manifest.json").write_text(json.dumps(m))
    forget_verified()
    store = AlignmentStore(al, aligned_rows_ok=True)
    with pytest.raises(StoreError, match="not a valid aligned-rows shard"):
        store.get(store.shards[0].first_doc_id)
    # `fusellm verify` finds it too, and passes the intact alignment
    from fusellm_kernels.store.verify import verify_path

    assert verify_path(src).problems == []
    problems = verify_path(al).problems  # (the copy's relative store paths do not resolve either)
    assert sum("not a valid aligned-rows shard" in p for p in problems) == 1


# ---------------------------------------------------------------------------- end to end


def test_pta_candidate_assembles_and_trains(pta_stores, tmp_path):
    """align --method pta → assemble (beside a MinED alignment of the same source) → the
    trainer's batches take the PTA candidate's aligned rows, its lse NaN (renormalised),
    empty_to_target only on paired rows → a few training steps."""
    from fusellm_kernels.pipeline.assemble import AssembleConfig, run_assemble
    from fusellm_kernels.pipeline.batches import build_batch
    from fusellm_kernels.store.blocks import BlockStore
    from fusellm_kernels.training.config import preset
    from fusellm_kernels.training.data import open_data
    from fusellm_kernels.training.metrics import read_metrics
    from fusellm_kernels.training.train import train

    pta = _align(pta_stores, "align-pta")
    mined = pta_stores / "align-minED"
    if not (mined / "manifest.json").exists():
        run_align(AlignConfig(target=str(pta_stores / "target"), source=str(pta_stores / "source"), output=str(mined),
                              progress=False))
    out = tmp_path / "blocks"
    run_assemble(AssembleConfig(target=str(pta_stores / "target"), sources=(str(mined), str(pta.root)), output=str(out),
                                block_len=64, progress=False))
    blocks = BlockStore(out)
    assert [c.get("method") for c in blocks.candidates] == [None, "minED", "pta"]
    assert blocks.manifest["settings"]["methods"] == ["minED", "pta"]

    data = open_data(str(out), "", 0, seq_len=64, model_vocab=10**6, fusion=True)
    assert isinstance(data.stores[2], AlignmentStore) and data.vocab_maps[2] is None
    picked = [data.blocks[i] for i in range(min(4, len(data.blocks)))]
    batch = build_batch(picked, data.stores, data.vocab_maps, with_lse=True, backend="torch")
    # every real row of the PTA candidate is its document's aligned row, in order
    want_ids, want_logits = [], []
    for blk in picked:
        for p, doc_id in enumerate(blk.doc_ids.tolist()):
            d = pta.get(doc_id)
            rows = blk.source_pos[0][blk.doc_index == p].long()
            want_ids.append(d.row_ids[rows])
            want_logits.append(d.row_logits[rows])
    real = batch.attention_mask.reshape(-1)
    assert torch.equal(batch.teacher_ids[2][real], torch.cat(want_ids))
    assert torch.equal(batch.teacher_logits[2][real], torch.cat(want_logits))
    assert bool((batch.teacher_ids[2][~real] < 0).all())
    assert bool(batch.teacher_lse[2].isnan().all())  # the plan's rows carry no top-k tail
    assert bool(torch.isfinite(batch.teacher_lse[1][torch.stack([b.source_pos[1] for b in picked]).reshape(-1) >= 0]).all())
    # the MinED candidate's rows are what they are without the PTA candidate beside it
    run_assemble(AssembleConfig(target=str(pta_stores / "target"), sources=(str(mined),), output=str(tmp_path / "mined"),
                                block_len=64, progress=False))
    plain = open_data(str(tmp_path / "mined"), "", 0, seq_len=64, model_vocab=10**6, fusion=True)
    alone = build_batch([plain.blocks[i] for i in range(len(picked))], plain.stores, plain.vocab_maps, with_lse=True,
                        backend="torch")
    assert torch.equal(alone.teacher_ids, batch.teacher_ids[:2]) and torch.equal(alone.teacher_logits, batch.teacher_logits[:2])
    assert torch.allclose(alone.teacher_lse, batch.teacher_lse[:2], equal_nan=True, rtol=0, atol=0)
    # the original's empty-row rule looks at paired rows only: an unpaired row of the PTA
    # candidate without a fallback id keeps no teacher, a paired row without one takes the target's
    moved = build_batch(picked, data.stores, data.vocab_maps, empty_to_target=True, backend="torch")
    paired = torch.stack([b.source_pos[2] for b in picked]).reshape(-1) >= 0
    empty = (batch.teacher_ids[2] < 0).all(-1) & real
    assert torch.equal(moved.teacher_ids[2][empty & paired], batch.teacher_ids[0][empty & paired])
    assert bool((moved.teacher_ids[2][empty & ~paired] < 0).all())

    run = tmp_path / "run"
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(preset("tiny", model=str(TeacherStore(pta_stores / "target").path_of("model")), data=str(out), output=str(run), max_steps=2,
                     global_batch=2, eval_holdout=0, export=False, checkpoint_every=0, plot=False, teacher_tail="bucket"))
    finally:
        torch.set_num_threads(torch_threads)
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["fusion"]) for r in steps)
