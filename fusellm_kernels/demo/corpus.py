"""The main job's corpus: Python docstrings, split the way pretrained models meet a corpus.

In FuseLLM the sources are pretrained on far more text than the fusion corpus, and that is
where their knowledge comes from. The demo builds that setting from text that is on every
machine that runs the project, with nothing downloaded:

    heldout   every ``heldout_every``-th docstring of the Python standard library: no model
              trains on it (exact duplicates and documents sharing a long word n-gram with it
              are removed from every training part)
    train     the target's training part: ``target_chars`` of the remaining stdlib docstrings,
              spread evenly over the library; the fusion runs and CLM-only train on it
    extra     what only the sources see besides ``train``: the rest of the stdlib docstrings,
              the language reference topics of ``pydoc_data`` and the docstrings of installed
              dependencies (``packages``, e.g. numpy), up to ``extra_chars``

Docstrings are read from the source files with ``ast`` (nothing is imported, so no module's
import side effects can leak into the job, and the result depends only on the files), kept
when they have at least ``MIN_CHARS`` characters, de-duplicated, and ordered by file and
position. The manifest records the Python and package versions and a SHA-256 of every part:
the exact text depends on the installed versions.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import sys
import sysconfig
from dataclasses import asdict, dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Any, Iterable, Iterator

MIN_CHARS = 120  # shorter docstrings are mostly one-line signatures ("Return self+value.")
NGRAM = 13       # words; the length GPT-3's contamination check uses

# Parts of the stdlib that are not documented library code (tests, GUIs, demos, packaging
# helpers, vendored data) or not prose.
_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "venv",
    "site-packages", "dist-packages", "__pycache__", "__phello__", "config-3.11-x86_64-linux-gnu",
})
_SKIP_FILES = frozenset({"antigravity.py", "this.py", "turtle.py", "__hello__.py"})


class DemoCorpusError(RuntimeError):
    """The corpus could not be built; the message says why and what to change."""


@dataclass(frozen=True)
class CorpusSpec:
    """How much text each part gets (characters; 0 = everything available)."""

    target_chars: int = 150_000
    extra_chars: int = 3_000_000
    heldout_every: int = 12
    stdlib_chars: int = 0  # stop reading the stdlib after this much text (0: all; the smoke test reads a slice)
    packages: tuple[str, ...] = ("numpy",)
    ngram: int = NGRAM


def _python_files(root: Path, skip_dirs: frozenset[str]) -> list[Path]:
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).parts
        if any(part in skip_dirs for part in rel[:-1]) or p.name in _SKIP_FILES or p.name.startswith("test_"):
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):  # e.g. lib2to3 fixtures, files for other Pythons
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_CHARS:
                yield doc


def _collect(root: Path, skip_dirs: frozenset[str], seen: set[str], limit: int = 0) -> list[str]:
    out: list[str] = []
    chars = 0
    for path in _python_files(root, skip_dirs):
        for doc in _docstrings(path):
            if doc not in seen:
                seen.add(doc)
                out.append(doc)
                chars += len(doc)
        if limit and chars >= limit:
            break
    return out


def _spread(docs: list[str], max_chars: int) -> list[str]:
    """Every n-th document so that about max_chars remain, spread over the whole list."""
    total = sum(len(d) for d in docs)
    if not max_chars or total <= max_chars:
        return list(docs)
    return docs[::math.ceil(total / max_chars)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The text's word n-grams (lower-cased ``\\w+`` words)."""
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def _all_ngrams(texts: Iterable[str], n: int) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for t in texts:
        out |= ngrams(t, n)
    return out


def overlap(heldout: Iterable[str], training: Iterable[str], n: int = NGRAM) -> dict[str, int]:
    """Exact document matches and documents sharing at least one word n-gram, between held-out
    and training text: the contamination check the report prints for every model."""
    held = list(heldout)
    held_set = set(held)
    held_grams = _all_ngrams(held, n)
    exact = shared = 0
    for t in training:
        exact += t in held_set
        shared += not held_grams.isdisjoint(ngrams(t, n))
    return {"exact_documents": exact, "documents_sharing_ngram": shared, "ngram_words": n}


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "unknown"
    return out


