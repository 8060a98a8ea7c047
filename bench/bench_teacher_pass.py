"""Teacher pass: tokens/s and bytes per token against a loop that does what the original does.

    python -m bench.bench_teacher_pass                            # GPU: 8-layer Llama, V in {32000, 128256}
    python -m bench.bench_teacher_pass --quick --device cpu       # CPU, about a minute
    python -m bench.bench_teacher_pass --smoke --device cpu --out /tmp/b   # plumbing only, seconds
    python -m bench.bench_teacher_pass --model PATH --corpus PREPARED      # a real local model and corpus

Providers (same corpus, same model read from the same directory, same run, same machine):
  fusellm_compact   `fusellm teacher` (run_teacher_pass), compact store, k = 10
  fusellm_lossless  the same, lossless store
  reference_loop    the original's recipe: every document padded to max_length, a fixed number
                    of rows per batch, the full logits converted to fp16, topk, int64 ids, the
                    per-sequence CE from the full-vocabulary loss, and the padded arrays
                    (fp16 values, int64 ids, int64 input_ids and attention_mask) written out

Time is end to end per run (model load, tokenisation, forward, reductions, writing), the median
of --repeats runs. tokens/s counts the corpus's real tokens for every provider, so padding
shows up as lost speed; bytes/token divides every byte each provider wrote by the same count.
`flops` is the useful forward work (2 x parameters x real tokens), so `achieved_tflops` shows
the padding waste too, and the floor is that work at the matmul rate measured in the run.

The synthetic model is randomly initialised; its tokenizer is small, so the pass runs with
mask_padded_vocab=False to score and store ids over the model's whole vocabulary V: the
stored ids then take bits(V) bits each, as with a real tokenizer of that size. Before any
timing, the fusellm stores are checked against the reference loop's top-k values on the same
documents; a mismatch fails the run.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    Ceilings,
    Environment,
    Timing,
    append_jsonl,
    environment,
    format_table,
    make_record,
    measure_matmul_tflops,
    resolve_device,
    results_dir,
)

OP = "teacher_pass"
PROVIDERS = ("fusellm_compact", "fusellm_lossless", "reference_loop")
K = 10


@dataclass(frozen=True)
class Setup:
    vocabs: tuple[int, ...]
    hidden: int
    layers: int
    docs: int
    max_length: int
    repeats: int
    ref_batch: int
    batch_tokens: int


def setup_for(args: argparse.Namespace, device: torch.device) -> Setup:
    if args.smoke:
        s = Setup((1000,), 32, 2, 12, 64, 1, 1, 1024)
    elif args.quick or device.type == "cpu":
        s = Setup((32000, 128256), 128, 2, 48, 256, 1, 1, 4096)
    else:
        s = Setup((32000, 128256), 1024, 8, 512, 2048, 2, 4, 16384)
    return Setup(
        tuple(args.vocab) if args.vocab else s.vocabs, s.hidden, s.layers, args.docs or s.docs,
        args.max_length or s.max_length, args.repeats or s.repeats, args.ref_batch or s.ref_batch,
        args.batch_tokens or s.batch_tokens,
    )


# --- synthetic inputs ------------------------------------------------------------------------

_WORDS = ("fusion model token teacher student loss vocabulary align score byte shard corpus the of and a to "
          "in is was for on with as by at from über naïve café 東京 data train layer head norm value").split()


def build_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(50)) for _ in range(200)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>", "<bos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
    hf.save_pretrained(path)
    return hf


def build_model(path: Path, vocab: int, s: Setup, dtype: torch.dtype) -> int:
    """A random Llama-shaped model saved to path; returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=s.hidden, intermediate_size=s.hidden * 11 // 4,
                      num_hidden_layers=s.layers, num_attention_heads=max(1, s.hidden // 64),
                      num_key_value_heads=max(1, s.hidden // 256), max_position_embeddings=s.max_length,
                      eos_token_id=0, bos_token_id=1, initializer_range=0.5)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def build_corpus(work: Path, tok_dir: Path, s: Setup) -> Path:
    """Documents from a few to ~2x max_length tokens, cut by the reference's rule to
    max_length - 1 tokens (so EOS fits, and no provider truncates or windows)."""
    from fusellm_kernels.pipeline.corpus import PrepareConfig, prepare_corpus

    rng = random.Random(1)
    lines = []
    for _ in range(s.docs):
        n = int(min(2 * s.max_length, max(4, rng.lognormvariate(0, 0.8) * s.max_length / 3)))
        lines.append({"text": " ".join(rng.choice(_WORDS) for _ in range(n))})
    import json

    src = work / "docs.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    out = work / "corpus"
    prepare_corpus(PrepareConfig(inputs=(str(src),), output=str(out), split_tokenizers=(str(tok_dir),),
                                 max_tokens=s.max_length - 1, progress=False))
    return out


# --- the providers ---------------------------------------------------------------------------


def run_fusellm(corpus: Path, model: Path, tok: Path, out: Path, fmt: str, s: Setup, device: torch.device) -> dict[str, Any]:
    from fusellm_kernels.pipeline.teacher_pass import TeacherConfig, run_teacher_pass
    from fusellm_kernels.store import TeacherStore

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_teacher_pass(TeacherConfig(
        corpus=str(corpus), model=str(model), tokenizer=str(tok), output=str(out), top_k=K, format=fmt,  # type: ignore[arg-type]
        max_length=s.max_length, batch_tokens=s.batch_tokens, device=str(device), mask_padded_vocab=False, progress=False,
    ))
    seconds = time.perf_counter() - t0
    m = TeacherStore(out).manifest
    return {"seconds": seconds, "tokens": m["counts"]["tokens"], "bytes": m["bytes_per_token"]["total_bytes"],
            "padding_efficiency": summary.extra["padding efficiency"], "id_bits": m["id_bits"]}


def run_reference(corpus: Path, model_dir: Path, tok_dir: Path, out: Path, s: Setup, device: torch.device,
                  keep_docs: int) -> dict[str, Any]:
    """The original's recipe (see the module docstring). Returns timing, bytes and the top-k
    values of the first keep_docs documents for the correctness check."""
    import datasets
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device).eval()
    texts = list(datasets.load_from_disk(str(corpus))["text"])
    L, tokens, kept = s.max_length, 0, []
    for b0 in range(0, len(texts), s.ref_batch):
        rows = [ids + [tok.eos_token_id] for ids in tok(texts[b0 : b0 + s.ref_batch], add_special_tokens=False)["input_ids"]]
        rows = [r[:L] for r in rows]
        input_ids = torch.zeros(len(rows), L, dtype=torch.int64)
        mask = torch.zeros(len(rows), L, dtype=torch.int64)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        tokens += int(mask.sum())
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            labels = torch.where(mask.bool(), input_ids, -100)[:, 1:]
            ce_tok = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     reduction="none").view(len(rows), L - 1)
            ce = ce_tok.sum(1) / (labels != -100).sum(1).clamp_min(1)
            vals, ids = logits.half().topk(K, dim=-1)
        for i, r in enumerate(rows):
            if b0 + i < keep_docs:
                kept.append(vals[i, : len(r)].float().cpu())
        save_file({"per_step_logits": vals.cpu().contiguous(), "per_step_indices": ids.cpu().contiguous(),
                   "input_ids": input_ids.cpu(), "attention_mask": mask.cpu(), "metric_ce": ce.float().cpu()},
                  str(out / f"batch-{b0:06d}.safetensors"))
        del logits, vals, ids
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in out.iterdir())
    return {"seconds": seconds, "tokens": tokens, "bytes": written, "kept": kept,
            "padding_efficiency": tokens / (len(texts) * L)}


