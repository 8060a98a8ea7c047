"""Stage 1: corpus preparation.

Turns local files (text, JSON lines, Parquet) or a `datasets` dataset saved on disk into one
`datasets` dataset of documents, saved with `save_to_disk`, with these columns:

    doc_id        int64   stable id: the row's position in the prepared corpus. Every later
                          stage keys its records by it.
    text          string  the document (exactly as read; split pieces concatenate back to it)
    text_hash     int64   63-bit BLAKE2b hash of the UTF-8 text; stored with every teacher
                          record, so records of two models pair only when id *and* text agree
    source        string  the input file (or dataset) the document came from
    source_index  int64   its row (or line, or paragraph) in that input
    chunk         int32   piece number when the split rule cut the document, else 0

plus ``fusellm_corpus.json``: format version, counts, the split settings and a fingerprint
over all (doc_id, text_hash) pairs that teacher stores record to refuse mixing corpora.

Bad input records (invalid UTF-8, a line that is not JSON, a text that is not a string, a
missing text field) stop the stage with the file and line named; with ``--skip-bad-records``
they are skipped instead, counted in the manifest and the summary. JSON files are read here,
not by `datasets`' JSON builder, because only a line-by-line reader can name the line.

Split rule (``--split-tokenizers``, the reference's stage 1): a document is kept whole when
every listed tokenizer yields at most ``max_tokens`` tokens for it (special tokens not
counted). Otherwise it is cut with the tokenizer that yields the most tokens, every
``max_tokens`` of its tokens, at the character where a token ends — so the pieces
concatenate exactly to the text (the reference decodes token chunks, which need not) — and
each piece is checked again against every tokenizer and cut further if one still exceeds.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from fusellm_kernels.pipeline.summary import RunSummary
from fusellm_kernels.store.manifest import StoreError, write_json_atomic

CORPUS_FORMAT = "fusellm-corpus"
CORPUS_VERSION = 1
CORPUS_MANIFEST = "fusellm_corpus.json"
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
NEWLINE = b"\n"


class CorpusError(ValueError):
    """Bad corpus input; the message names the file or option to change."""


def text_hash(text: str) -> int:
    """63-bit BLAKE2b of the UTF-8 text (fits a signed int64)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class PrepareConfig:
    """Options of ``fusellm prepare`` (see the CLI's --help for each)."""

    inputs: tuple[str, ...]
    output: str
    text_field: str = "text"
    txt_unit: Literal["file", "line", "paragraph"] = "file"
    split: str | None = None
    split_tokenizers: tuple[str, ...] = ()
    max_tokens: int = 2000
    keep_empty: bool = False
    skip_bad_records: bool = False
    num_proc: int = 1
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise CorpusError("no input given: pass at least one file or directory")
        if self.max_tokens < 1:
            raise CorpusError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.txt_unit not in ("file", "line", "paragraph"):
            raise CorpusError(f"--txt-unit must be file, line or paragraph, got {self.txt_unit!r}")
        if self.num_proc < 1:
            raise CorpusError(f"--num-proc must be >= 1, got {self.num_proc}")


@dataclass(frozen=True)
class CorpusInfo:
    """The manifest of a prepared corpus."""

    path: str
    num_documents: int
    text_bytes: int
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)


def _kind(path: Path) -> str:
    name = path.name.lower()
    if any(name.endswith(s) for s in TEXT_SUFFIXES):
        return "text"
    if any(name.endswith(s) for s in JSON_SUFFIXES):
        return "json"
    if any(name.endswith(s) for s in PARQUET_SUFFIXES):
        return "parquet"
    return ""


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _expand_inputs(inputs: Sequence[str]) -> list[tuple[str, Path]]:
    """(kind, path) per input, directories expanded to their files in sorted order."""
    out: list[tuple[str, Path]] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise CorpusError(f"input {raw} does not exist")
        if _is_saved_dataset(p):
            out.append(("saved", p))
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not files:
                raise CorpusError(f"input directory {raw} holds no .txt/.md, .jsonl/.json or .parquet files")
            out.extend((_kind(f), f) for f in files)
        else:
            kind = _kind(p)
            if not kind:
                raise CorpusError(f"input {raw}: unknown file type; use .txt/.md, .jsonl/.json(.gz) or .parquet")
            out.append((kind, p))
    return out


