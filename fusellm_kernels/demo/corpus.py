"""The demo's corpus: the docstrings of the Python standard library.

Why this text: every machine that can run the demo has it (it ships with the interpreter, no
download, no package), it is real English prose written by many authors over decades
(explanations, argument descriptions, examples), and it is large enough (~0.7–1 MB from
~200 importable modules) for toy models to learn something in seconds. Its content depends
on the Python version; the corpus manifest records the version and a hash of the text, so
a report says exactly what it was measured on.

The modules are imported in a child process (`python -m fusellm_kernels.demo.corpus`):
importing two hundred modules changes interpreter-wide state (signal handlers, codecs,
logging, warnings), which must not leak into the job that trains models afterwards.
Documents are ordered by (module, qualified name), de-duplicated (inherited docstrings
repeat), and every `heldout_every`-th one goes to the held-out part.
"""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Modules never imported: they open browsers, print on import, need a display, or are test
# suites and packaging helpers rather than documented library code.
_SKIP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "pydoc_data",
    "test", "venv", "xxlimited", "xxlimited_35", "xxsubtype", "__hello__", "__phello__",
})
MIN_CHARS = 120  # shorter docstrings are mostly one-line signatures ("Return self+value.")


class DemoCorpusError(RuntimeError):
    """The standard-library corpus could not be built; the message says why."""


def _collect(limit: int = 0) -> list[dict[str, str]]:
    """Every module, class, function and method docstring of the importable stdlib modules
    (run in the child process); with limit > 0, modules stop being imported once the
    documents hold that many characters (the smoke test needs only a slice)."""
    import contextlib
    import importlib
    import inspect
    import io
    import warnings

    seen: set[str] = set()
    docs: list[dict[str, str]] = []

    def add(name: str, obj: Any) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= MIN_CHARS and doc not in seen:
            seen.add(doc)
            docs.append({"name": name, "text": doc})

    for mod_name in sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in _SKIP):
        if limit and sum(len(d["text"]) for d in docs) >= limit:
            break
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(mod_name)
        except BaseException:  # noqa: BLE001 - platform modules (winreg, msvcrt, ...) are simply absent
            continue
        add(mod_name, module)
        for attr, value in sorted(vars(module).items()):
            if getattr(value, "__module__", None) != mod_name or not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            add(f"{mod_name}.{attr}", value)
            if inspect.isclass(value):
                for meth, fn in sorted(vars(value).items()):
                    if inspect.isfunction(fn):
                        add(f"{mod_name}.{attr}.{meth}", fn)
    return docs


@dataclass(frozen=True)
class CorpusFiles:
    """The two JSON-lines files of the split corpus (field `text`) and its manifest."""

    train: Path
    heldout: Path
    manifest: dict[str, Any]


def build_corpus(out: Path, *, max_chars: int = 0, heldout_every: int = 10) -> CorpusFiles:
    """Write ``out/train.jsonl``, ``out/heldout.jsonl`` and ``out/corpus.json``.

    max_chars: stop after this many characters of documents (0: all); the documents kept are
    spread over the whole library (every n-th), not the first modules alphabetically.
    """
    if heldout_every < 2:
        raise DemoCorpusError(f"heldout_every must be at least 2, got {heldout_every}")
    # a small corpus needs only some modules, but from more than the first few: 4x the text
    limit = 4 * max_chars if max_chars and max_chars < 200_000 else 0
    proc = subprocess.run([sys.executable, "-m", "fusellm_kernels.demo.corpus", str(limit)], capture_output=True, text=True,
                          timeout=300, check=False)
    if proc.returncode != 0:
        raise DemoCorpusError(f"collecting the standard library's docstrings failed:\n{proc.stderr[-2000:]}")
    docs: list[dict[str, str]] = json.loads(proc.stdout)
    if not docs:
        raise DemoCorpusError("the standard library yielded no docstrings (is this interpreter built with -OO?)")
    total = sum(len(d["text"]) for d in docs)
    if max_chars and total > max_chars:
        docs = docs[::math.ceil(total / max_chars)]
    out.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[dict[str, str]]] = {"train": [], "heldout": []}
    for i, d in enumerate(docs):
        parts["heldout" if i % heldout_every == heldout_every - 1 else "train"].append(d)
    digest = hashlib.sha256()
    counts: dict[str, dict[str, int]] = {}
    for part, rows in parts.items():
        with open(out / f"{part}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                digest.update(row["text"].encode("utf-8"))
        counts[part] = {"documents": len(rows), "chars": sum(len(r["text"]) for r in rows),
                        "bytes": sum(len(r["text"].encode("utf-8")) for r in rows)}
    manifest = {"source": "docstrings of the Python standard library", "python": sys.version.split()[0],
                "sha256": digest.hexdigest(), "heldout_every": heldout_every, "max_chars": max_chars, **counts}
    (out / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return CorpusFiles(out / "train.jsonl", out / "heldout.jsonl", manifest)


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


if __name__ == "__main__":
    json.dump(_collect(int(sys.argv[1]) if len(sys.argv) > 1 else 0), sys.stdout, ensure_ascii=False)
