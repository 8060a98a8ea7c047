"""``fusellm <stage> ...``: the command line of the pipeline.

Stages run in order, each reading the previous one's output directory:

    fusellm prepare data/*.jsonl --output corpus/ [--split-tokenizers tok_a tok_b]
    fusellm teacher --corpus corpus/ --model models/target --output teacher/target
    fusellm teacher --corpus corpus/ --model models/source1 --output teacher/source1
    torchrun --standalone --nproc-per-node 8 -m fusellm_kernels.cli teacher ...   (data-parallel)

Every stage ends with a summary (documents, tokens, bytes, time, tokens/s) and can append it
as one JSON line to ``--summary-json``. A later stage adds itself with `register_stage`.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from fusellm_kernels.pipeline.summary import RunSummary


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps the descriptions' line breaks."""


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
    p.add_argument("--num-proc", type=int, default=1, help="worker processes for splitting")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def _prepare_run(a: argparse.Namespace) -> RunSummary:
    from fusellm_kernels.pipeline.corpus import PrepareConfig, prepare_corpus

    return prepare_corpus(PrepareConfig(
        inputs=tuple(a.inputs), output=a.output, text_field=a.text_field, txt_unit=a.txt_unit, split=a.split,
        split_tokenizers=tuple(a.split_tokenizers), max_tokens=a.max_tokens, keep_empty=a.keep_empty,
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
    from fusellm_kernels.store.manifest import StoreError

    return (CorpusError, TeacherPassError, StoreError)


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