class _BadRecord(Exception):
    """One unusable input record; `why` says what is wrong with it."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass
class _Skips:
    """Bad records: an error at the first one, or (``--skip-bad-records``) counted, with the
    first few kept for the summary."""

    skip: bool
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        if not self.skip:
            raise CorpusError(f"{where}: {why}, or pass --skip-bad-records to skip such records (they are counted "
                              "and reported)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")


def _utf8_error(raw: bytes, e: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 (byte 0x{raw[e.start]:02x}): convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"


def _check_text(value: Any, text_field: str) -> str:
    if not isinstance(value, str):
        shown = "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
        raise _BadRecord(f"{text_field!r} is {shown}, not a string: fix the record")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a JSON escape such as "\udcff" decodes to a lone surrogate
        raise _BadRecord(f"{text_field!r} holds a lone surrogate (an escape like \\udcff), not valid Unicode text: "
                         "fix the record") from None
    return value


def _text_rows(path: Path, unit: str, skips: _Skips) -> Iterator[tuple[int, str]]:
    """(index, text) per document of a text file; invalid UTF-8 names the line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{raw.count(NEWLINE, 0, e.start) + 1}"
        if not skips.skip:
            skips.add(where, _utf8_error(raw, e))
        # surrogateescape keeps every byte in place, so only the units holding a bad byte go
        text = raw.decode("utf-8", errors="surrogateescape")
    if unit == "file":
        units = [text]
    elif unit == "line":
        units = text.splitlines()
    else:
        units = text.replace("\r\n", "\n").split("\n\n")
    for i, u in enumerate(units):
        try:
            u.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = u[e.start].encode("utf-8", "surrogateescape")
            label = "" if unit == "file" else f" ({unit} {i + 1})"
            skips.add(f"{path}{label}", f"invalid UTF-8 (byte 0x{bad[0]:02x}): convert the file to UTF-8")
            continue
        yield i, u


def _open_bytes(path: Path) -> Any:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _whole_json(path: Path) -> Any:
    """The file as one JSON value (a list of records, or a dict of equal-length columns), or
    None when it is not one."""
    with _open_bytes(path) as f:
        raw = f.read()
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        columns = list(value.values())
        if len({len(c) for c in columns}) == 1:
            return [dict(zip(value, row)) for row in zip(*columns)]
    return value if isinstance(value, list) else None


def _json_rows(path: Path, text_field: str, skips: _Skips) -> Iterator[tuple[int, str]]:
    """(record index, text) per record of a JSON-lines file, or of a file holding one JSON
    array (or dict of columns); every bad record names its line (or record number)."""

    def text_of(record: Any) -> str:
        if not isinstance(record, dict):
            raise _BadRecord(f"is a JSON {type(record).__name__}, not an object: fix the record")
        if text_field not in record:
            raise _BadRecord(f"has no field {text_field!r} (its fields: {sorted(record)[:8]}): set --text-field or fix the record")
        return _check_text(record[text_field], text_field)

    index = 0
    try:
        with _open_bytes(path) as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise _BadRecord(_utf8_error(raw, e)) from None
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        if index == 0 and (whole := _whole_json(path)) is not None:
                            break  # not JSON lines but one JSON document: read below
                        raise _BadRecord(f"not valid JSON ({e.msg} at column {e.colno}): fix the line") from None
                    text = text_of(record)
                except _BadRecord as bad:
                    skips.add(where, bad.why)
                else:
                    yield index, text
                index += 1
            else:
                return
    except (OSError, EOFError) as e:  # a damaged .gz
        raise CorpusError(f"{path} cannot be read ({e})") from None
    for i, record in enumerate(whole):
        try:
            yield i, text_of(record)
        except _BadRecord as bad:
            skips.add(f"{path} (record {i + 1})", bad.why)


def _write_rows(rows: Iterator[tuple[int, str]], source: str, dest: Path) -> Any:
    """The rows as a `datasets.Dataset` with columns text, source, source_index, written to
    `dest` in batches (memory-mapped after, so a large file is never held in memory)."""
    import datasets
    import pyarrow as pa

    schema = pa.schema([("text", pa.string()), ("source", pa.string()), ("source_index", pa.int64())])
    dest.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        texts: list[str] = []
        index: list[int] = []

        def flush() -> None:
            writer.write_batch(pa.record_batch([pa.array(texts, pa.string()), pa.array([source] * len(texts), pa.string()),
                                                pa.array(index, pa.int64())], schema=schema))
            texts.clear()
            index.clear()

        for i, t in rows:
            texts.append(t)
            index.append(i)
            if len(texts) >= 4096:
                flush()
        flush()
    return datasets.Dataset.from_file(str(dest))