def check_against_reference(store_dir: Path, kept: list[torch.Tensor], device: torch.device) -> float:
    """Max |difference| of the stored top-k logits from the reference loop's, relative to
    the largest logit; raises when above the compute dtype's rounding."""
    from fusellm_kernels.store import TeacherStore

    store = TeacherStore(store_dir)
    worst = 0.0
    for doc_id, ref in enumerate(kept):
        got = store.get(doc_id).topk_logits
        scale = float(ref.abs().max()) or 1.0
        worst = max(worst, float((got - ref).abs().max()) / scale)
    limit = 2**-6 if device.type == "cuda" else 2**-9  # bf16 batches vs fp32 + fp16 storage
    if worst > limit:
        raise AssertionError(f"{store_dir}: top-k logits differ from the reference loop by {worst:.3g} (limit {limit:.3g})")
    return worst


def warm_up(model_dir: Path, corpus: Path, device: torch.device) -> None:
    """Imports, the page cache of the model files and the device's first kernels, once and
    untimed, so that no provider pays for them just by running first."""
    import datasets
    from transformers import AutoModelForCausalLM

    datasets.load_from_disk(str(corpus))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device).eval()
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 8, dtype=torch.int64, device=device)).logits.topk(K, dim=-1)
    del model


# --- driver ----------------------------------------------------------------------------------


