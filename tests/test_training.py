"""The training loop's gates: golden losses, resume equivalence, FSDP2 parity, CLM = plain CE,
NaN handling, export, and bad input.

One tiny Llama (hidden 32, 2 layers, vocabulary 100) and synthetic stores + blocks
(`fusellm_kernels.training.synthetic`) are built once. Two full runs of the `tiny` preset (6 steps,
checkpoints at 3 and 6) are shared by most tests: one in this process (a one-rank FSDP2
group) and one launched with torchrun on 2 CPU ranks (gloo) — the file's only multi-process
launch. Resume tests restart from their step-3 checkpoints, so "k steps, resume, N − k"
is compared with "N straight" without extra long runs, and resuming the 2-rank checkpoint in
one process exercises DCP's resharding to another world size.

Golden losses: tests/golden/train_tiny.json; regenerate (after an intended change of the
numbers) with ``FUSELLM_UPDATE_GOLDEN=1 pytest tests/test_training.py -k golden``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusellm_kernels.training.config import ConfigError, TrainConfig, preset
from fusellm_kernels.training.metrics import read_metrics
from fusellm_kernels.training.synthetic import SyntheticSpec, write_synthetic_run
from fusellm_kernels.training.train import TrainingError, train

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "train_tiny.json"


def _tiny_model(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, eos_token_id=0, bos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Hidden size 32: intra-op threads cost far more than they save (100x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory, _one_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "model": _tiny_model(root / "model"), "blocks": write_synthetic_run(root / "data", SyntheticSpec())}


def _cfg(world: dict[str, Path], output: Path, **kw) -> TrainConfig:
    return preset("tiny", **{"model": str(world["model"]), "data": str(world["blocks"]), "output": str(output),
                             "eval_holdout": 2, "plot": False, **kw})


def _train_records(output: Path) -> list[dict]:
    return [r for r in read_metrics(output / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def single(world) -> Path:
    out = world["root"] / "single"
    train(_cfg(world, out, plot=True))
    return out


@pytest.fixture(scope="module")
def two_ranks(world) -> Path:
    out = world["root"] / "two_ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fusellm_kernels.training.train",
           "--preset", "tiny", "--model", str(world["model"]), "--data", str(world["blocks"]), "--output", str(out),
           "--eval-holdout", "2", "--no-plot"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _resume_from(src: Path, step: int, dst: Path) -> Path:
    """A run directory as a run killed right after saving `step` would have left it."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step-{step:08d}", dst / "checkpoints" / f"step-{step:08d}")
    shutil.copy(src / "config.json", dst / "config.json")
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")  # holds steps past the checkpoint, as a killed run's would
    return dst


def _close(a: list[float], b: list[float], rtol: float = 2e-5, atol: float = 1e-6) -> None:
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rtol, abs_tol=atol), (a, b)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------ the shared runs