def _checked_column(ds: Any, path: Path, cfg: PrepareConfig, skips: _Skips) -> Any:
    """A Parquet file's or saved dataset's rows without null texts (each one a bad record);
    a column that is not text at all is refused whole."""
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    feature = ds.features["text"]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise CorpusError(f"{path}: column {cfg.text_field!r} holds {feature}, not text: set --text-field to the text column")
    # add_column (in the caller) leaves no indices mapping, so the table's rows are the dataset's
    is_null = pc.is_null(ds.data.column("text")).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(is_null):
        skips.add(f"{path} (row {int(i)})", f"{cfg.text_field!r} is null, not a string: fix the row")
    return ds.select(np.flatnonzero(~is_null)) if is_null.any() else ds


def _load_one(kind: str, path: Path, cfg: PrepareConfig, cache_dir: str, skips: _Skips, part: int) -> Any:
    """A `datasets.Dataset` with columns text, source, source_index."""
    import datasets

    if kind == "text":
        return _write_rows(_text_rows(path, cfg.txt_unit, skips), str(path), Path(cache_dir) / f"input-{part}.arrow")
    if kind == "json":
        return _write_rows(_json_rows(path, cfg.text_field, skips), str(path), Path(cache_dir) / f"input-{part}.arrow")
    try:
        if kind == "saved":
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset("parquet", data_files=[str(path)], split="train", cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - whatever pyarrow raises for a damaged file, name the file
        raise CorpusError(f"{path} cannot be read as {'a saved dataset' if kind == 'saved' else 'Parquet'} "
                          f"({type(e).__name__}: {e.__cause__ or e})") from None
    if kind == "saved" and isinstance(ds, datasets.DatasetDict):
        if cfg.split is None:
            if len(ds) != 1:
                raise CorpusError(f"{path} holds the splits {sorted(ds)}; choose one with --split")
            ds = next(iter(ds.values()))
        elif cfg.split not in ds:
            raise CorpusError(f"{path} has no split {cfg.split!r}; its splits are {sorted(ds)} (--split)")
        else:
            ds = ds[cfg.split]
    if cfg.text_field not in ds.column_names:
        raise CorpusError(f"{path} has no column {cfg.text_field!r} (its columns: {ds.column_names}); set --text-field")
    n = len(ds)
    ds = ds.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    ds = ds.add_column("source", [str(path)] * n)
    ds = ds.add_column("source_index", list(range(n)))
    return _checked_column(ds, path, cfg, skips)


_TOKENIZERS: dict[tuple[str, ...], list[Any]] = {}


def load_tokenizer(path: str, option: str = "--tokenizer") -> Any:
    """A local fast tokenizer; the error names the option that gave the path."""
    from transformers import AutoTokenizer

    if not Path(path).exists():
        raise CorpusError(f"{option} {path} does not exist (tokenizers are loaded from local paths only)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CorpusError(f"no tokenizer could be loaded from {path} ({option}): {e}") from None
    if not getattr(tok, "is_fast", False):
        raise CorpusError(
            f"the tokenizer at {path} ({option}) is not a fast tokenizer; character offsets are needed — "
            "save it with a tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained)"
        )
    return tok


def _tokenizers(paths: tuple[str, ...]) -> list[Any]:
    toks = _TOKENIZERS.get(paths)
    if toks is None:
        toks = [load_tokenizer(p, "--split-tokenizers") for p in paths]
        _TOKENIZERS[paths] = toks
    return toks


def _count(tok: Any, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def split_text(text: str, tokenizers: Sequence[Any], max_tokens: int) -> list[str]:
    """Pieces of `text` (concatenating to it) each of at most `max_tokens` tokens in every tokenizer."""
    counts = [_count(t, [text])[0] for t in tokenizers]
    if max(counts, default=0) <= max_tokens:
        return [text]
    tok = tokenizers[counts.index(max(counts))]
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ends: list[int] = []
    run = 0
    for _, e in offsets:
        run = max(run, e)
        ends.append(run)
    cuts = sorted({ends[i - 1] for i in range(max_tokens, len(ends), max_tokens)} - {0, len(text)})
    if not cuts:  # every token ends on one character: cut the characters in half to progress
        cuts = [len(text) // 2] if len(text) > 1 else []
        if not cuts:
            return [text]
    bounds = [0, *cuts, len(text)]
    pieces: list[str] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        pieces.extend(split_text(text[a:b], tokenizers, max_tokens))
    return pieces


def _process_batch(batch: dict[str, list[Any]], tok_paths: tuple[str, ...], max_tokens: int, keep_empty: bool) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"text": [], "text_hash": [], "source": [], "source_index": [], "chunk": []}
    texts: list[str] = batch["text"]  # every reader refuses or skips non-string texts
    need_split = [False] * len(texts)
    if tok_paths:
        toks = _tokenizers(tok_paths)
        for tok in toks:
            for i, c in enumerate(_count(tok, texts)):
                need_split[i] = need_split[i] or c > max_tokens
    for i, text in enumerate(texts):
        if not keep_empty and not text.strip():
            continue
        pieces = split_text(text, _tokenizers(tok_paths), max_tokens) if need_split[i] else [text]
        for c, piece in enumerate(pieces):
            out["text"].append(piece)
            out["text_hash"].append(text_hash(piece))
            out["source"].append(batch["source"][i])
            out["source_index"].append(batch["source_index"][i])
            out["chunk"].append(c)
    return out


def corpus_fingerprint(doc_ids: Sequence[int], hashes: Sequence[int]) -> str:
    h = hashlib.sha256()
    for d, t in zip(doc_ids, hashes):
        h.update(int(d).to_bytes(8, "little", signed=True))
        h.update(int(t).to_bytes(8, "little", signed=True))
    return h.hexdigest()


def prepare_corpus(cfg: PrepareConfig) -> RunSummary:
    """Run stage 1 and save the corpus to ``cfg.output`` (atomically: a temporary directory
    is renamed into place, so an interrupted or failed run leaves no half corpus, and an
    existing one stays as it was until the new one is complete)."""
    import datasets

    t0 = time.perf_counter()
    out = Path(cfg.output)
    if out.exists():
        if not cfg.overwrite:
            raise CorpusError(f"--output {out} already exists; pass --overwrite to replace it")
        # --overwrite replaces a corpus, never a directory of something else (the inputs, say)
        if not out.is_dir() or not ((out / CORPUS_MANIFEST).exists() or not any(out.iterdir())):
            raise CorpusError(f"--output {out} exists and is not a prepared corpus (no {CORPUS_MANIFEST}); "
                              "--overwrite only replaces a corpus: choose another --output")
    sources = _expand_inputs(cfg.inputs)
    if cfg.split_tokenizers:
        _tokenizers(tuple(cfg.split_tokenizers))  # fail early on a bad tokenizer path
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    if not cfg.progress:
        datasets.disable_progress_bars()
    skips = _Skips(cfg.skip_bad_records)
    try:
        parts = [_load_one(kind, path, cfg, str(work / "cache"), skips, i) for i, (kind, path) in enumerate(sources)]
        raw = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        if len(raw) == 0:
            if skips.count:
                raise CorpusError(f"no documents: all {skips.count} input records are bad and were skipped "
                                  f"(first: {skips.examples[0]})")
            names = ", ".join(str(p) for _, p in sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
            raise CorpusError(f"no documents: the inputs ({names}) hold no records; give at least one non-empty file")
        features = datasets.Features(
            {
                "text": datasets.Value("string"),
                "text_hash": datasets.Value("int64"),
                "source": datasets.Value("string"),
                "source_index": datasets.Value("int64"),
                "chunk": datasets.Value("int32"),
            }
        )
        docs = raw.map(
            _process_batch,
            batched=True,
            batch_size=256,
            remove_columns=raw.column_names,
            features=features,
            fn_kwargs={"tok_paths": tuple(cfg.split_tokenizers), "max_tokens": cfg.max_tokens, "keep_empty": cfg.keep_empty},
            num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
            cache_file_name=str(work / "cache" / "docs.arrow"),
            desc="prepare",
        )
        if len(docs) == 0:
            raise CorpusError(
                f"no documents: the {len(raw)} input rows are all empty or whitespace-only; "
                "check --text-field (or pass --keep-empty to keep them)"
            )
        docs = docs.add_column("doc_id", list(range(len(docs))))
        docs = docs.select_columns(["doc_id", "text", "text_hash", "source", "source_index", "chunk"])
        docs = docs.cast_column("doc_id", datasets.Value("int64"))
        text_bytes = 0
        for batch in docs.select_columns(["text"]).iter(batch_size=4096):
            text_bytes += sum(len(t.encode("utf-8", "surrogatepass")) for t in batch["text"])
        hashes = docs["text_hash"]
        n = len(docs)
        fingerprint = corpus_fingerprint(range(n), hashes)
        final = work / "corpus"
        docs.save_to_disk(str(final))
        split_docs = n - len(set(zip(docs["source"], docs["source_index"]))) if cfg.split_tokenizers else 0
        manifest = {
            "format": CORPUS_FORMAT,
            "format_version": CORPUS_VERSION,
            "num_documents": n,
            "source_rows": len(raw) + skips.count,
            "dropped_empty": len(raw) - len({(s, i) for s, i in zip(docs["source"], docs["source_index"])}),
            "skipped_bad_records": skips.count,
            "skipped_examples": skips.examples,
            "extra_split_pieces": split_docs,
            "text_bytes": text_bytes,
            "fingerprint": fingerprint,
            "settings": {
                "inputs": [str(p) for _, p in sources],
                "text_field": cfg.text_field,
                "txt_unit": cfg.txt_unit,
                "split": cfg.split,
                "split_tokenizers": list(cfg.split_tokenizers),
                "max_tokens": cfg.max_tokens if cfg.split_tokenizers else None,
                "keep_empty": cfg.keep_empty,
                "skip_bad_records": cfg.skip_bad_records,
            },
        }
        write_json_atomic(final / CORPUS_MANIFEST, manifest)
        del docs, raw, parts
        if out.exists():
            # the old corpus leaves by one rename, so no half-deleted corpus ever sits at --output
            os.replace(out, work / "replaced")
        os.replace(final, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return RunSummary(
        stage="prepare",
        documents=n,
        tokens=None,
        bytes_written=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        seconds=time.perf_counter() - t0,
        extra={
            "source rows": manifest["source_rows"],
            "dropped empty/whitespace": manifest["dropped_empty"],
            **({"skipped bad records": f"{skips.count} (first: {skips.examples[0]})"} if skips.count else {}),
            "extra pieces from splitting": split_docs,
            "text bytes": text_bytes,
            "output": str(out),
        },
    )


def load_corpus(path: str | os.PathLike[str]) -> tuple[Any, CorpusInfo]:
    """The prepared dataset and its manifest; errors say to run ``fusellm prepare``."""
    import datasets

    p = Path(path)
    mpath = p / CORPUS_MANIFEST
    if not mpath.exists():
        raise CorpusError(f"--corpus {p} is not a prepared corpus ({CORPUS_MANIFEST} missing); run `fusellm prepare` first")
    with open(mpath, encoding="utf-8") as f:
        try:
            m = json.load(f)
        except json.JSONDecodeError as e:
            raise StoreError(f"{mpath} is damaged ({e})") from None
    if m.get("format") != CORPUS_FORMAT or m.get("format_version") != CORPUS_VERSION:
        raise CorpusError(f"{mpath} is format {m.get('format')!r} v{m.get('format_version')}; expected {CORPUS_FORMAT!r} v{CORPUS_VERSION}")
    ds = datasets.load_from_disk(str(p))
    missing = {"doc_id", "text", "text_hash"} - set(ds.column_names)
    if missing:
        raise CorpusError(f"--corpus {p} lacks the columns {sorted(missing)}; prepare it again with `fusellm prepare`")
    if len(ds) != m["num_documents"]:
        raise CorpusError(f"--corpus {p} has {len(ds)} rows but its manifest says {m['num_documents']}; prepare it again")
    info = CorpusInfo(str(p), int(m["num_documents"]), int(m["text_bytes"]), str(m["fingerprint"]), dict(m["settings"]))
    return ds, info


__all__ = [
    "CorpusError",
    "CorpusInfo",
    "PrepareConfig",
    "corpus_fingerprint",
    "load_corpus",
    "load_tokenizer",
    "prepare_corpus",
    "split_text",
    "text_hash",
]