def timing_of(seconds: list[float]) -> Timing:
    q = torch.tensor(seconds, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(*(float(x) * 1e3 for x in q))


def bench_vocab(vocab: int, s: Setup, device: torch.device, env: Environment, ceilings: Ceilings, work: Path,
                args: argparse.Namespace, providers: tuple[str, ...]) -> list:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        model_dir, tok_dir = Path(args.model), Path(args.tokenizer or args.model)
        from transformers import AutoConfig

        params = None
        vocab = int(AutoConfig.from_pretrained(model_dir, local_files_only=True).vocab_size)
    else:
        tok_dir = work / "tok"
        if not tok_dir.exists():
            build_tokenizer(tok_dir)
        model_dir = work / f"model-{vocab}"
        params = build_model(model_dir, vocab, s, dtype)
    corpus = Path(args.corpus) if args.corpus else (work / "corpus" if (work / "corpus").exists() else build_corpus(work, tok_dir, s))
    warm_up(model_dir, corpus, device)
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in providers}
    ref_kept: list[torch.Tensor] = []
    for rep in range(s.repeats):
        for p in providers:
            out = work / f"out-{p}-{vocab}"
            if p == "reference_loop":
                r = run_reference(corpus, model_dir, tok_dir, out, s, device, keep_docs=8)
                ref_kept = r.pop("kept")
            else:
                r = run_fusellm(corpus, model_dir, tok_dir, out, p.removeprefix("fusellm_"), s, device)
            runs[p].append(r)
            print(f"  V={vocab} {p} run {rep + 1}/{s.repeats}: {r['tokens'] / r['seconds']:,.0f} tok/s, "
                  f"{r['bytes'] / r['tokens']:.1f} B/token", flush=True)
    checks: dict[str, float] = {}
    if "reference_loop" in providers:
        for p in providers:
            if p != "reference_loop":
                checks[p] = check_against_reference(work / f"out-{p}-{vocab}", ref_kept, device)
    tokens = runs[providers[0]][0]["tokens"]
    if params is None:
        from transformers import AutoModelForCausalLM

        params = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).parameters())
    flops = 2 * params * tokens
    shape = {"V": vocab, "K": K, "docs": s.docs if not args.corpus else None, "tokens": tokens,
             "max_length": s.max_length, "hidden": s.hidden if not args.model else None,
             "layers": s.layers if not args.model else None}
    records = []
    ref_rate = None
    if "reference_loop" in runs:
        ref_rate = tokens / statistics.median(r["seconds"] for r in runs["reference_loop"])
    for p in providers:
        rs = runs[p]
        if any(r["tokens"] != tokens for r in rs):
            raise AssertionError(f"{p} counted {rs[0]['tokens']} tokens, the others {tokens}")
        t = timing_of([r["seconds"] for r in rs])
        rate = tokens / (t.median_ms / 1e3)
        extra = {
            "tokens_per_s": round(rate, 1),
            "bytes_per_token": round(rs[0]["bytes"] / tokens, 3),
            "bytes_written": rs[0]["bytes"],
            "padding_efficiency": round(rs[0]["padding_efficiency"], 4),
            "repeats": len(rs),
            "params": params,
            "model": str(args.model) if args.model else "synthetic llama (random init)",
        }
        if "id_bits" in rs[0]:
            extra["id_bits"] = rs[0]["id_bits"]
        if ref_rate:
            extra["speedup_vs_reference_loop"] = round(rate / ref_rate, 3)
        if p in checks:
            extra["max_rel_diff_vs_reference_loop"] = checks[p]
        records.append(make_record(op=OP, provider=p, shape=shape, dtype=dtype, env=env, timing=t, flops=flops,
                                   ceilings=ceilings, extra=extra))
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="small model and corpus (the CPU default)")
    ap.add_argument("--smoke", action="store_true", help="tiny everything: checks the plumbing, not speed")
    ap.add_argument("--vocab", type=int, nargs="+", default=None, help="model vocabularies to run")
    ap.add_argument("--docs", type=int, default=None, help="documents in the synthetic corpus")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per row (the reference pads to it)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per provider (the median is reported)")
    ap.add_argument("--ref-batch", type=int, default=None, help="rows per batch of the reference loop")
    ap.add_argument("--batch-tokens", type=int, default=None, help="--batch-tokens of the fusellm pass")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ", ".join(PROVIDERS))
    ap.add_argument("--model", default=None, help="a real local model directory instead of the synthetic one")
    ap.add_argument("--tokenizer", default=None, help="its tokenizer, when not in --model")
    ap.add_argument("--corpus", default=None, help="a corpus prepared by `fusellm prepare` (with --model)")
    ap.add_argument("--out", default=None, help="results directory (default: bench/results/<card>/)")
    ap.add_argument("--workdir", default=None, help="where models and stores are written (default: a temp dir)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    providers = tuple(p for p in args.providers.split(",") if p)
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        ap.error(f"unknown providers {sorted(unknown)}")
    if args.corpus and not args.model:
        ap.error("--corpus needs --model (the synthetic corpus is built for the synthetic tokenizer)")
    s = setup_for(args, device)
    env = environment(device)
    ceilings = Ceilings(matmul_flops_per_s=measure_matmul_tflops(device, rep_ms=100.0))
    out_dir = Path(args.out) if args.out else results_dir(env.card)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_teacher_"))
    work.mkdir(parents=True, exist_ok=True)
    records = []
    try:
        for vocab in (s.vocabs if not args.model else (0,)):
            records += bench_vocab(vocab, s, device, env, ceilings, work, args, providers)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    for r in records:
        append_jsonl(out_dir / f"{OP}.jsonl", r)
    print(format_table(records))
    for r in records:
        print(f"{r.shape['V']:>7} {r.provider:<17} {r.extra['tokens_per_s']:>12,.0f} tok/s  "
              f"{r.extra['bytes_per_token']:>7.2f} B/token  x{r.extra.get('speedup_vs_reference_loop', float('nan')):.2f} vs reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