def test_golden_losses(single):
    records = _train_records(single)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    got = {"loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records]}
    if os.environ.get("FUSELLM_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    _close(got["loss"], golden["loss"], rtol=1e-4)
    _close(got["grad_norm"], golden["grad_norm"], rtol=1e-3)
    assert records[-1]["loss"] < records[0]["loss"]  # lr 1e-3 on a tiny model: it learns
    for r in records:  # the logged parts compose the loss: λ·ce + (1 − λ)·fusion
        assert math.isclose(r["loss"], 0.9 * r["ce"] + 0.1 * r["fusion"], rel_tol=1e-5)
        assert set(r["wins"]) == {"target", "source1", "source2"} and sum(r["wins"].values()) > 0
    assert (single / "curves.png").stat().st_size > 0
    assert json.loads((single / "config.json").read_text())["global_batch"] == 4


def test_fsdp_two_ranks_match_one_process(single, two_ranks):
    one, two = _train_records(single), _train_records(two_ranks)
    _close([r["loss"] for r in one], [r["loss"] for r in two])
    _close([r["grad_norm"] for r in one], [r["grad_norm"] for r in two], rtol=1e-4)
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    # final weights after 6 AdamW steps: the gradients agreed at every step
    w1, w2 = _weights(single / "export"), _weights(two_ranks / "export")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
    evals = [[r["eval_ppl"] for r in read_metrics(d / "metrics.jsonl") if "eval_ppl" in r] for d in (single, two_ranks)]
    _close(evals[0], evals[1], rtol=1e-5)


def test_resume_reproduces_losses(world, single):
    out = _resume_from(single, 3, world["root"] / "resumed")
    junk = out / "checkpoints" / ".tmp-step-00000006"  # a save that was killed half-way
    junk.mkdir()
    (junk / "partial").write_bytes(b"\0" * 10)
    train(_cfg(world, out))
    assert not junk.exists()  # replaced by the resumed run's own save of step 6
    straight, resumed = _train_records(single), _train_records(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # steps 4-6 logged once, by the resumed run
    _close([r["loss"] for r in straight], [r["loss"] for r in resumed], rtol=1e-6)
    _close([r["grad_norm"] for r in straight], [r["grad_norm"] for r in resumed], rtol=1e-5)


def test_resume_on_another_world_size(world, two_ranks):
    out = _resume_from(two_ranks, 3, world["root"] / "resharded")
    train(_cfg(world, out))  # 2-rank DCP checkpoint, 1-rank resume
    _close([r["loss"] for r in _train_records(two_ranks)], [r["loss"] for r in _train_records(out)], rtol=2e-5)


def test_resume_refuses_changed_settings(world, single):
    out = _resume_from(single, 3, world["root"] / "changed")
    with pytest.raises(ConfigError, match="--lr"):
        train(_cfg(world, out, lr=5e-4))


def test_export_reloads_with_from_pretrained(single):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(single / "export")
    exported = _weights(single / "export")
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, exported[name], rtol=0, atol=0)
    out = model(torch.randint(3, 100, (1, 16)))
    assert torch.isfinite(out.logits).all()



def test_eval_command_is_plain_perplexity(world, single, tmp_path):
    """`fusellm eval` = exp(mean next-token CE) of the exported model, computed plainly."""
    from transformers import AutoModelForCausalLM

    from fusellm_kernels.cli import main
    from fusellm_kernels.store.blocks import BlockStore

    summary = tmp_path / "eval.jsonl"
    assert main(["eval", "--model", str(single / "export"), "--data", str(world["blocks"]), "--attention", "block",
                 "--micro-batch", "2", "--summary-json", str(summary)]) == 0
    got = json.loads(summary.read_text())
    got["blocks"] = got["documents"]
    model = AutoModelForCausalLM.from_pretrained(single / "export")
    blocks = BlockStore(world["blocks"])
    ce, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(blocks)):
            labels = blocks[i].labels.long()
            logits = model(blocks[i].input_ids.long()[None]).logits[0]
            ce += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            n += int((labels >= 0).sum())
    assert got["blocks"] == len(blocks)
    assert math.isclose(got["eval_ppl"], math.exp(ce / n), rel_tol=1e-5)


# ------------------------------------------------------------------ modes and faults


def test_clm_mode_equals_plain_cross_entropy_loop(world):
    """CE only through the fused head = a plain transformers loss loop on the same blocks and steps."""
    from transformers import AutoModelForCausalLM

    from fusellm_kernels.training.data import BlockSampler, open_data
    from fusellm_kernels.training.train import _lr_factor

    out = world["root"] / "clm"
    train(_cfg(world, out, mode="clm", max_steps=3, attention="block", export=False, checkpoint_every=0))
    got = [r["loss"] for r in _train_records(out)]

    cfg = _cfg(world, out, mode="clm", max_steps=3)
    data = open_data(cfg.data, "", cfg.eval_holdout, seq_len=cfg.seq_len, model_vocab=100, fusion=False)
    model = AutoModelForCausalLM.from_pretrained(world["model"], attn_implementation="sdpa")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    sampler = BlockSampler(data.train_range, cfg.global_batch, cfg.seed)
    total = min(sampler.steps_per_epoch * cfg.epochs, cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, math.ceil(cfg.warmup_ratio * total), total, 0.0))
    want = []
    for _ in range(3):
        blocks = [data.blocks[i] for i in sampler.next_global_batch()]
        ids = torch.stack([b.input_ids for b in blocks]).long()
        labels = torch.stack([b.labels for b in blocks]).long()
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        want.append(float(loss.detach()))
    _close(got, want, rtol=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(world, monkeypatch):
    from fusellm_kernels.training.parallel import FusionLM

    calls = {"n": 0}
    forward = FusionLM.forward

    def poisoned(self, *args, **kwargs):  # step 2's first micro-batch (4 micro-batches per step)
        loss, parts = forward(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] == 5 else (loss, parts)

    monkeypatch.setattr(FusionLM, "forward", poisoned)
    out = world["root"] / "nan"
    with pytest.raises(TrainingError, match=r"non-finite loss at step 2 \(blocks \[.*\] of .*step-00000001"):
        train(_cfg(world, out, checkpoint_every=1, export=False))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]


