"""Step metrics: a JSON-lines log (every step, rank 0), a console line, and a PNG of the curves.

One record per optimiser step: loss and its parts (ce, fusion: each summed over the step's
rows and divided by the same global target-token count, so loss = λ·ce + (1 − λ)·fusion),
wins per candidate (rows where it held the largest weight), weight_mass per candidate (its
normalised fused-teacher weight summed over the fusion rows), grad_norm (before clipping), lr,
tokens (real target tokens of the step, all ranks), tokens_per_s, model_flops (training FLOPs
of those tokens: 6 × matmul parameters + attention, per token), mfu (model_flops per second
over the card's dense bf16 peak, CUDA cards with a known peak), peak_mem_gib, step_s (data +
forward + backward + optimiser, ending in the step's one host sync), data_s (of which host
time building batches: reading the stores, launching the teacher gather), epoch. Evaluation records carry eval_ppl and eval_loss instead.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


class MetricsLog:
    """Appends records to OUTPUT/metrics.jsonl on rank 0 and prints a short line every `every` steps."""

    def __init__(self, path: Path, is_main: bool, every: int) -> None:
        self.path, self.is_main, self.every = path, is_main, every

    def keep_until(self, step: int) -> None:
        """Drop records after `step` (0: all): a resumed run logs the steps after its checkpoint again."""
        if not self.is_main or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if "eval_ppl" in record:
            _say(f"step {record['step']:>6}  eval loss {record['eval_loss']:.4f}  ppl {record['eval_ppl']:.3f}")
        elif record["step"] % self.every == 0:
            wins = " ".join(f"{k}={v}" for k, v in record.get("wins", {}).items())
            wins = f"  wins {wins}" if wins else ""
            mfu = f"  mfu {record['mfu']:.1%}" if record.get("mfu") is not None else ""
            _say(f"step {record['step']:>6}  loss {record['loss']:.4f} (ce {record['ce']:.4f} fusion {record['fusion']:.4f})"
                 f"  |g| {record['grad_norm']:.3f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s{mfu}"
                 f"  mem {record['peak_mem_gib']:.2f} GiB{wins}")


def _say(line: str) -> None:
    """A console line that does not tear the progress bar (tqdm moves the bar below it)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(log: str | Path, png: str | Path) -> Path:
    """Loss and parts, evaluation perplexity, learning rate, gradient norm and throughput against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(log)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_ppl" in r]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    steps = [r["step"] for r in train]
    ax = axes[0, 0]
    for key in ("loss", "ce", "fusion"):
        ax.plot(steps, [r[key] for r in train], label=key)
    ax.set_title("training loss (per target token)")
    ax.legend()
    ax = axes[0, 1]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], marker="o")
    ax.set_title("held-out CLM perplexity")
    ax = axes[1, 0]
    ax.plot(steps, [r["grad_norm"] for r in train], label="grad norm")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in train], color="tab:red", label="lr")
    ax.set_title("gradient norm (blue) and learning rate (red)")
    ax = axes[1, 1]
    ax.plot(steps, [r["tokens_per_s"] for r in train])
    ax.set_title("tokens/s")
    for a in axes.flat:
        a.set_xlabel("step")
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
