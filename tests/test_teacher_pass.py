"""The teacher pass on tiny local models against a plain, unbatched PyTorch computation."""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusellm_kernels.pipeline.corpus import CorpusError, load_corpus
from fusellm_kernels.pipeline.scores import document_scores, record_score
from fusellm_kernels.pipeline.teacher_pass import (
    TeacherConfig,
    TeacherPassError,
    token_byte_lengths,
    tokenize_documents,
    topk_nll_lse,
    run_teacher_pass,
)
from fusellm_kernels.store import DocFlag, SettingsMismatchError, TeacherStore
from tests.fixtures_models import (  # noqa: F401 (fixtures)
    build_model,
    models_dir,
    tiny_corpus,
    tiny_gpt2,
    tiny_llama,
    tiny_padded,
    tok_bytelevel,
    tok_metaspace,
)

K = 10


def run(corpus: Path, model: Path, out: Path, **kw) -> TeacherStore:
    kw.setdefault("progress", False)
    run_teacher_pass(TeacherConfig(corpus=str(corpus), model=str(model), output=str(out), **kw))
    return TeacherStore(out)


@functools.lru_cache(maxsize=8)
def _load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return tok, AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()


def plain_reference(model_dir: Path, text: str, max_length: int, add_bos: bool = False, add_eos: bool = True,
                    mask_from: int | None = None, truncate: bool = False) -> dict:
    """One document, no batching or padding: windows of max_length (or only the first, with
    truncate; its last row then predicts nothing), float64 softmax."""
    tok, model = _load(str(model_dir))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = ([tok.bos_token_id] if add_bos else []) + ids + ([tok.eos_token_id] if add_eos else [])
    full = len(ids)
    if truncate:
        ids = ids[:max_length]
    x = torch.tensor(ids)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=x[s : s + max_length][None]).logits[0] for s in range(0, len(ids), max_length)])
    if mask_from is not None:
        logits[:, mask_from:] = float("-inf")
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = torch.zeros(len(ids), dtype=torch.float64)
    nll[:-1] = -logp[torch.arange(len(ids) - 1), x[1:]]
    top = logits.topk(K, dim=-1)
    return {"ids": x, "logits": logits, "top_v": top.values, "top_i": top.indices, "nll": nll,
            "lse": torch.logsumexp(logits.double(), dim=-1), "full": full}


def assert_matches_reference(r, ref: dict[str, torch.Tensor], atol: float = 1e-4) -> None:
    assert torch.equal(r.input_ids, ref["ids"])
    torch.testing.assert_close(r.topk_logits, ref["top_v"], atol=atol, rtol=1e-5)
    # every stored id points at its stored logit in the plain computation (robust to near-ties) ...
    torch.testing.assert_close(ref["logits"].gather(1, r.topk_ids), r.topk_logits, atol=atol, rtol=1e-5)
    # ... and ids agree exactly wherever the ranking is not a near-tie
    gaps = ref["top_v"][:, :-1] - ref["top_v"][:, 1:]
    clear = torch.cat([gaps[:, :1], torch.minimum(gaps[:, 1:], gaps[:, :-1])], 1) > 1e-3
    assert torch.equal(r.topk_ids[:, :-1][clear], ref["top_i"][:, :-1][clear])
    torch.testing.assert_close(r.nll.double(), ref["nll"], atol=atol, rtol=1e-5)
    torch.testing.assert_close(r.lse.double(), ref["lse"], atol=atol, rtol=1e-5)
    assert r.nll_sum == pytest.approx(float(ref["nll"].sum()), abs=1e-3)


@pytest.fixture(scope="module")
def llama_lossless(tiny_corpus, tiny_llama, tmp_path_factory) -> TeacherStore:  # noqa: F811
    # small shards and batches: several shards, several batches each, padding, windows
    return run(tiny_corpus, tiny_llama, tmp_path_factory.mktemp("t") / "ll", format="lossless", store_lse=True,
               docs_per_shard=7, batch_tokens=300)


