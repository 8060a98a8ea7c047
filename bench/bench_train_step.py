"""Training step time: fusion vs CLM-only, same model, same blocks, same steps, same card.

    python -m bench.bench_train_step                          # GPU: 8-layer Llama (hidden 2048, V 32 000), seq 2048, ~60 s
    python -m bench.bench_train_step --layers 32 --steps 20   # closer to a 7B step's proportions
    python -m bench.bench_train_step --quick --device cpu --out /tmp/b   # CPU plumbing check, ~15 s

Both providers run the real trainer (`fusellm_kernels.training.train.train`) on one rank: FSDP2, bf16
parameters on CUDA, the fused lm_head loss, data read from synthetic teacher stores and blocks
(`fusellm_kernels.training.synthetic`, the same files for both). A step's time is the trainer's own `step_s`
(data read + teacher gather + forward + backward + clipping + AdamW, ending in the step's one
host sync); the first `--warmup` steps are not counted.

  fusion  λ·CE + 0.1·divergence to the MinCE-fused teacher of 3 candidates × top-10 (per document)
  clm     CE only through the same fused head (λ = 1, no teacher tensors gathered)

The fusion loss's cost is the fusion median over the clm median; the project's target is at
most 5 % more (`extra.overhead_pct`, `extra.within_target`). flops = the model's training
FLOPs per step (6 × matmul parameters + attention, per token), so achieved_tflops / the
measured bf16 matmul rate is the MFU against this card's own ceiling.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.common import (
    Ceilings,
    Timing,
    append_jsonl,
    environment,
    format_table,
    make_record,
    measure_matmul_tflops,
    resolve_device,
    results_dir,
)

OP = "train_step"
PROVIDERS = ("fusion", "clm")
TARGET_OVERHEAD_PCT = 5.0


@dataclass(frozen=True)
class Setup:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    seq_len: int
    global_batch: int
    micro_batch: int
    warmup: int
    steps: int


def setup_for(quick: bool, device: torch.device) -> Setup:
    if quick or device.type == "cpu":
        return Setup(64, 2, 4, 128, 1000, 128, 4, 2, 1, 3)
    return Setup(2048, 8, 16, 5632, 32000, 2048, 8, 4, 2, 8)


def build_inputs(root: Path, s: Setup) -> tuple[Path, Path]:
    """A random Llama of the setup's size (saved in bf16) and synthetic stores + blocks for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusellm_kernels.training.synthetic import SyntheticSpec, write_synthetic_run

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                      num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=s.seq_len)
    with torch.device("cpu"):
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "model")
    blocks_needed = (s.warmup + s.steps) * s.global_batch
    spec = SyntheticSpec(vocab=s.vocab, source_vocabs=(s.vocab + 17, s.vocab * 3 // 2), num_docs=blocks_needed * 3,
                         min_len=s.seq_len // 8, max_len=s.seq_len * 2 // 3, block_len=s.seq_len, k=10, seed=0)
    return root / "model", write_synthetic_run(root / "data", spec)


def run_provider(provider: str, model: Path, blocks: Path, out: Path, s: Setup, device: torch.device) -> list[dict]:
    from fusellm_kernels.training.config import TrainConfig
    from fusellm_kernels.training.metrics import read_metrics
    from fusellm_kernels.training.train import train

    cfg = TrainConfig(model=str(model), data=str(blocks), output=str(out / provider), mode=provider, seq_len=s.seq_len,
                      global_batch=s.global_batch, micro_batch=s.micro_batch, max_steps=s.warmup + s.steps, lr=1e-5,
                      warmup_ratio=0.0, strategy="min_ce", weighting="document", device=device.type, export=False,
                      resume=False, progress=False, plot=False, checkpoint_every=0, keep_checkpoints=1)
    train(cfg)
    return [r for r in read_metrics(out / provider / "metrics.jsonl") if "loss" in r][s.warmup:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (a CPU check of the plumbing)")
    p.add_argument("--out", default=None, help="results directory (default: bench/results/<card>/)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 8 on GPU; a deeper model "
                   "makes the head, and so the fusion loss, a smaller part of the step)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per provider (default: 8 on GPU)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    s = setup_for(args.quick, device)
    s = replace(s, layers=args.layers or s.layers, steps=args.steps or s.steps)
    env = environment(device)
    out_dir = Path(args.out) if args.out else results_dir(env.card)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / f"{OP}.jsonl"
    ceilings = Ceilings(matmul_flops_per_s=measure_matmul_tflops(device))
    shape = {"hidden": s.hidden, "layers": s.layers, "V": s.vocab, "seq_len": s.seq_len, "global_batch": s.global_batch,
             "micro_batch": s.micro_batch, "S": 3, "K": 10}
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    records, medians = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, blocks = build_inputs(root, s)
        for provider in PROVIDERS:
            steps = run_provider(provider, model, blocks, root / "runs", s, device)
            ms = torch.tensor([r["step_s"] * 1e3 for r in steps], dtype=torch.float64)
            q = ms.quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
            medians[provider] = q[0]
            tokens = steps[0]["tokens"]
            extra = {"tokens_per_step": tokens, "tokens_per_s": tokens / (q[0] / 1e3), "mfu_vs_spec": steps[0].get("mfu"),
                     "peak_mem_gib": max(r["peak_mem_gib"] for r in steps), "timed_steps": len(steps), "loss_last": steps[-1]["loss"]}
            records.append(make_record(op=OP, provider=provider, shape=shape, dtype=dtype, env=env, timing=Timing(*q),
                                       flops=int(steps[0]["model_flops"]), ceilings=ceilings, extra=extra))
    fusion = records[0]
    overhead = 100.0 * (medians["fusion"] / medians["clm"] - 1.0)
    fusion.extra.update(overhead_pct=round(overhead, 2), within_target=overhead <= TARGET_OVERHEAD_PCT)
    for r in records:
        append_jsonl(results, r)
    print(format_table(records))
    print(f"fusion adds {overhead:+.1f} % to the step (target ≤ {TARGET_OVERHEAD_PCT:.0f} %); results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