def _package_root(name: str) -> Path:
    spec = util.find_spec(name)
    if spec is None or not spec.origin:
        raise DemoCorpusError(f"the package {name!r} named for the sources' extra text is not installed; "
                              "install it or leave it out of the corpus packages")
    return Path(spec.origin).parent


def build_parts(spec: CorpusSpec) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The three parts as lists of texts, and the facts the manifest records about them."""
    if spec.heldout_every < 2:
        raise DemoCorpusError(f"heldout_every must be at least 2, got {spec.heldout_every}")
    seen: set[str] = set()
    stdlib = _collect(Path(sysconfig.get_paths()["stdlib"]), _SKIP_DIRS, seen, limit=spec.stdlib_chars)
    if len(stdlib) < 2 * spec.heldout_every:
        raise DemoCorpusError(f"the standard library yielded only {len(stdlib)} docstrings (is it installed without .py files?)")
    heldout = [d for i, d in enumerate(stdlib) if i % spec.heldout_every == spec.heldout_every - 1]
    rest = [d for i, d in enumerate(stdlib) if i % spec.heldout_every != spec.heldout_every - 1]
    held_grams = _all_ngrams(heldout, spec.ngram)

    def clean(docs: list[str]) -> tuple[list[str], int]:
        kept = [d for d in docs if held_grams.isdisjoint(ngrams(d, spec.ngram))]
        return kept, len(docs) - len(kept)

    rest, dropped_rest = clean(rest)
    train = _spread(rest, spec.target_chars)
    in_train = set(train)
    extra = [d for d in rest if d not in in_train]
    # the language reference's topics: long documents about the same language, never docstrings
    from pydoc_data.topics import topics  # plain data, no import side effects

    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= MIN_CHARS and text not in seen:
            seen.add(text)
            extra.append(text)
    limit = spec.extra_chars
    for pkg in spec.packages:
        have = sum(len(d) for d in extra)
        if limit and have >= limit:
            break
        extra += _collect(_package_root(pkg), frozenset({"tests", "test", "testing", "__pycache__"}), seen,
                          limit=max(0, limit - have) if limit else 0)
    extra, dropped_extra = clean(extra)
    if limit:
        kept, chars = [], 0
        for d in extra:
            if chars >= limit:
                break
            kept.append(d)
            chars += len(d)
        extra = kept
    parts = {"train": train, "heldout": heldout, "extra": extra}
    facts = {"spec": asdict(spec), "versions": _versions(spec.packages),
             "decontaminated": {"dropped_stdlib_documents": dropped_rest, "dropped_extra_documents": dropped_extra}}
    return parts, facts


@dataclass(frozen=True)
class CorpusFiles:
    """The JSON-lines files of the corpus (field ``text``) and its manifest."""

    train: Path
    heldout: Path
    extra: Path
    manifest: dict[str, Any]


def build_corpus(out: Path, spec: CorpusSpec) -> CorpusFiles:
    """Write ``out/{train,heldout,extra}.jsonl`` and ``out/corpus.json`` (last, so a corpus
    without its manifest is never taken for a complete one)."""
    parts, facts = build_parts(spec)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, Any]] = {}
    for part, rows in parts.items():
        digest = hashlib.sha256()
        tmp = out / f"{part}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for text in rows:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                digest.update(text.encode("utf-8") + b"\0")
        tmp.replace(out / f"{part}.jsonl")
        counts[part] = {"documents": len(rows), "chars": sum(len(t) for t in rows),
                        "bytes": sum(len(t.encode("utf-8")) for t in rows), "sha256": digest.hexdigest()}
    sources_text = parts["train"] + parts["extra"]
    manifest = {
        "source": "docstrings of the Python standard library (held out, target) + pydoc topics and "
                  f"docstrings of {', '.join(spec.packages) or 'no packages'} (sources only)",
        **facts, **counts,
        "overlap": {"target": overlap(parts["heldout"], parts["train"], spec.ngram),
                    "sources": overlap(parts["heldout"], sources_text, spec.ngram)},
    }
    (out / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return CorpusFiles(out / "train.jsonl", out / "heldout.jsonl", out / "extra.jsonl", manifest)


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