def test_matches_plain_pytorch(llama_lossless, tiny_corpus, tiny_llama) -> None:  # noqa: F811
    ds, _ = load_corpus(tiny_corpus)
    store = llama_lossless
    assert store.manifest["counts"]["shards"] == 4 and store.doc_ids() == list(ds["doc_id"])
    for doc_id, text in zip(list(ds["doc_id"]), list(ds["text"])):
        r = store.get(doc_id)
        assert_matches_reference(r, plain_reference(tiny_llama, text, 128))
        assert int(r.token_bytes.sum()) == len(text.encode("utf-8"))  # bytes partition the text
        assert r.token_bytes[-1] == 0  # EOS covers no text
        assert r.predicted_bytes == len(text.encode()) - int(r.token_bytes[0])
        # the CE scores from the store, by hand from the plain computation
        ref = plain_reference(tiny_llama, text, 128)
        if r.num_predicted == 0:  # "" + EOS: nothing to predict, no score
            assert math.isnan(record_score(r, "reference")) and math.isnan(record_score(r, "per_byte"))
            continue
        assert record_score(r, "reference") == pytest.approx(float(ref["nll"][:-1].mean()), rel=1e-5)
        assert record_score(r, "per_byte") == pytest.approx(float(ref["nll"].sum()) / r.predicted_bytes, rel=1e-5)
    for i in range(len(store.shards)):
        idx = store.shard_index(i)
        scores = document_scores(idx, "reference")
        for pos in range(idx.num_docs):
            expect = record_score(store.record(i, pos), "reference")
            assert (math.isnan(expect) and math.isnan(float(scores[pos]))) or float(scores[pos]) == pytest.approx(expect)
    windowed = [d for d in list(ds["doc_id"]) if store.get(d).flags & DocFlag.WINDOWED]
    assert windowed and all(store.get(d).num_tokens > 128 for d in windowed)


def test_compact_store_within_stated_error(llama_lossless, tiny_corpus, tiny_llama, tmp_path) -> None:  # noqa: F811
    store = run(tiny_corpus, tiny_llama, tmp_path / "c", docs_per_shard=7, batch_tokens=300)
    assert store.encoding.name == "compact" and store.manifest["id_bits"] == 9
    for exact in llama_lossless:
        r = store.get(exact.doc_id)
        assert torch.equal(r.input_ids, exact.input_ids) and torch.equal(r.topk_ids, exact.topk_ids)
        assert torch.equal(r.token_bytes, exact.token_bytes) and r.nll_sum == exact.nll_sum and r.lse is None
        assert bool(((r.topk_logits - exact.topk_logits).abs() <= exact.topk_logits.abs() * 2.0**-11 + 2.0**-25).all())
        assert bool(((r.nll - exact.nll).abs() <= exact.nll.abs() * 2.0**-11 + 2.0**-25).all())


def test_bos_without_eos_on_gpt2(tiny_corpus, tiny_gpt2, tmp_path) -> None:  # noqa: F811
    store = run(tiny_corpus, tiny_gpt2, tmp_path / "g", add_bos=True, add_eos=False, format="lossless", store_lse=True)
    ds, _ = load_corpus(tiny_corpus)
    for doc_id, text in list(zip(list(ds["doc_id"]), list(ds["text"])))[:6]:
        r = store.get(doc_id)
        if not text:
            assert r.num_tokens == 1 and r.flags & DocFlag.EMPTY  # BOS only: nothing to predict, no crash
            continue
        assert_matches_reference(r, plain_reference(tiny_gpt2, text, 128, add_bos=True, add_eos=False))
        assert r.input_ids[0] == 1 and r.token_bytes[0] == 0


def test_truncate_instead_of_windows(tiny_corpus, tiny_llama, tmp_path) -> None:  # noqa: F811
    store = run(tiny_corpus, tiny_llama, tmp_path / "t", overflow="truncate", max_length=32, format="lossless",
                store_lse=True)
    ds, _ = load_corpus(tiny_corpus)
    dropped = 0
    for doc_id, text in zip(list(ds["doc_id"]), list(ds["text"])):
        r = store.get(doc_id)
        ref = plain_reference(tiny_llama, text, 32, truncate=True)
        assert r.num_tokens == ref["ids"].numel() and bool(r.flags & DocFlag.TRUNCATED) == (ref["full"] > 32)
        assert_matches_reference(r, ref)
        dropped += ref["full"] - ref["ids"].numel()
    assert store.manifest["counts"]["dropped_tokens"] == dropped > 0


