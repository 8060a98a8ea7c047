"""Plot a results file written by any benchmark under bench/ (a step apart from measuring).

    python -m bench.plot bench/results/<card>/fusion_loss.jsonl [--out fusion_loss.png]

One PNG per (op, card) in the file: grouped bars of the median time per provider for each
shape, p20-p80 as error bars, the measured floor as a dashed line across each group and
each bar labelled with its ratio to that floor. A file holding several runs (results files
are appended to) is plotted from the latest record of each (op, card, provider, shape, dtype).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or GPU machines
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import BenchRecord, read_jsonl, sanitise  # noqa: E402


def latest(records: list[BenchRecord]) -> list[BenchRecord]:
    """The last record per key, in order of first appearance (files are appended in time order)."""
    keep: dict[tuple, BenchRecord] = {}
    for r in records:
        keep[(r.op, r.card, r.provider, json.dumps(r.shape, sort_keys=True), r.dtype)] = r
    return list(keep.values())


def _shape_tick(shape: dict, dtype: str) -> str:
    return "\n".join(f"{k}={v}" for k, v in shape.items()) + f"\n{dtype}"


def plot_group(records: list[BenchRecord], out: Path) -> Path:
    """One figure for records of a single op on a single card."""
    timed = [r for r in records if not r.skipped]
    shapes: list[str] = []
    providers: list[str] = []
    for r in records:
        key = _shape_tick(r.shape, r.dtype)
        if key not in shapes:
            shapes.append(key)
        if not r.skipped and r.provider not in providers:
            providers.append(r.provider)  # a provider skipped everywhere gets no empty bar slot
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(shapes) * len(providers) * 0.45), 5.0))
    colors = plt.get_cmap("tab10")
    for j, provider in enumerate(providers):
        rows = [(shapes.index(_shape_tick(r.shape, r.dtype)), r) for r in timed if r.provider == provider]
        if not rows:
            continue
        xs = [i - 0.4 + (j + 0.5) * width for i, _ in rows]
        med = [r.median_ms for _, r in rows]
        err = [[m - (r.p20_ms or m) for m, (_, r) in zip(med, rows)], [(r.p80_ms or m) - m for m, (_, r) in zip(med, rows)]]
        bars = ax.bar(xs, med, width, yerr=err, capsize=2, label=provider, color=colors(j % 10))
        for bar, (_, r) in zip(bars, rows):
            label = f"{r.ratio_to_floor:.2f}×" if r.ratio_to_floor else f"{r.median_ms:.3g}"
            top = max(bar.get_height(), r.p80_ms or 0.0)  # above the error bar, not through it
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom",
                        fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
    floors = {shapes.index(_shape_tick(r.shape, r.dtype)): r.floor_ms for r in records if r.floor_ms}
    for i, floor in floors.items():
        ax.hlines(floor, i - 0.45, i + 0.45, colors="black", linestyles="dashed", label="floor" if i == min(floors) else None)
    values = [r.median_ms for r in timed] + list(floors.values())
    if values and max(values) / max(min(values), 1e-12) > 30:
        ax.set_yscale("log")  # the dense baselines sit 20-30× above the floor; linear hides the fast bars
    ax.set_xticks(range(len(shapes)), shapes, fontsize=7)
    ax.set_ylabel("median ms (forward + backward where applicable)")
    last = records[-1]
    skipped = sorted({r.provider for r in records if r.skipped})
    ax.set_title(f"{last.op} on {last.card}\ntorch {last.torch}, triton {last.triton}, commit {last.commit}, {last.date[:10]}", fontsize=9)
    if skipped:
        ax.text(0.01, 0.99, "skipped somewhere: " + ", ".join(skipped), transform=ax.transAxes, fontsize=7, va="top")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.15)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_file(path: Path, out: Path | None = None) -> list[Path]:
    """PNGs for every (op, card) in `path`; `out` names the file (suffixed when there are several)."""
    records = latest(read_jsonl(path))
    groups: dict[tuple[str, str], list[BenchRecord]] = {}
    for r in records:
        groups.setdefault((r.op, r.card), []).append(r)
    base = out or path.with_suffix(".png")
    written = []
    for (op, card), rows in groups.items():
        target = base if len(groups) == 1 else base.with_name(f"{base.stem}_{sanitise(op)}_{sanitise(card)}{base.suffix}")
        written.append(plot_group(rows, target))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plot a bench results file (JSON lines) as PNG.")
    p.add_argument("jsonl", type=Path)
    p.add_argument("--out", type=Path, help="PNG path (default: the results file with .png)")
    args = p.parse_args(argv)
    written = plot_file(args.jsonl, args.out)
    if not written:
        print(f"no records in {args.jsonl}")
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