def test_document_attention_isolates_documents(world):
    """With --attention document a row sees only its own document piece: the hidden states of a
    block's second piece equal those of the piece run alone (sdpa and eager)."""
    from transformers import AutoModelForCausalLM

    from fusellm_kernels.training.data import make_batch, open_data
    from fusellm_kernels.training.parallel import document_mask

    data = open_data(str(world["blocks"]), "", 0, seq_len=64, model_vocab=100, fusion=False)
    for i in data.train_range:
        batch = make_batch(data, [i], fusion=False, weighting="token", top_k=0, device=torch.device("cpu"))
        starts = (batch.position_ids[0] == 0).nonzero().flatten().tolist()
        if len(starts) >= 2:
            break
    a, b = starts[1], (starts + [64])[2]
    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(world["model"], attn_implementation=impl)
        with torch.no_grad():
            packed = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                 attention_mask=document_mask(batch.doc_index, torch.float32)).last_hidden_state
            alone = model.model(input_ids=batch.input_ids[:, a:b]).last_hidden_state
            leaky = model.model(input_ids=batch.input_ids).last_hidden_state
        torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(leaky[:, a:b], alone, atol=1e-3)  # block attention sees the earlier piece


def test_bad_inputs_are_named_before_training(world, tmp_path):
    from fusellm_kernels.store.manifest import StoreError

    with pytest.raises(ConfigError, match="--global-batch"):
        _cfg(world, tmp_path / "x", global_batch=6, micro_batch=4).validate()
    with pytest.raises(ConfigError, match="--lam"):
        _cfg(world, tmp_path / "x", lam=1.5).validate()
    with pytest.raises(ConfigError, match="--model"):
        TrainConfig(data="d", output="o").validate()
    with pytest.raises(StoreError, match="block_len 64 but --seq-len is 32"):
        train(_cfg(world, tmp_path / "x", seq_len=32))
    # a candidate's teacher store without its manifest: named, before the model loads
    data = tmp_path / "data"
    blocks = write_synthetic_run(data, SyntheticSpec(num_docs=6))
    (data / "stores/source2/manifest.json").unlink()
    with pytest.raises(StoreError, match=r"source2.*manifest.json is missing"):
        train(_cfg(world, tmp_path / "y", data=str(blocks)))
    (blocks / "manifest.json").unlink()
    with pytest.raises(StoreError, match="manifest.json is missing"):
        train(_cfg(world, tmp_path / "z", data=str(blocks)))
    # blocks over documents a store does not hold: the blocks come from another corpus
    other = write_synthetic_run(tmp_path / "data3", SyntheticSpec(num_docs=40))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["candidates"][1]["store"] = str(data / "stores/source1")
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"blocks-00000.safetensors holds documents 0..39 .*source1"):
        train(_cfg(world, tmp_path / "v", data=str(other)))
    write_synthetic_run(tmp_path / "data2", SyntheticSpec(num_docs=6))
    (tmp_path / "data2/maps/source1.pt").unlink()
    with pytest.raises(StoreError, match="source1.pt.*missing"):
        train(_cfg(world, tmp_path / "w", data=str(tmp_path / "data2/blocks")))


