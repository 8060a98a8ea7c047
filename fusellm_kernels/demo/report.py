"""The main job's report: one JSON document, the same as a markdown page, and a PNG.

Every number of quality comes from one function (`toy_models.heldout_score`) applied to the
same held-out text: each model's bits per byte, and each trained target's perplexity.

The verdict: with best = min(CLM-only), spread = max(CLM-only) − min(CLM-only) and
m = mean(MinCE seeds), all held-out perplexities, fusion beats CLM-only when
best − m > spread and (best − m) / best ≥ 3 %. AvgCE (and any other strategy) is reported
beside it, not gated. Evaluation noise — how much the numbers would move on other held-out
documents of the same kind — is a bootstrap over held-out documents, reported separately
from the seed spread. A run at toy sizes (`tiny`) says its verdict means nothing. Nothing in
the job is tuned to pass the check; when it fails the report says so with the numbers.
"""
from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any, Callable

import torch

REPORT_FORMAT = "fusellm-fuse-report/2"
MIN_RELATIVE_GAIN = 0.03
BOOTSTRAP = 2000


def verdict(clm: list[float], mince: list[float], *, tiny: bool = False,
            min_gain: float = MIN_RELATIVE_GAIN) -> dict[str, Any]:
    """The gate on held-out perplexities (lower is better)."""
    if not clm or not mince:
        raise ValueError("the verdict needs at least one CLM-only and one MinCE perplexity")
    best, spread = min(clm), max(clm) - min(clm)
    m = sum(mince) / len(mince)
    margin = best - m
    beyond_spread = margin > spread
    enough = margin / best >= min_gain
    if tiny:
        status = "meaningless (toy sizes)"
    elif beyond_spread and enough:
        status = "beats"
    elif margin > 0 and beyond_spread:
        status = "beyond the seed spread, below the gain target"
    elif margin > 0:
        status = "not beyond the seed spread"
    else:
        status = "does not beat"
    return {"clm_best": best, "clm_spread": spread, "mince_mean": m, "margin": margin, "relative_margin": margin / best,
            "beyond_seed_spread": beyond_spread, "meets_gain_target": enough, "min_relative_gain": min_gain,
            "fusion_beats_clm": bool(beyond_spread and enough and not tiny), "status": status,
            "clm_seeds": len(clm), "mince_seeds": len(mince)}


def bootstrap(runs: dict[str, dict[str, Any]], clm: list[str], mince: list[str], *, samples: int = BOOTSTRAP,
              seed: int = 0) -> dict[str, Any]:
    """Resample held-out documents with replacement (the same resample for every run):
    each run's perplexity spread, and the verdict's margin best(CLM) − mean(MinCE) with its
    95 % interval. Deterministic (fixed generator)."""
    names, nll, tok, ppl = _resampled(runs, samples, seed)
    docs = nll.shape[1]
    col = {n: i for i, n in enumerate(names)}
    margin = ppl[:, [col[n] for n in clm]].min(1).values - ppl[:, [col[n] for n in mince]].mean(1)
    lo, hi = torch.quantile(margin, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    # paired: each run against the best CLM-only run on the same resample, in % of the latter
    full = torch.exp(nll.sum(1) / tok.sum(1))
    best = col[min(clm, key=lambda n: float(full[col[n]]))]
    rel = (ppl / ppl[:, best:best + 1] - 1) * 100
    return {"samples": samples, "documents": docs,
            "ppl_std": {n: float(ppl[:, col[n]].std()) for n in names},
            "vs_best_clm_pct_std": {n: float(rel[:, col[n]].std()) for n in names},
            "margin_std": float(margin.std()), "margin_95": [lo, hi]}


def _resampled(runs: dict[str, dict[str, Any]], samples: int, seed: int):
    """(names, nll [R, D], tokens [R, D], perplexity [B, R]) over `samples` resamples of the
    held-out documents, the same resample for every run."""
    names = list(runs)
    nll = torch.tensor([runs[n]["nll"] for n in names], dtype=torch.float64)        # [R, D]
    tok = torch.tensor([runs[n]["tokens"] for n in names], dtype=torch.float64)     # [R, D]
    docs = nll.shape[1]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, docs, (samples, docs), generator=g)
    counts = torch.zeros(samples, docs, dtype=torch.float64).scatter_add_(1, idx, torch.ones(samples, docs, dtype=torch.float64))
    return names, nll, tok, torch.exp((counts @ nll.T) / (counts @ tok.T))


