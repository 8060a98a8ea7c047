"""Online fusion (`fusellm_kernels.pipeline.live`) against the offline pipeline on the same documents.

The offline side runs `fusellm teacher --format lossless`, `fusellm align` and `fusellm
assemble` on the tiny models; the online side runs the same candidates live. Positions,
fallback ids, labels and document order must be identical; teacher logits and scores equal
to float32 rounding (the live pass batches documents differently, so a row's logits may
differ in the last bits); per-step training losses within the suite's tolerance policy.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusellm_kernels.pipeline.align_job import AlignConfig, run_align
from fusellm_kernels.pipeline.assemble import AssembleConfig, run_assemble
from fusellm_kernels.pipeline.live import open_online
from fusellm_kernels.pipeline.teacher_pass import TeacherConfig, run_teacher_pass
from fusellm_kernels.store.blocks import BlockStore
from fusellm_kernels.store.format import TeacherStore
from tests.fixtures_models import (  # noqa: F401 (fixtures)
    models_dir,
    tiny_corpus,
    tiny_gpt2,
    tiny_llama,
    tiny_padded,
    tok_bytelevel,
    tok_metaspace,
)

TOP_K = 6
BLOCK_LEN = 48


@pytest.fixture(scope="module")
def offline(tmp_path_factory, tiny_corpus, tiny_llama, tiny_gpt2) -> Path:
    """Lossless teacher stores (with the lse), the default (soft/next) alignment and blocks of 48 rows."""
    d = tmp_path_factory.mktemp("offline")
    kw = dict(corpus=str(tiny_corpus), progress=False, docs_per_shard=10, top_k=TOP_K, format="lossless", store_lse=True)
    run_teacher_pass(TeacherConfig(model=str(tiny_llama), output=str(d / "target"), **kw))
    run_teacher_pass(TeacherConfig(model=str(tiny_gpt2), output=str(d / "source"), **kw))
    run_align(AlignConfig(target=str(d / "target"), source=str(d / "source"), output=str(d / "align"), progress=False))
    run_assemble(AssembleConfig(target=str(d / "target"), sources=(str(d / "align"),), output=str(d / "blocks"),
                                block_len=BLOCK_LEN, blocks_per_shard=64, progress=False))  # one shard: the sampler shuffles as online
    return d


@pytest.fixture(scope="module")
def online(tmp_path_factory, tiny_corpus, tiny_llama, tiny_gpt2):
    return open_online(str(tiny_corpus), str(tiny_llama), [str(tiny_gpt2)], block_len=BLOCK_LEN, top_k=TOP_K,
                       score="per_byte", device=torch.device("cpu"), cache_dir=tmp_path_factory.mktemp("vocab-cache"))


def test_live_records_equal_the_lossless_store(offline, online):
    stores = [TeacherStore(offline / "target"), TeacherStore(offline / "source")]
    doc_ids = stores[0].doc_ids()
    for teacher, store in zip(online.teachers, stores):
        live = teacher.records(doc_ids)
        assert sorted(live) == sorted(doc_ids)
        for d in doc_ids:
            got, want = live[d], store.get(d)
            assert (got.doc_id, got.text_hash, got.flags) == (want.doc_id, want.text_hash, want.flags)
            assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.token_bytes, want.token_bytes)
            assert torch.equal(got.topk_ids, want.topk_ids), d
            torch.testing.assert_close(got.topk_logits, want.topk_logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.nll, want.nll, rtol=1e-5, atol=1e-5)
            assert got.nll_sum == pytest.approx(want.nll_sum, rel=1e-5, abs=1e-5)


def test_online_blocks_equal_the_assembled_ones(offline, online):
    blocks = BlockStore(offline / "blocks")
    assert len(online) == len(blocks)
    assert online.vocab_maps[0] is None
    offline_map = torch.load(offline / "align" / "vocab_map.pt", weights_only=True)
    assert torch.equal(online.vocab_maps[1].long(), offline_map.long())
    for i in range(len(blocks)):
        want = blocks.shard(0).block(i)
        got = online[i]
        assert online.num_labels(i) == int((want.labels >= 0).sum())
        for name in ("input_ids", "labels", "doc_index", "doc_ids", "doc_first_row", "source_pos", "fallback_id"):
            assert torch.equal(getattr(got, name).long(), getattr(want, name).long()), (i, name)
        for name in ("doc_ce", "token_ce", "block_ce"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, equal_nan=True)
    online.release(range(len(online)))
    assert online.held_documents == 0  # every block built once: nothing is held any more


def _train(tmp: Path, name: str, **kw) -> list[dict]:
    from fusellm_kernels.training.config import preset
    from fusellm_kernels.training.metrics import read_metrics
    from fusellm_kernels.training.train import train

    out = tmp / name
    cfg = preset("tiny", **{"output": str(out), "seq_len": BLOCK_LEN, "global_batch": 2, "max_steps": 3, "plot": False,
                            "export": False, "checkpoint_every": 0, **kw})
    train(cfg)
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize(("strategy", "weighting"), [("min_ce", "document"), ("avg_ce", "token"), ("clm", "document")])
def test_online_training_equals_offline(offline, tmp_path, tiny_corpus, tiny_llama, tiny_gpt2, strategy, weighting):
    """MinCE per document, AvgCE per token, and CE alone (online: the target's tokens, no model run)."""
    common = dict(model=str(tiny_llama), strategy="min_ce" if strategy == "clm" else strategy, weighting=weighting,
                  top_k=TOP_K, mode="clm" if strategy == "clm" else "fusion")
    stored = _train(tmp_path, "offline", data=str(offline / "blocks"), **common)
    live = _train(tmp_path, "online", online=True, corpus=str(tiny_corpus),
                  candidate=() if strategy == "clm" else (str(tiny_gpt2),), **common)
    assert [r["step"] for r in live] == [r["step"] for r in stored] == [1, 2, 3]
    for a, b in zip(live, stored):
        assert a["tokens"] == b["tokens"] and a.get("wins") == b.get("wins")
        for key in ("loss", "ce", "fusion", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-6), (a["step"], key)


def test_online_bucketed_tail_equals_offline_and_needs_the_lse(offline, tmp_path, tiny_corpus, tiny_llama, tiny_gpt2):
    """--teacher-tail bucket: the live passes keep each row's lse, so online training equals
    offline on stores made with --store-lse; a stored candidate without it is refused."""
    from fusellm_kernels.training.data import DataError

    common = dict(model=str(tiny_llama), strategy="min_ce", top_k=TOP_K, teacher_tail="bucket", divergence="kl")
    stored = _train(tmp_path, "offline", data=str(offline / "blocks"), **common)
    live = _train(tmp_path, "online", online=True, corpus=str(tiny_corpus), candidate=(str(tiny_gpt2),), **common)
    renorm = _train(tmp_path, "renorm", data=str(offline / "blocks"), **{**common, "teacher_tail": "renormalize"})
    for a, b, c in zip(live, stored, renorm):
        for key in ("loss", "ce", "fusion", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-6), (a["step"], key)
    assert stored[0]["fusion"] != pytest.approx(renorm[0]["fusion"], rel=1e-3)  # the tail changes the loss
    no_lse = tmp_path / "no-lse"
    run_teacher_pass(TeacherConfig(model=str(tiny_gpt2), output=str(no_lse), corpus=str(tiny_corpus), progress=False,
                                   docs_per_shard=10, top_k=TOP_K, format="lossless"))
    with pytest.raises(DataError, match="--store-lse"):
        _train(tmp_path, "refused", online=True, corpus=str(tiny_corpus), candidate=(str(no_lse),), **common)
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()


def test_a_stored_candidate_mixes_with_live_ones(offline, tiny_corpus, tiny_llama, tmp_path):
    """--candidate naming a teacher store reads it instead of running a model: with the
    offline source store as the candidate, the blocks equal the assembled ones too."""
    mixed = open_online(str(tiny_corpus), str(tiny_llama), [str(offline / "source")], block_len=BLOCK_LEN, top_k=TOP_K,
                        score="per_byte", device=torch.device("cpu"), cache_dir=tmp_path)
    assert type(mixed.teachers[1]).__name__ == "StoredTeacher"
    blocks = BlockStore(offline / "blocks")
    for i in range(len(blocks)):
        want, got = blocks.shard(0).block(i), mixed[i]
        for name in ("input_ids", "labels", "source_pos", "fallback_id"):
            assert torch.equal(getattr(got, name).long(), getattr(want, name).long()), (i, name)
        torch.testing.assert_close(got.doc_ce, want.doc_ce, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_online_resume_equals_a_straight_run_and_refuses_changed_candidates(tmp_path, tiny_corpus, tiny_llama, tiny_gpt2,
                                                                            tiny_padded):
    import shutil

    from fusellm_kernels.training.config import ConfigError

    cand = tmp_path / "candidate"
    shutil.copytree(tiny_gpt2, cand)
    common = dict(model=str(tiny_llama), online=True, corpus=str(tiny_corpus), candidate=(str(cand),), top_k=TOP_K)
    straight = _train(tmp_path, "straight", checkpoint_every=1, keep_checkpoints=3, **common)
    # a run killed right after saving step 2 (its log already holds step 3)
    src, dst = tmp_path / "straight", tmp_path / "resumed"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step-00000002", dst / "checkpoints" / "step-00000002")
    for name in ("config.json", "metrics.jsonl", "online"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, dst / name)
    resumed = _train(tmp_path, "resumed", checkpoint_every=1, keep_checkpoints=3, **common)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[2]["loss"] == pytest.approx(straight[2]["loss"], rel=2e-5, abs=1e-6)
    assert resumed[2]["grad_norm"] == pytest.approx(straight[2]["grad_norm"], rel=2e-5, abs=1e-6)
    # the same --candidate path now holds another model: refused, naming the candidate
    shutil.rmtree(cand)
    shutil.copytree(tiny_padded, cand)
    with pytest.raises(ConfigError, match="candidate 1 was"):
        _train(tmp_path, "resumed", checkpoint_every=1, keep_checkpoints=3, **common)


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    from fusellm_kernels.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # train exits through SystemExit(2)
        rc = e.code
    return rc, capsys.readouterr().err


def test_cli_online_runs_and_refuses_bad_flags(capsys, tmp_path, tiny_corpus, tiny_llama, tiny_gpt2):
    base = ["train", "--online", "--preset", "tiny", "--model", str(tiny_llama), "--corpus", str(tiny_corpus),
            "--seq-len", str(BLOCK_LEN), "--global-batch", "2", "--max-steps", "1", "--no-export", "--no-plot", "--no-progress",
            "--top-k", str(TOP_K)]
    rc, err = _cli(capsys, [*base, "--candidate", str(tiny_gpt2), "--output", str(tmp_path / "ok")])
    assert rc == 0, err
    recorded = (tmp_path / "ok" / "online" / "candidates.json").read_text()
    assert str(tiny_gpt2) in recorded and "model_fingerprint" in recorded
    from fusellm_kernels.training.metrics import read_metrics

    (step,) = [r for r in read_metrics(tmp_path / "ok" / "metrics.jsonl") if "loss" in r]
    assert step["candidates_s"] > 0 and step["align_s"] > 0 and step["data_s"] >= 0 and step["held_documents"] >= 0
    assert 0.0 < step["aligned_fraction"]["gpt2"] <= 1.0 and set(step["wins"]) == {"llama", "gpt2"}
    import shutil

    from transformers import T5Config, T5ForConditionalGeneration

    seq2seq = tmp_path / "t5"  # not a causal LM: refused before the first step
    T5ForConditionalGeneration(T5Config(vocab_size=512, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(seq2seq)
    for f in Path(tiny_llama).glob("*token*"):
        shutil.copy(f, seq2seq / f.name)
    for extra, named in (([], "--candidate"),  # fusion online needs a source
                         (["--candidate", str(seq2seq)], "is not a causal language model"),
                         (["--candidate", str(tmp_path / "nowhere")], f"--candidate {tmp_path / 'nowhere'} does not exist"),
                         (["--candidate", str(tiny_gpt2), "--data", str(tmp_path)], "--data"),
                         (["--candidate", str(tiny_gpt2), "--eval-holdout", "1"], "--eval-holdout"),
                         (["--candidate", str(tiny_gpt2), "--score", "mean"], "--score"),
                         (["--candidate", str(tiny_gpt2), "--seq-len", "4096"], "context of 128 tokens")):
        rc, err = _cli(capsys, [*base, *extra, "--output", str(tmp_path / "bad")])
        assert rc == 2 and named in err and "Traceback" not in err, (extra, err)
    rc, err = _cli(capsys, ["train", "--model", str(tiny_llama), "--data", str(tmp_path), "--output", str(tmp_path / "x"),
                            "--candidate", str(tiny_gpt2)])
    assert rc == 2 and "--candidate" in err and "only with --online" in err, err


def test_online_two_ranks_equal_one_process(tmp_path, tiny_corpus, tiny_llama, tiny_gpt2):
    """2 CPU ranks (gloo, torchrun), each running the candidates on its share of the blocks, the
    candidates sharded across the two (FSDP2, `--candidate-sharding shard`), against one
    process holding them whole with the alignment in a worker process."""
    import os
    import subprocess
    import sys

    from fusellm_kernels.training.metrics import read_metrics

    common = dict(model=str(tiny_llama), online=True, corpus=str(tiny_corpus), candidate=(str(tiny_gpt2),), top_k=TOP_K,
                  strategy="min_ce", weighting="token")
    single = _train(tmp_path, "single", align_workers=1, **common)  # and the alignment in a worker process
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fusellm_kernels.training.train",
           "--preset", "tiny", "--online", "--model", str(tiny_llama), "--corpus", str(tiny_corpus), "--candidate", str(tiny_gpt2),
           "--top-k", str(TOP_K), "--strategy", "min_ce", "--weighting", "token", "--seq-len", str(BLOCK_LEN),
           "--global-batch", "2", "--max-steps", "3", "--no-plot", "--no-export", "--checkpoint-every", "0",
           "--candidate-sharding", "shard", "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    two = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, single):
        assert a["tokens"] == b["tokens"] and a["wins"] == b["wins"]
        for key in ("loss", "ce", "fusion", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-6), (a["step"], key)


def test_cli_names_the_marker_flags_when_conventions_cannot_be_detected(capsys, tmp_path, tiny_corpus, tiny_llama,
                                                                        tiny_gpt2, monkeypatch):
    import fusellm_kernels.align as align

    real = align.detect_conventions

    def undetectable(tokenizer, marker=None, **kw):  # detection fails for the source's (Metaspace) tokenizer
        if marker is None and any(t.startswith("▁") for t in tokenizer.get_vocab()):
            raise align.ConventionError("tokenizer 'x': its tokens show neither a word-start marker nor a continuation prefix")
        return real(tokenizer, marker=marker, **kw)

    monkeypatch.setattr(align, "detect_conventions", undetectable)
    argv = ["train", "--online", "--preset", "tiny", "--model", str(tiny_llama), "--corpus", str(tiny_corpus),
            "--candidate", str(tiny_gpt2), "--seq-len", str(BLOCK_LEN), "--global-batch", "2", "--max-steps", "1",
            "--no-export", "--no-plot", "--no-progress", "--output", str(tmp_path / "run")]
    rc, err = _cli(capsys, argv)
    assert rc == 2 and "--source-marker" in err and "Traceback" not in err, err
    rc, err = _cli(capsys, [*argv, "--source-marker", "▁"])  # the candidate's marker given by hand: it trains
    assert rc == 0, err
    rc, err = _cli(capsys, [*argv[:-1], str(tmp_path / "other"), "--source-marker", "▁", "--source-marker", "▁"])
    assert rc == 2 and "one per --candidate" in err, err


def test_a_damaged_cached_vocab_map_is_computed_again(tmp_path, tiny_corpus, tiny_llama, tiny_gpt2):
    kw = dict(block_len=BLOCK_LEN, top_k=TOP_K, score="per_byte", device=torch.device("cpu"), cache_dir=tmp_path)
    first = open_online(str(tiny_corpus), str(tiny_llama), [str(tiny_gpt2)], **kw)
    (cached,) = tmp_path.glob("*/vocab_map.pt")
    data = bytearray(cached.read_bytes())
    data[-8:] = b"garbage!"
    cached.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="cannot be used.*computing it again"):
        again = open_online(str(tiny_corpus), str(tiny_llama), [str(tiny_gpt2)], **kw)
    assert torch.equal(again.vocab_maps[1], first.vocab_maps[1])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: the third open trusts it
        open_online(str(tiny_corpus), str(tiny_llama), [str(tiny_gpt2)], **kw)