def test_presets_and_command_line():
    import argparse

    from fusellm_kernels.training.config import add_arguments, from_args

    big = preset("llama2-7b", model="m", data="d", output="o").validate(world_size=8)
    assert (big.seq_len, big.global_batch, big.lr, big.warmup_ratio, big.weight_decay, big.grad_clip) == (2048, 128, 1e-5, 0.008, 0.1, 1.0)
    assert (big.beta1, big.beta2, big.lam, big.temperature, big.strategy) == (0.9, 0.95, 0.9, 1.0, "min_ce")
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = from_args(p.parse_args(["--preset", "tiny", "--model", "m", "--data", "d", "--output", "o", "--lr", "3e-4",
                                  "--no-export", "--strategy", "weights", "--source-weights", "1", "0.5", "0"]))
    assert (cfg.lr, cfg.export, cfg.seq_len, cfg.source_weights) == (3e-4, False, 64, (1.0, 0.5, 0.0))
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="--preset"):
        preset("nope")


def test_bench_train_step_quick(tmp_path):
    """The step-time benchmark's CPU mode writes one record per provider with the overhead."""
    from bench.bench_train_step import main
    from bench.common import read_jsonl

    assert main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    records = read_jsonl(tmp_path / "train_step.jsonl")
    assert [r.provider for r in records] == ["fusion", "clm"]
    assert all(r.median_ms > 0 and r.flops > 0 for r in records)
    assert "overhead_pct" in records[0].extra and records[0].extra["timed_steps"] == 3