def paired_comparison(runs: dict[str, dict[str, Any]], first: list[str], second: list[str], names: tuple[str, str], *,
                      samples: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Two groups of runs of the same seeds (MinCE renormalised vs with the tail bucket, on
    MinED vs on PTA alignments): each run's and each group's mean perplexity under `names`,
    the difference first − second (> 0: the second is better) and its evaluation noise on
    the verdict's bootstrap resamples (`_resampled`)."""
    got, _, _, ppl = _resampled(runs, samples, seed)
    col = {n: i for i, n in enumerate(got)}
    diff = ppl[:, [col[n] for n in first]].mean(1) - ppl[:, [col[n] for n in second]].mean(1)
    lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    m1 = sum(runs[n]["perplexity"] for n in first) / len(first)
    m2 = sum(runs[n]["perplexity"] for n in second) / len(second)
    a, b = names
    return {a: {n: runs[n]["perplexity"] for n in first}, b: {n: runs[n]["perplexity"] for n in second},
            f"{a}_mean": m1, f"{b}_mean": m2, "difference": m1 - m2, "relative": (m1 - m2) / m1,
            "difference_std": float(diff.std()), "difference_95": [lo, hi]}


def _comparison_md(c: dict[str, Any], first: tuple[str, str], second: tuple[str, str], difference: str,
                   better: str) -> list[str]:
    """The markdown of a `paired_comparison` (with its `train_seconds`): a table row per group
    (first / second: the group's key and its label), then the difference and its noise."""
    rows = [f"| {label} | {', '.join(c[key])} | {c[f'{key}_mean']:.3f} | {c['train_seconds'][key]:.1f} |"
            for key, label in (first, second)]
    return ["| MinCE | runs | mean perplexity | training seconds (all seeds) |", "|---|---|---:|---:|", *rows, "",
            f"{difference} = {c['difference']:+.3f} ({c['relative']:+.2%}; > 0: {better}), evaluation noise "
            f"± {c['difference_std']:.3f}, 95 % interval [{c['difference_95'][0]:.3f}, {c['difference_95'][1]:.3f}]."]


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def _plot(rep: dict[str, Any], runs: list[dict[str, Any]], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    colors = {"clm": "tab:gray", "min_ce": "tab:blue", "avg_ce": "tab:orange", "softmin_ce": "tab:green"}
    colors["min_ce bucket"] = "tab:purple"
    colors["min_ce pta"] = "tab:cyan"
    group = lambda r: "clm" if r["mode"] == "clm" else r["strategy"] + (" bucket" if r.get("teacher_tail") == "bucket" else "") + (" pta" if r.get("alignment") == "pta" else "")  # noqa: E731
    labels = {"clm": "CLM-only", "min_ce": "MinCE", "avg_ce": "AvgCE", "softmin_ce": "SoftminCE", "min_ce bucket": "MinCE, top-k tail",
              "min_ce pta": "MinCE, PTA"}
    v, noise = rep["verdict"], rep["evaluation_noise"]
    best = v["clm_best"]

    # (a) the result: each run's held-out perplexity against the best CLM-only run, in %
    ax = axes[0, 0]
    order = list(dict.fromkeys(group(r) for r in runs))
    for x, g in enumerate(order):
        rs = [r for r in runs if group(r) == g]
        for j, r in enumerate(rs):
            dx = x + (j - (len(rs) - 1) / 2) * 0.25
            y = (r["heldout"]["perplexity"] / best - 1) * 100
            ax.errorbar(dx, y, yerr=noise["vs_best_clm_pct_std"][r["name"]], fmt="o", color=colors.get(g, "k"), capsize=3)
            ax.annotate(f"seed {r['seed']}", (dx, y), textcoords="offset points", xytext=(6, -3), fontsize=7)
    ax.axhspan(0, v["clm_spread"] / best * 100, color="tab:gray", alpha=0.2, label="CLM-only seed range")
    ax.axhline(-v["min_relative_gain"] * 100, color="tab:red", ls=":", label=f"target: −{v['min_relative_gain']:.0%}")
    ax.axhline(-v["relative_margin"] * 100, color="tab:blue", ls="--", lw=1, label=f"MinCE mean {-v['relative_margin']:+.2%}")
    ax.set_xticks(range(len(order)), [labels.get(g, g) for g in order])
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_ylabel(f"held-out perplexity vs the best CLM-only run ({best:.2f}), %")
    ax.set_title(f"Result: {v['status']}\n(error bars: paired bootstrap over held-out documents, 1 s.d.)")
    ax.legend(fontsize=8, loc="best")

    # (b) every model on one scale: bits per byte of the same held-out text
    ax = axes[0, 1]
    names = [*rep["models"], *(r["name"] for r in runs)]
    bpb = [*(m["heldout_bits_per_byte"] for m in rep["models"].values()), *(r["heldout"]["bits_per_byte"] for r in runs)]
    cols = ["tab:purple" if n != "target" else "tab:red" for n in rep["models"]] + [colors.get(group(r), "k") for r in runs]
    ax.barh(range(len(names)), bpb, color=cols)
    for i, b in enumerate(bpb):
        ax.text(b, i, f" {b:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [("target (start)" if n == "target" else n) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min(bpb) * 0.9, max(bpb) * 1.06)
    ax.set_xlabel("held-out bits per byte (lower is better; comparable across tokenizers)")
    ax.set_title("Sources (purple), the target's start (red) and every trained target")

    # (c) training CE (smoothed) and the trainer's own held-out evaluations, second half zoomed
    ax = axes[1, 0]
    lo_hi: list[float] = []
    for r in runs:
        if not r["ce_curve"]:
            continue
        steps, ce = zip(*r["ce_curve"])
        smooth = _ema(list(ce))
        lo_hi += smooth[len(smooth) // 3:]
        ax.plot(steps, smooth, "--" if r["mode"] == "clm" else "-", color=colors.get(group(r), "k"), lw=1, alpha=0.8)
        if r["trainer_eval_curve"]:
            es, ep = zip(*r["trainer_eval_curve"])
            ax.plot(es, [math.log(p) for p in ep], "o", ms=4, color=colors.get(group(r), "k"), alpha=0.7)
            lo_hi += [math.log(p) for p in ep]
    if lo_hi:
        pad = 0.05 * (max(lo_hi) - min(lo_hi) + 1e-6)
        ax.set_ylim(min(lo_hi) - pad, max(lo_hi) + pad)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("CE per target token (nats)")
    ax.set_title("Training CE (EMA 0.1, lines) and the trainer's held-out CE (dots); zoomed")
    ax.legend(handles=[Line2D([], [], color=colors.get(g, "k"), ls="--" if g == "clm" else "-", label=labels.get(g, g))
                       for g in order], fontsize=8)

    # (d) where the fused teacher's weight went
    ax = axes[1, 1]
    cand_colors: dict[str, str] = {}
    palette = ["tab:red", "tab:purple", "tab:green", "tab:brown", "tab:pink", "tab:olive"]
    for r in runs:
        if r["mode"] != "fusion" or not r["weight_mass_curve"]:
            continue
        steps = [s for s, _ in r["weight_mass_curve"]]
        totals = [max(1e-9, sum(m.values())) for _, m in r["weight_mass_curve"]]
        for c in r["weight_mass_curve"][0][1]:
            color = cand_colors.setdefault(c, palette[len(cand_colors) % len(palette)])
            share = [m.get(c, 0.0) / t for (_, m), t in zip(r["weight_mass_curve"], totals)]
            ax.plot(steps, _ema(share, 0.2), {"min_ce": ":", "avg_ce": "-"}.get(r["strategy"], "-."), lw=1.2, color=color)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("share of the fused teacher's weight (EMA 0.2)")
    ax.set_title("Teacher weight per candidate: MinCE dotted (its wins), AvgCE solid")
    ax.legend(handles=[Line2D([], [], color=col, label=Path(c).name) for c, col in cand_colors.items()], fontsize=8)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _markdown(rep: dict[str, Any]) -> str:
    v, noise, c = rep["verdict"], rep["evaluation_noise"], rep["corpus"]
    m = ["# fusellm fuse report", ""]
    if rep["tiny"]:
        m += ["**Toy sizes (`tiny`): this run checks that every stage works; its numbers and verdict mean nothing.**", ""]
    m += [f"Preset `{rep['preset']}`. Corpus: {c['source']}; versions {c['versions']}. Target text "
          f"{c['train']['documents']} documents / {c['train']['bytes']:,} bytes; held out {c['heldout']['documents']} / "
          f"{c['heldout']['bytes']:,} bytes; the sources read the target's text plus {c['extra']['documents']} documents / "
          f"{c['extra']['bytes']:,} bytes. Machine: {rep['machine']['cpus']} CPUs, torch {rep['machine']['torch']}, "
          f"{rep['machine']['workers']} worker(s) × {rep['machine']['threads']} thread(s).", "",
          "## Verdict", "",
          f"- best CLM-only {v['clm_best']:.3f}, CLM-only seed spread {v['clm_spread']:.3f} ({v['clm_seeds']} seeds); "
          f"MinCE mean {v['mince_mean']:.3f} ({v['mince_seeds']} seeds)",
          f"- margin best − MinCE mean = {v['margin']:.3f} ({v['relative_margin']:+.2%}); beyond the seed spread: "
          f"{'yes' if v['beyond_seed_spread'] else 'no'}; ≥ {v['min_relative_gain']:.0%}: {'yes' if v['meets_gain_target'] else 'no'}",
          f"- evaluation noise (bootstrap over {noise['documents']} held-out documents, {noise['samples']} resamples): "
          f"margin ± {noise['margin_std']:.3f}, 95 % interval [{noise['margin_95'][0]:.3f}, {noise['margin_95'][1]:.3f}]",
          f"- **fusion beats CLM-only: {v['fusion_beats_clm']}** ({v['status']})", "",
          *[f"- {line}" for line in rep["notes"]], "",
          "## Held-out results of the target (one function for every model)", "",
          "Eval noise: the s.d. of the run's perplexity against the best CLM-only run's under the bootstrap (paired).", "",
          "| run | perplexity | ± eval noise | bits/byte | vs CLM-only of the same seed | training tokens | steps |",
          "|---|---:|---:|---:|---:|---:|---:|",
          f"| before (start) | {rep['before']['perplexity']:.3f} | | {rep['before']['bits_per_byte']:.4f} | | 0 | 0 |"]
    for r in rep["runs"]:
        paired = r["vs_same_seed_clm"]
        m.append(f"| {r['name']} | {r['perplexity']:.3f} | {noise['vs_best_clm_pct_std'][r['name']]:.2f} % | {r['bits_per_byte']:.4f} | "
                 f"{'' if paired is None else f'{paired:+.3f}'} | {r['tokens']:,} | {r['steps']} |")
    m += ["", "## Models (held-out bits per byte: comparable across tokenizers)", "",
          "| model | parameters | vocabulary | training text (bytes) | steps | bits/byte |", "|---|---:|---:|---:|---:|---:|"]
    for n, info in rep["models"].items():
        m.append(f"| {n} | {info['parameters']:,} | {info['vocab']:,} | {info.get('train_bytes', 0):,} | "
                 f"{info.get('steps', '')} | {info['heldout_bits_per_byte']:.4f} |")
    ov = c["overlap"]
    m += ["", f"Held-out overlap with the training text (exact documents / documents sharing a {ov['target']['ngram_words']}-word "
          f"n-gram): target {ov['target']['exact_documents']} / {ov['target']['documents_sharing_ngram']}, sources "
          f"{ov['sources']['exact_documents']} / {ov['sources']['documents_sharing_ngram']} (after removing "
          f"{c['decontaminated']['dropped_stdlib_documents']} stdlib and {c['decontaminated']['dropped_extra_documents']} "
          "other documents that shared one).",
          "", "## Which candidate the fusion runs took (summed over steps)", "",
          "Wins: rows where the candidate had the largest weight (the same for MinCE and AvgCE, which rank alike); "
          "weight mass: its share of the fused teacher's normalised weight.", "",
          "| run | " + " | ".join(f"{x} wins | {x} mass" for x in rep["candidates"]) + " |",
          "|---|" + "---:|---:|" * len(rep["candidates"])]
    for run, w in rep["wins"].items():
        total = max(1, sum(w.values()))
        mass = rep["weight_mass"][run]
        mtotal = max(1e-9, sum(mass.values()))
        m.append(f"| {run} | " + " | ".join(f"{w.get(x, 0) / total:.1%} | {mass.get(x, 0.0) / mtotal:.1%}"
                                           for x in rep["candidates"]) + " |")
    m += ["", "## Alignment and storage", "", "| model | aligned fraction | store bytes/token | tokens |", "|---|---:|---:|---:|"]
    for n, st in rep["stores"].items():
        af = rep["aligned_fraction"].get(n)
        m.append(f"| {n} | {'—' if af is None else f'{af:.1%}'} | {st['bytes_per_token']:.1f} | {st['tokens']:,} |")
    for n, af in rep["aligned_fraction"].items():
        if n not in rep["stores"]:  # online: aligned inside training, nothing stored
            m.append(f"| {n} (online) | {af:.1%} | | |")
    if "train" in rep["blocks"]:
        m.append(f"| blocks (train) | | {rep['blocks']['train']['bytes_per_token']:.1f} | {rep['blocks']['train']['tokens']:,} |")
    else:  # online: only the held-out part was stored
        m.append("| (online: nothing stored for the training text) | | | |")
    if rep.get("teacher_tail"):
        t = rep["teacher_tail"]
        m += ["", "## The top-k tail (`--teacher-tail bucket`)", "",
              "MinCE with each teacher's mass outside its top-k kept as one bucket (`fusellm train --teacher-tail "
              "bucket`) against MinCE renormalised over the top-k (the original), same seeds and steps.", "",
              *_comparison_md(t, ("renormalize", "renormalize"), ("bucket", "bucket"), "Renormalize − bucket", "the tail helps")]
    if rep.get("pta"):
        p = rep["pta"]
        m += ["", "## Probabilistic token alignment (`--alignment pta`)", "",
              "MinCE trained on blocks whose sources were aligned with `fusellm align --method pta` (each paired row's "
              "teacher from an optimal-transport plan between the source's and the target's top-k) against MinCE on "
              "the MinED alignments (the verdict's runs), same seeds, steps and pairing of positions.", "",
              *_comparison_md(p, ("minED", "MinED"), ("pta", "PTA"), "MinED − PTA", "PTA helps"), "",
              "Cost per source (align seconds; alignment bytes per target token; Sinkhorn):", "",
              "| source | align MinED (s) | align PTA (s) | MinED B/token | PTA B/token | transport plans | "
              "mean iterations | max marginal error | not converged |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, c in p["cost"].items():
            sk = c["sinkhorn"]
            m.append(f"| {n} | {c['minED_seconds']:.1f} | {c['pta_seconds']:.1f} | {c['minED_bytes_per_token']:.1f} | "
                     f"{c['pta_bytes_per_token']:.1f} | {sk['problems']:,} | {sk['mean_iterations']:.1f} | "
                     f"{sk['max_marginal_error']:.1e} | {sk['not_converged']} |")
    if rep.get("online"):
        m += ["", "## Online training: where each run's time went", "",
              "Candidates and alignment run on the prefetch thread while the previous micro-batch trains; "
              "`waited for data` is what training waited for them.", "",
              "| run | steps (s) | waited for data (s) | candidates (s) | alignment (s) |", "|---|---:|---:|---:|---:|"]
        for run, t in rep["online"].items():
            m.append(f"| {run} | {t.get('step_s', 0):.1f} | {t.get('data_s', 0):.1f} | {t.get('candidates_s', 0):.1f} | "
                     f"{t.get('align_s', 0):.1f} |")
    m += ["", "## Time per stage", "",
          "Groups (`[...]`) ran their stages on the worker pool; their wall time is what the run waited, the stages' "
          "own seconds overlap.", "", "| stage | seconds | this run |", "|---|---:|---|"]
    for name, row in rep["stages"].items():
        m.append(f"| {name} | {row['seconds']:.1f} | {'ran' if row['ran'] else 'cached'} |")
    m += [f"| **wall time when built** | {rep['built_wall_seconds']:.1f} | |",
          f"| **this invocation** | {rep['wall_seconds']:.1f} | |", "",
          f"Bytes written by this invocation (before the report's own files): {rep['bytes_written']:,}; run directory: "
          f"{rep['bytes_total']:,}.", "",
          "![results](curves.png)", ""]
    return "\n".join(m)


def _notes(v: dict[str, Any], rep: dict[str, Any]) -> list[str]:
    """Facts that explain the verdict, from the report's own numbers."""
    notes = []
    srcs = {n: m["heldout_bits_per_byte"] for n, m in rep["models"].items() if n != "target"}
    clm_bpb = min(r["bits_per_byte"] for r in rep["runs"] if r["mode"] == "clm")
    best_src = min(srcs.values())
    notes.append("held-out bits/byte: sources " + ", ".join(f"{n} {b:.3f}" for n, b in srcs.items())
                 + f"; target start {rep['models']['target']['heldout_bits_per_byte']:.3f}; best CLM-only run {clm_bpb:.3f} "
                 f"({clm_bpb - best_src:+.3f} from the best source: what the teachers can still pass on)")
    for name, af in rep["aligned_fraction"].items():
        if af < 0.8:
            notes.append(f"{name}: {af:.1%} of target rows aligned; the others get the one-hot next token (plain CE)")
    if v["clm_seeds"] < 3:
        notes.append(f"only {v['clm_seeds']} CLM-only seeds: the spread is a rough estimate of the seed noise")
    if v["margin"] > 0 and v["margin"] < 2 * rep["evaluation_noise"]["margin_std"]:
        notes.append("the margin is within two standard deviations of the evaluation noise")
    return notes


def write_report(root: Path, *, cfg: Any, corpus: dict[str, Any], models: dict[str, Any], prepared: dict[str, Any],
                 teacher: dict[str, Any], aligned: dict[str, Any], blocks: dict[str, Any], runs: list[dict[str, Any]],
                 aligned_pta: dict[str, Any] | None = None,
                 stages: dict[str, Any], keys: dict[str, str], group_of: dict[str, str], ran: dict[str, bool], wall_seconds: float,
                 bytes_written: int, bytes_total: int, say: Callable[[str], None] = print) -> dict[str, Any]:
    import os

    from fusellm_kernels.store.blocks import BlockStore
    from fusellm_kernels.store.format import TeacherStore

    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    stores = {}
    for key in teacher:
        name, part = key.split("/")
        st = TeacherStore(root / "teacher" / (name if part == "train" else f"{name}-{part}"), verify=False)
        size = sum(s.size_bytes for s in st.shards)
        stores[key if part != "train" else name] = {"tokens": st.num_tokens, "bytes": size,
                                                    "bytes_per_token": size / max(1, st.num_tokens)}
    short = {str(root / "models" / n): n for n in models}
    online = bool(getattr(cfg, "online", False))
    if online:  # no training blocks on disk: the candidates ran inside training
        candidates = list(models)
        fusion_runs = [r for r in runs if r["mode"] == "fusion" and r["online"].get("aligned_fraction")]
        aligned = {n: {"aligned_fraction": sum(r["online"]["aligned_fraction"][n] for r in fusion_runs) / len(fusion_runs)}
                   for n in (fusion_runs[0]["online"]["aligned_fraction"] if fusion_runs else {})}
    else:
        bstore = BlockStore(root / "blocks" / "train", verify=False)
        candidates = [short.get(c["name"], Path(c["name"]).name) for c in bstore.candidates]
        bbytes = sum(s.size_bytes for s in bstore.shards)
        btokens = int(bstore.manifest["counts"]["tokens"])

    scores = {r["name"]: r["heldout"] for r in runs}
    runs_by = {r["name"]: r for r in runs}
    clm = [r["name"] for r in runs if r["mode"] == "clm"]
    renormalized = lambda r: r.get("teacher_tail", "renormalize") == "renormalize"  # noqa: E731
    pta = lambda r: r.get("alignment", "minED") == "pta"  # noqa: E731
    min_ce = [r for r in runs if r["mode"] == "fusion" and r["strategy"] == "min_ce"]
    mince = [r["name"] for r in min_ce if renormalized(r) and not pta(r)]  # the verdict's: MinED, renormalised
    mince_bucket = [r["name"] for r in min_ce if not renormalized(r) and not pta(r)]
    mince_pta = [r["name"] for r in min_ce if pta(r)]
    if not mince:
        raise ValueError("the report's verdict needs MinCE runs (strategies must include min_ce)")
    v = verdict([scores[n]["perplexity"] for n in clm], [scores[n]["perplexity"] for n in mince], tiny=cfg.tiny)
    noise = bootstrap(scores, clm, mince)
    clm_by_seed = {r["seed"]: r["heldout"]["perplexity"] for r in runs if r["mode"] == "clm"}
    run_rows = []
    for r in runs:
        paired = clm_by_seed.get(r["seed"]) if r["mode"] == "fusion" else None
        run_rows.append({"name": r["name"], "mode": r["mode"], "strategy": r["strategy"], "seed": r["seed"], "steps": r["steps"],
                         "teacher_tail": r.get("teacher_tail", "renormalize"), "alignment": r.get("alignment", "minED"),
                         "tokens": r["tokens"], "perplexity": r["heldout"]["perplexity"],
                         "bits_per_byte": r["heldout"]["bits_per_byte"],
                         "vs_same_seed_clm": None if paired is None else r["heldout"]["perplexity"] - paired,
                         "trainer_final_eval_ppl": r["trainer_eval_curve"][-1][1] if r["trainer_eval_curve"] else None,
                         "output": r["output"]})
    # the wall time a fresh run needs: the groups' walls plus the stages that ran on their own
    built_wall = sum(stages[n]["seconds"] for n in keys if n.startswith("[") or n not in group_of)
    before = models["target"]["heldout"]
    rep: dict[str, Any] = {
        "format": REPORT_FORMAT, "preset": cfg.preset, "tiny": cfg.tiny,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "workers": cfg.workers, "threads": cfg.threads},
        "corpus": corpus,
        "models": {n: {**{k: val for k, val in m.items() if k not in ("curve", "heldout")},
                       "heldout_bits_per_byte": m["heldout"]["bits_per_byte"]} for n, m in models.items()},
        "before": {"perplexity": before["perplexity"], "bits_per_byte": before["bits_per_byte"]},
        "verdict": v, "evaluation_noise": noise,
        "runs": run_rows,
        "candidates": candidates,
        "wins": {r["name"]: {short.get(k, Path(k).name): val for k, val in r["wins"].items()} for r in runs if r["mode"] == "fusion"},
        "weight_mass": {r["name"]: {short.get(k, Path(k).name): val for k, val in r["weight_mass"].items()}
                        for r in runs if r["mode"] == "fusion"},
        "aligned_fraction": {n: a["aligned_fraction"] for n, a in aligned.items()},
        "stores": stores,
        "blocks": {part: {"blocks": b["blocks"], "tokens": b["tokens"], "bytes": b["bytes_written"]} for part, b in blocks.items()},
        "stages": {n: {"seconds": stages[n]["seconds"], "ran": ran.get(n, False)} for n in keys},
        "built_wall_seconds": built_wall,
        "wall_seconds": wall_seconds, "bytes_written": bytes_written, "bytes_total": bytes_total,
        "files": {"json": str(out / "report.json"), "markdown": str(out / "report.md"), "curves": str(out / "curves.png")},
    }
    seconds = lambda names: sum(stages.get(f"train {n}", {}).get("seconds", 0.0) for n in names)  # noqa: E731
    if mince_bucket:
        tail = paired_comparison(scores, mince, mince_bucket, ("renormalize", "bucket"))
        rep["teacher_tail"] = {**tail, "train_seconds": {"renormalize": seconds(mince), "bucket": seconds(mince_bucket)}}
    if mince_pta:
        same_seeds = [n for n in mince if any(runs_by[n]["seed"] == runs_by[p]["seed"] for p in mince_pta)]
        rep["pta"] = {**paired_comparison(scores, same_seeds or mince, mince_pta, ("minED", "pta")),
                      "train_seconds": {"minED": seconds(same_seeds or mince), "pta": seconds(mince_pta)},
                      "cost": {n: {"minED_seconds": stages.get(f"align {n}", {}).get("seconds", 0.0),
                                   "pta_seconds": stages.get(f"align-pta {n}", {}).get("seconds", 0.0),
                                   "minED_bytes_per_token": a["minED_bytes_per_token"],
                                   "pta_bytes_per_token": a["bytes_per_token"], "sinkhorn": a["sinkhorn"]}
                               for n, a in (aligned_pta or {}).items()}}
    if online:
        rep["online"] = {r["name"]: r["online"] for r in runs}
    else:
        rep["blocks"]["train"]["bytes_per_token"] = bbytes / max(1, btokens)
    rep["notes"] = _notes(v, rep)
    _plot(rep, runs, out / "curves.png")
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(rep))
    say(f"    fusion beats CLM-only: {v['fusion_beats_clm']} ({v['status']}): best CLM-only {v['clm_best']:.3f}, spread "
        f"{v['clm_spread']:.3f}, MinCE mean {v['mince_mean']:.3f} ({v['relative_margin']:+.2%}; evaluation noise "
        f"± {noise['margin_std']:.3f})")
    say(f"report: {out / 'report.md'} (and report.json, curves.png)")
    return rep


def read_report(root: str | Path) -> dict[str, Any]:
    return json.loads((Path(root) / "report" / "report.json").read_text())