def test_padded_logits_larger_than_tokenizer(tiny_corpus, tiny_padded, tok_bytelevel, tmp_path) -> None:  # noqa: F811
    n_tok = len(tok_bytelevel)
    store = run(tiny_corpus, tiny_padded, tmp_path / "p", format="lossless", store_lse=True)
    assert store.manifest["num_ids"] == n_tok and store.manifest["model"]["logits_size"] == n_tok + 37
    ds, _ = load_corpus(tiny_corpus)
    for doc_id, text in list(zip(list(ds["doc_id"]), list(ds["text"])))[:5]:
        r = store.get(doc_id)
        assert int(r.topk_ids.max()) < n_tok
        assert_matches_reference(r, plain_reference(tiny_padded, text, 128, mask_from=n_tok))
    raw = run(tiny_corpus, tiny_padded, tmp_path / "raw", format="lossless", store_lse=True, mask_padded_vocab=False)
    assert raw.manifest["num_ids"] == n_tok + 37
    r = raw.get(list(ds["doc_id"])[0])
    assert_matches_reference(r, plain_reference(tiny_padded, list(ds["text"])[0], 128))


def test_tokenizer_larger_than_logits_is_refused(tiny_corpus, models_dir, tok_bytelevel, tmp_path) -> None:  # noqa: F811
    small = build_model(models_dir / "small_vocab", tok_bytelevel, logits_size=len(tok_bytelevel) - 10)
    with pytest.raises(TeacherPassError, match=r"300 tokens but the model's logits have only 290"):
        run(tiny_corpus, small, tmp_path / "s")


def test_model_paths_and_missing_tokenizer(tiny_corpus, tiny_llama, models_dir, tok_bytelevel, tmp_path) -> None:  # noqa: F811
    bare = build_model(models_dir / "bare", None, logits_size=len(tok_bytelevel))
    with pytest.raises(TeacherPassError, match="--tokenizer"):
        run(tiny_corpus, bare, tmp_path / "b")
    store = run(tiny_corpus, bare, tmp_path / "b2", tokenizer=str(tiny_llama))
    assert store.num_docs == 24
    with pytest.raises(TeacherPassError, match="does not exist"):
        run(tiny_corpus, tmp_path / "nowhere", tmp_path / "n")
    with pytest.raises(TeacherPassError, match="exceeds the model's context"):
        run(tiny_corpus, tiny_llama, tmp_path / "m", max_length=4096)
    with pytest.raises(CorpusError, match="fusellm prepare"):
        run(tmp_path, tiny_llama, tmp_path / "c")


def test_nonfinite_logits_are_counted_and_flagged(tiny_corpus, models_dir, tok_bytelevel, tmp_path) -> None:  # noqa: F811
    ds, _ = load_corpus(tiny_corpus)
    enc = tok_bytelevel(list(ds["text"]), add_special_tokens=False)["input_ids"]
    counts: dict[int, int] = {}
    for ids in enc:
        for t in set(ids):
            counts[t] = counts.get(t, 0) + 1
    bad_tok = min((t for t, c in counts.items() if 2 <= c <= 6), key=lambda t: counts[t])
    nan_model = build_model(models_dir / "nan", tok_bytelevel, nan_token=bad_tok)
    with pytest.warns(RuntimeWarning, match="NaN/inf logits"):
        summary = run_teacher_pass(TeacherConfig(corpus=str(tiny_corpus), model=str(nan_model),
                                                 output=str(tmp_path / "n"), progress=False, docs_per_shard=5))
    store = TeacherStore(tmp_path / "n")
    expected = {d for d, ids in zip(list(ds["doc_id"]), enc) if bad_tok in ids}
    flagged = {r.doc_id for r in store if r.flags & DocFlag.NONFINITE}
    assert flagged == expected and len(expected) == counts[bad_tok]
    assert summary.extra["nonfinite doc ids"].split(", ")[0] == str(min(expected))
    assert store.manifest["counts"]["nonfinite_docs"] == len(expected) == summary.extra["nonfinite docs this run"]
    # NaN reaches every row of its document (attention multiplies masked NaN keys by 0), but never
    # another document of the batch
    rows_hit = 0
    for d, ids in zip(list(ds["doc_id"]), enc):
        r = store.get(d)
        if d in expected:
            assert not bool(torch.isfinite(r.nll[ids.index(bad_tok):-1]).all())
            rows_hit += r.num_tokens
        else:
            assert bool(torch.isfinite(r.topk_logits).all()) and bool(torch.isfinite(r.nll).all())
    assert 0 < store.manifest["counts"]["nonfinite_rows"] <= rows_hit


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.safetensors"))}


