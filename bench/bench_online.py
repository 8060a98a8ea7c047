"""Online against offline fusion: what a training token costs each way, and how much of the
live candidates' work hides behind the training step.

    python -m bench.bench_online --device cpu                  # toy models on a CPU (~2 minutes)
    python -m bench.bench_online --quick --device cpu --out /tmp/b   # plumbing check (~30 s)
    python -m bench.bench_online --device cuda --hidden 2048 --layers 16 --seq-len 2048   # gpu_check.sh's step

One target and two sources of other tokenizer families (Llama / byte-level BPE, GPT-2 /
Metaspace BPE, GPT-NeoX / Metaspace unigram; randomly initialised: only time is measured) on
the demo corpus (Python docstrings). Providers, each on the same documents, blocks and steps:

  offline        `fusellm teacher` (3 passes), `fusellm align` (2), `fusellm assemble`, then
                 `fusellm train`: the stages' wall seconds per training token are in `extra`
                 (`prepare_s_per_token`), the timing is the training step
  online         `fusellm train --online`: the candidates' passes and the alignment run on the
                 prefetch thread while the previous micro-batch trains
  online_w<N>    the same with `--align-workers N` (alignment in N worker processes)

Timing: the trainer's `step_s` per optimiser step, the first step (model loads, caches)
dropped; `extra.tokens_per_s` per provider; for the online providers `extra.hidden_share` =
1 − waited / (candidates + alignment): the share of the live work that training did not wait
for (`data_s` is the trainer's wait for its batch). `extra.offline_total_s_per_token` =
offline preparation + training seconds per training token, against the online one.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import QUANTILES, Timing, append_jsonl, environment, format_table, make_record, resolve_device, results_dir

OP = "online_fusion"


@dataclasses.dataclass(frozen=True)
class Setup:
    target_chars: int
    hidden: int
    layers: int
    vocab: int
    seq_len: int
    global_batch: int
    micro_batch: int
    steps: int
    align_workers: tuple[int, ...]


def setup_for(args: argparse.Namespace, device: torch.device) -> Setup:
    if args.quick:
        base = Setup(8_000, 32, 2, 400, 64, 4, 2, 3, (1,))
    elif device.type == "cuda":
        base = Setup(150_000, 2048, 16, 32_000, 2048, 8, 2, 5, (2,))  # a ~0.9B target, two ~0.5B sources
    else:
        base = Setup(60_000, 96, 3, 2048, 128, 8, 4, 10, (1,))
    over = {k: v for k, v in (("hidden", args.hidden), ("layers", args.layers), ("seq_len", args.seq_len),
                              ("steps", args.steps)) if v}
    return dataclasses.replace(base, **over)


def build_inputs(root: Path, s: Setup) -> tuple[Path, dict[str, Path]]:
    """The prepared corpus and three model folders (target first)."""
    from fusellm_kernels.demo.corpus import CorpusSpec, build_corpus, read_texts
    from fusellm_kernels.demo.toy_models import ModelSpec, build_model, save, train_tokenizer
    from fusellm_kernels.pipeline.corpus import PrepareConfig, prepare_corpus

    files = build_corpus(root / "corpus", CorpusSpec(target_chars=s.target_chars, extra_chars=1_000, stdlib_chars=4 * s.target_chars,
                                                     packages=()))
    texts = read_texts(files.train)
    heads = max(1, s.hidden // 64) if s.hidden >= 256 else 4
    specs = {"target": ModelSpec("llama", "bytelevel_bpe", s.vocab, s.hidden, s.layers, heads, s.seq_len, 0, seed=3),
             "gpt2": ModelSpec("gpt2", "metaspace_bpe", s.vocab, s.hidden, max(1, s.layers // 2), heads, s.seq_len, 0, seed=1),
             "neox": ModelSpec("gpt_neox", "metaspace_unigram", s.vocab, s.hidden, max(1, s.layers // 2), heads, s.seq_len, 0,
                               seed=2)}
    models = {}
    for name, spec in specs.items():
        tok = train_tokenizer(spec.tokenizer, texts, spec.vocab_size)
        models[name] = save(build_model(spec, tok), tok, root / "models" / name)
    prepare_corpus(PrepareConfig(inputs=(str(files.train),), output=str(root / "prepared"),
                                 split_tokenizers=tuple(str(p) for p in models.values()), max_tokens=s.seq_len - 8,
                                 progress=False))
    return root / "prepared", models


def offline_prepare(root: Path, corpus: Path, models: dict[str, Path], s: Setup, device: torch.device) -> tuple[Path, dict[str, float]]:
    """The three offline stages; their wall seconds."""
    from fusellm_kernels.pipeline.align_job import AlignConfig, run_align
    from fusellm_kernels.pipeline.assemble import AssembleConfig, run_assemble
    from fusellm_kernels.pipeline.teacher_pass import TeacherConfig, run_teacher_pass

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    for name, path in models.items():
        run_teacher_pass(TeacherConfig(corpus=str(corpus), model=str(path), output=str(root / "teacher" / name), top_k=10,
                                       device=device.type, progress=False))
    seconds["teacher_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in list(models)[1:]:
        run_align(AlignConfig(target=str(root / "teacher" / "target"), source=str(root / "teacher" / name),
                              output=str(root / "align" / name), progress=False))
    seconds["align_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_assemble(AssembleConfig(target=str(root / "teacher" / "target"),
                                sources=tuple(str(root / "align" / n) for n in list(models)[1:]),
                                output=str(root / "blocks"), block_len=s.seq_len, progress=False))
    seconds["assemble_s"] = time.perf_counter() - t0
    return root / "blocks", seconds


def train_steps(out: Path, s: Setup, device: torch.device, **kw: Any) -> list[dict[str, Any]]:
    from fusellm_kernels.training.config import TrainConfig
    from fusellm_kernels.training.metrics import read_metrics
    from fusellm_kernels.training.train import train

    cfg = TrainConfig(output=str(out), seq_len=s.seq_len, global_batch=s.global_batch, micro_batch=s.micro_batch,
                      max_steps=s.steps + 1, epochs=1_000_000, lr=1e-4, warmup_ratio=0.0, strategy="min_ce", weighting="document",
                      device=device.type, export=False, resume=False, progress=False, plot=False, checkpoint_every=0,
                      top_k=10, **kw)
    train(cfg)
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][1:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes, a few steps (a CPU check of the plumbing)")
    p.add_argument("--out", default=None, help="results directory (default: bench/results/<card>/)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size of every model")
    p.add_argument("--layers", type=int, default=None, help="the target's layers (the sources get half)")
    p.add_argument("--seq-len", type=int, default=None, help="block length (and every model's context)")
    p.add_argument("--steps", type=int, default=None, help="timed optimiser steps per provider")
    args = p.parse_args(argv)
    for flag in ("hidden", "layers", "seq_len", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    device = resolve_device(args.device)
    s = setup_for(args, device)
    env = environment(device)
    out_dir = Path(args.out) if args.out else results_dir(env.card)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / f"{OP}.jsonl"
    shape = {"hidden": s.hidden, "layers": s.layers, "V": s.vocab, "seq_len": s.seq_len, "global_batch": s.global_batch,
             "micro_batch": s.micro_batch, "S": 3, "K": 10}
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"building the corpus and 3 models ({s.hidden} hidden, {s.layers} target layers) ...", flush=True)
        corpus, models = build_inputs(root, s)
        target, sources = str(models["target"]), tuple(str(m) for n, m in models.items() if n != "target")
        print("offline: teacher, align, assemble ...", flush=True)
        blocks, prep = offline_prepare(root, corpus, models, s, device)
        runs: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
        runs["offline"] = (train_steps(root / "runs" / "offline", s, device, model=target, data=str(blocks)), prep)
        for workers in (0, *s.align_workers):
            name = "online" if workers == 0 else f"online_w{workers}"
            print(f"{name} ...", flush=True)
            runs[name] = (train_steps(root / "runs" / name, s, device, model=target, online=True, corpus=str(corpus),
                                      candidate=sources, align_workers=workers), {})
        for name, (steps, extra) in runs.items():
            ms = torch.tensor([r["step_s"] * 1e3 for r in steps], dtype=torch.float64)
            q = ms.quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
            tokens = statistics.mean(r["tokens"] for r in steps)
            info: dict[str, Any] = {"tokens_per_step": tokens, "tokens_per_s": tokens / (q[0] / 1e3), "timed_steps": len(steps)}
            if name == "offline":
                from fusellm_kernels.store.blocks import BlockStore

                tokens_trained = int(BlockStore(blocks, verify=False).manifest["counts"]["tokens"])
                prep_s = sum(extra.values())
                info.update(extra, prepare_s=prep_s, corpus_tokens=tokens_trained,
                            prepare_s_per_token=prep_s / max(1, tokens_trained),
                            offline_total_s_per_token=prep_s / max(1, tokens_trained) + (q[0] / 1e3) / tokens)
            else:
                cand = sum(r.get("candidates_s", 0.0) for r in steps)
                align = sum(r.get("align_s", 0.0) for r in steps)
                waited = sum(r.get("data_s", 0.0) for r in steps)
                info.update(candidates_s=cand, align_s=align, waited_s=waited,
                            hidden_share=max(0.0, 1.0 - waited / (cand + align)) if cand + align > 0 else None,
                            online_total_s_per_token=(q[0] / 1e3) / tokens,
                            aligned_fraction=steps[-1].get("aligned_fraction"))
            records.append(make_record(op=OP, provider=name, shape=shape, dtype=dtype, env=env, timing=Timing(*q),
                                       extra=info))
    for r in records:
        append_jsonl(results, r)
    print(format_table(records))
    for r in records:
        e = r.extra
        if r.provider == "offline":
            print(f"offline: preparation {e['prepare_s']:.1f} s for {e['corpus_tokens']:,} tokens "
                  f"({e['prepare_s_per_token'] * 1e3:.3f} ms/token) + training {1e3 / e['tokens_per_s']:.3f} ms/token")
        else:
            hidden = "n/a" if e["hidden_share"] is None else f"{e['hidden_share']:.0%}"
            print(f"{r.provider}: training {1e3 / e['tokens_per_s']:.3f} ms/token; candidates {e['candidates_s']:.1f} s, "
                  f"alignment {e['align_s']:.1f} s, waited {e['waited_s']:.1f} s: {hidden} hidden")
    print(f"results in {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