def test_sampler_is_shard_local_resumable_and_world_size_free():
    from fusellm_kernels.training.data import BlockSampler

    starts = [0, 10, 20, 30, 40]  # four shards of ten blocks; the last two blocks held out
    s = BlockSampler(range(0, 38), 4, seed=3, shard_starts=starts, window=2)
    assert s.peek() == s.peek()
    batches = [s.next_global_batch() for _ in range(12)]  # 9 steps per epoch: into the second epoch
    first_epoch = [i for b in batches[:9] for i in b]
    assert len(set(first_epoch)) == 36 and max(first_epoch) < 38
    assert len({i // 10 for b in batches[:4] for i in b}) <= 2  # the first window: two shards
    assert batches[9] != batches[0]  # a fresh shuffle per epoch
    resumed = BlockSampler(range(0, 38), 4, seed=3, shard_starts=starts, window=2)
    replay = BlockSampler(range(0, 38), 4, seed=3, shard_starts=starts, window=2)
    for _ in range(5):
        replay.next_global_batch()
    resumed.load_state_dict(replay.state_dict())
    assert [resumed.next_global_batch() for _ in range(7)] == batches[5:]
    one = BlockSampler.micro_batches(batches[0], 0, 1, 1)
    two = BlockSampler.micro_batches(batches[0], 0, 2, 1) + BlockSampler.micro_batches(batches[0], 1, 2, 1)
    assert one == two


@pytest.mark.parametrize("fusion_rows", ["labels", "attention"])
def test_fusion_step_equals_plain_fusion_loss(world, fusion_rows):
    """Step 1 of fusion training = `fusion_loss` on a plain model's logits for the same blocks,
    summed and divided by the step's target tokens (the trainer's batching, segments and
    normalisation add nothing); `--fusion-rows attention` is the loss's fusion_mask = the
    real rows."""
    from transformers import AutoModelForCausalLM

    from fusellm_kernels import fusion_loss
    from fusellm_kernels.pipeline.batches import build_batch
    from fusellm_kernels.training.data import BlockSampler, open_data

    out = world["root"] / f"fusion_plain_{fusion_rows}"
    train(_cfg(world, out, max_steps=1, attention="block", weighting="document", export=False, checkpoint_every=0,
               fusion_rows=fusion_rows))
    got = _train_records(out)[0]

    cfg = _cfg(world, out)
    data = open_data(cfg.data, "", cfg.eval_holdout, seq_len=cfg.seq_len, model_vocab=100, fusion=True)
    blocks = [data.blocks[i] for i in BlockSampler(data.train_range, cfg.global_batch, cfg.seed).next_global_batch()]
    batch = build_batch(blocks, data.stores, data.vocab_maps, weighting="document")
    model = AutoModelForCausalLM.from_pretrained(world["model"], attn_implementation="sdpa")
    with torch.no_grad():
        logits = model(batch.input_ids).logits.reshape(-1, 100)
    loss, parts = fusion_loss(logits, batch.labels.reshape(-1), batch.teacher_ids, batch.teacher_logits,
                              teacher_ce=batch.teacher_ce, segment_ids=batch.segment_ids, strategy="min_ce", lam=0.9,
                              reduction="sum", return_parts=True,
                              fusion_mask=batch.attention_mask.reshape(-1) if fusion_rows == "attention" else None)
    n = int((batch.labels >= 0).sum())
    assert got["tokens"] == n
    assert math.isclose(got["loss"], float(loss) / n, rel_tol=1e-5)
    assert math.isclose(got["fusion"], float(parts.fusion) / n, rel_tol=1e-5)
    assert list(got["wins"].values()) == parts.wins.tolist()


@pytest.mark.parametrize("options", [
    dict(strategy="avg_ce", weighting="block"),
    dict(strategy="softmin_ce", weighting="token", ce_temperature=0.5, divergence="kl"),
    dict(strategy="weights", source_weights=(1.0, 0.5, 0.25), eval_holdout=0, eval_every=1),  # + --eval-data
    dict(activation_checkpointing=True, prefetch=False),
], ids=["avg_ce-block", "softmin_ce-token-kl", "weights", "activation-checkpointing"])
def test_other_strategies_and_options_run(world, single, options):
    out = world["root"] / ("opt-" + "-".join(f"{k}" for k in options))
    if "eval_every" in options:
        options = {**options, "eval_data": str(world["blocks"])}
    train(_cfg(world, out, **{"max_steps": 2 if "strategy" in options else 6, "export": False, "checkpoint_every": 0, **options}))
    records = _train_records(out)
    if "eval_every" in options:  # every step, over all 16 blocks of the separate evaluation directory
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval_ppl" in r] == [1, 2]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "ce", "fusion", "grad_norm"))
        assert math.isclose(r["loss"], 0.9 * r["ce"] + 0.1 * r["fusion"], rel_tol=1e-5)
    if "activation_checkpointing" in options:  # recomputation changes nothing
        _close([r["loss"] for r in records], [r["loss"] for r in _train_records(single)], rtol=1e-6)


def test_tied_embeddings_model_trains_and_exports(world, tmp_path):
    """GPT-2 ties its head to the input embedding: the head stays in the root's FSDP unit and the
    export leaves the tie to transformers."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=128, eos_token_id=0,
                               bos_token_id=1)).save_pretrained(tmp_path / "gpt2")
    train(_cfg(world, tmp_path / "run", model=str(tmp_path / "gpt2"), max_steps=2, checkpoint_every=0))
    assert all(math.isfinite(r["loss"]) for r in _train_records(tmp_path / "run"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert "lm_head.weight" not in _weights(tmp_path / "run" / "export")