def test_resume_after_kill_is_byte_identical(tiny_corpus, tiny_llama, tmp_path) -> None:  # noqa: F811
    straight = tmp_path / "straight"
    run(tiny_corpus, tiny_llama, straight, docs_per_shard=5)
    killed = tmp_path / "killed"

    def die_after_two(i: int) -> None:
        if i == 1:
            raise KeyboardInterrupt  # the job dies right after shard 1 is on disk

    cfg = TeacherConfig(corpus=str(tiny_corpus), model=str(tiny_llama), output=str(killed), docs_per_shard=5, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_teacher_pass(cfg, on_shard_written=die_after_two)
    shards = killed / "shards"
    assert sorted(p.name for p in shards.glob("*.safetensors")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (killed / "manifest.json").exists()
    with pytest.raises(Exception, match="resume"):
        TeacherStore(killed)
    # what a kill during the next write leaves: a temporary file, and a shard whose sidecar is missing
    (shards / ".shard-00002.safetensors.abc.tmp").write_bytes(b"half")
    (shards / "shard-00003.safetensors").write_bytes(shard_bytes(straight)["shard-00003.safetensors"][:100])
    written: list[int] = []
    run_teacher_pass(TeacherConfig(**{**cfg.__dict__, "batch_tokens": 16384}), on_shard_written=written.append)
    assert written == [2, 3, 4]  # complete shards are skipped
    assert shard_bytes(killed) == shard_bytes(straight)
    assert not list(shards.glob("*.tmp"))
    assert TeacherStore(killed).manifest["counts"] == TeacherStore(straight).manifest["counts"]


def test_resume_after_sigkill_is_byte_identical(tiny_corpus, tiny_llama, tmp_path) -> None:  # noqa: F811
    """A real kill -9 of the command line in the middle of the pass, then the same command."""
    import signal
    import time

    straight = tmp_path / "straight"
    run(tiny_corpus, tiny_llama, straight, docs_per_shard=1)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fusellm_kernels.cli", "teacher", "--corpus", str(tiny_corpus), "--model",
           str(tiny_llama), "--output", str(out), "--docs-per-shard", "1", "--no-progress"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "shards" / "shard-00002.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()  # killed mid-run
    assert main_cli(cmd[3:]) == 0
    assert shard_bytes(out) == shard_bytes(straight)


def main_cli(argv: list[str]) -> int:
    from fusellm_kernels.cli import main

    return main(argv)


def test_resume_with_other_settings_is_refused(tiny_corpus, tiny_llama, tiny_gpt2, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "o"
    run(tiny_corpus, tiny_llama, out, docs_per_shard=12)
    with pytest.raises(SettingsMismatchError, match=r"top_k=10.*top_k=5.*--top-k"):
        run(tiny_corpus, tiny_llama, out, docs_per_shard=12, top_k=5)
    with pytest.raises(SettingsMismatchError, match="--docs-per-shard"):
        run(tiny_corpus, tiny_llama, out)
    with pytest.raises(SettingsMismatchError, match="--model"):
        run(tiny_corpus, tiny_gpt2, out, docs_per_shard=12)
    with pytest.raises(SettingsMismatchError, match="--add-bos"):
        run(tiny_corpus, tiny_llama, out, docs_per_shard=12, add_bos=True)
    before = shard_bytes(out)
    run(tiny_corpus, tiny_llama, out, docs_per_shard=12, top_k=5, overwrite=True)
    assert shard_bytes(out) != before and TeacherStore(out).k == 5


def test_data_parallel_two_processes_match_one(tiny_corpus, tiny_llama, tmp_path) -> None:  # noqa: F811
    one = tmp_path / "one"
    run(tiny_corpus, tiny_llama, one, docs_per_shard=5, store_lse=True)
    two = tmp_path / "two"
    root = str(Path(__file__).resolve().parents[1])  # the workers import the package from the tree
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fusellm_kernels.cli", "teacher", "--corpus", str(tiny_corpus), "--model", str(tiny_llama),
           "--output", str(two), "--docs-per-shard", "5", "--store-lse", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fusellm teacher: done") == 1  # rank 0 alone prints the summary
    assert "ranks" in proc.stdout
    a, b = TeacherStore(one), TeacherStore(two)
    assert a.doc_ids() == b.doc_ids()
    for ra, rb in zip(a, b):
        for f in ("input_ids", "topk_ids", "topk_logits", "nll", "token_bytes", "lse"):
            assert torch.equal(getattr(ra, f), getattr(rb, f)), f
        assert (ra.doc_id, ra.flags, ra.nll_sum) == (rb.doc_id, rb.flags, rb.nll_sum)
    assert shard_bytes(one) == shard_bytes(two)


def test_cli_teacher_help_and_run(tiny_corpus, tiny_llama, tmp_path, capsys) -> None:  # noqa: F811
    from fusellm_kernels.cli import main

    with pytest.raises(SystemExit):
        main(["teacher", "--help"])
    text = capsys.readouterr().out
    for opt in ("--corpus", "--model", "--tokenizer", "--top-k", "--format", "--store-lse", "--max-length",
                "--overflow", "--add-eos", "--no-add-eos", "--add-bos", "--docs-per-shard", "--batch-tokens",
                "--dtype", "--device", "--mask-padded-vocab", "--overwrite", "--summary-json"):
        assert opt in text, opt
    out = tmp_path / "s"
    rc = main(["teacher", "--corpus", str(tiny_corpus), "--model", str(tiny_llama), "--output", str(out),
               "--no-progress", "--summary-json", str(tmp_path / "sum.jsonl")])
    assert rc == 0
    printed = capsys.readouterr().out
    for word in ("documents", "tokens/s", "bytes written", "bytes/token"):
        assert word in printed
    s = json.loads((tmp_path / "sum.jsonl").read_text())
    store = TeacherStore(out)
    assert s["tokens"] == store.num_tokens and s["documents"] == 24 and s["tokens_per_s"] > 0
    assert main(["teacher", "--corpus", str(tiny_corpus), "--model", str(tiny_llama), "--output", str(out),
                 "--top-k", "4"]) == 2
    assert "--top-k" in capsys.readouterr().err


def test_empty_documents(tiny_corpus, tiny_llama, tmp_path) -> None:  # noqa: F811
    ds, _ = load_corpus(tiny_corpus)
    empties = [d for d, t in zip(list(ds["doc_id"]), list(ds["text"])) if not t.strip()]
    store = run(tiny_corpus, tiny_llama, tmp_path / "e", add_eos=False)
    for d in empties:
        r = store.get(d)
        assert r.flags & DocFlag.EMPTY
        assert r.num_tokens == (0 if list(ds["text"])[d] == "" else r.num_tokens)
    assert store.get(empties[0]).topk_ids.shape == (0, K)
    assert store.manifest["counts"]["empty_docs"] == len(empties) == 2


def test_topk_nll_lse_in_chunks_equals_plain() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 70, generator=g) * 4
    logits[5, 3] = float("nan")
    logits[9, 69] = float("inf")  # in the masked columns: not counted
    logits[11, 2] = float("inf")
    logits[12, 7] = float("-inf")  # a zero probability outside the top-k: harmless
    labels = torch.randint(0, 60, (37,), generator=g)
    labels[-1] = -1
    vals, ids, nll, lse, bad = topk_nll_lse(logits, labels, 6, num_valid=60, chunk_rows=8)
    x = logits.double()[:, :60]
    ref_lse = torch.logsumexp(x, 1)
    ok = torch.ones(37, dtype=torch.bool)
    ok[5] = ok[11] = False
    torch.testing.assert_close(lse[ok].double(), ref_lse[ok], rtol=1e-6, atol=1e-5)
    assert torch.equal(vals[ok].double(), x.topk(6).values[ok])
    assert torch.equal(ids[ok], x.topk(6).indices[ok])
    ref_nll = ref_lse - x.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    torch.testing.assert_close(nll[ok][:-1].double(), ref_nll[ok][:-1], rtol=1e-6, atol=1e-5)
    assert nll[-1] == 0 and bad.tolist() == [i in (5, 11) for i in range(37)]
    # bfloat16 logits (a GPU pass) are reduced in float32: values exact, lse to float32 rounding
    vals16, _, _, lse16, _ = topk_nll_lse(logits.to(torch.bfloat16), labels, 6, num_valid=60, chunk_rows=8)
    x16 = logits.to(torch.bfloat16).double()[:, :60]
    assert torch.equal(vals16[ok].double(), x16.topk(6).values[ok])
    torch.testing.assert_close(lse16[ok].double(), torch.logsumexp(x16, 1)[ok], rtol=1e-6, atol=1e-5)


def test_token_byte_lengths_partition_the_text() -> None:
    # overlapping spans (a byte-level tokenizer splitting 'é') and an uncovered space
    text = "Hé ✓"
    b = token_byte_lengths(text, [(0, 2), (1, 2), (3, 4)])
    assert b.tolist() == [3, 0, 4] and b.sum() == len(text.encode())
    assert token_byte_lengths("ab  ", [(0, 1), (1, 2)]).tolist() == [1, 3]  # trailing spaces to the last token
    assert token_byte_lengths("", []).tolist() == []


def test_changed_corpus_text_is_detected(tok_bytelevel) -> None:  # noqa: F811
    with pytest.raises(CorpusError, match="document 7"):
        tokenize_documents(tok_bytelevel, ["text"], [7], [12345], False, True, 128, "split")


@pytest.mark.cuda
def test_bfloat16_pass_on_cuda_matches_plain_pytorch(tiny_corpus, tiny_llama, tmp_path) -> None:  # noqa: F811
    """The GPU default (bfloat16 compute) against the float32 CPU computation: bfloat16's own
    error, ~2**-8 relative on the logits of a 2-layer model."""
    store = run(tiny_corpus, tiny_llama, tmp_path / "cuda", format="lossless", store_lse=True, device="cuda")
    assert store.manifest["settings"]["dtype"] == "bfloat16"
    ds, _ = load_corpus(tiny_corpus)
    for doc_id, text in list(zip(list(ds["doc_id"]), list(ds["text"])))[:8]:
        r = store.get(doc_id)
        ref = plain_reference(tiny_llama, text, 128)
        assert torch.equal(r.input_ids, ref["ids"])
        scale = ref["top_v"].abs().max()
        torch.testing.assert_close(r.topk_logits, ref["top_v"], atol=float(scale) * 2**-6, rtol=0)
        torch.testing.assert_close(r.lse.double(), ref["lse"], atol=float(scale) * 2**-6, rtol=0)


def test_plan_batches_budget_and_padding() -> None:
    import random

    from fusellm_kernels.pipeline.teacher_pass import plan_batches

    rng = random.Random(0)
    lengths = [int(min(2048, max(4, rng.lognormvariate(0, 0.8) * 2048 / 3))) for _ in range(2048)] + [0, 5000]
    batches = plan_batches(lengths, 16384)
    flat = sorted(i for b in batches for i in b)
    assert flat == [i for i, n in enumerate(lengths) if n > 0]  # every non-empty segment once
    for b in batches:
        assert all(lengths[i] <= lengths[b[0]] for i in b)
        assert len(b) * lengths[b[0]] <= 16384 or len(b) == 1  # the 5000-token segment runs alone
    real = sum(lengths)
    padded = sum(len(b) * lengths[b[0]] for b in batches)
    assert real / padded > 0.97
    assert plan_batches(lengths, 16384) == batches  # deterministic
