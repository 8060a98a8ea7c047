"""Tokenizer conventions, detected from the tokenizer itself (the original hard-codes a table
of two tokenizer classes), and a richer token normalisation built on them.

Detection probes the tokenizer with text: the characters its tokens put between two words
are the word-start marker (`▁` for SentencePiece / Metaspace, `Ġ` for byte-level BPE); a
WordPiece tokenizer puts none there and marks the *continuation* of a word instead (`##`).
Byte conventions come from the vocabulary: byte-level BPE has a token for each of the 256
characters of the GPT-2 byte alphabet (`Ġ` is the space byte, `Ċ` the newline byte),
byte fallback has the 256 tokens `<0x00>` ... `<0xFF>`.
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from typing import Any

_PROBE_WORDS = ("hello", "world", "again")
_PROBE_LONG_WORDS = ("unbelievably", "tokenizations", "xylophonequartzjumping")


class ConventionError(ValueError):
    """A tokenizer's conventions could not be determined from the tokenizer."""


@dataclasses.dataclass(frozen=True)
class TokenizerConventions:
    """How one tokenizer writes text into token strings.

    name: the tokenizer's name or path, for messages.
    marker: the word-start marker inside token strings ("▁", "Ġ"), "" when words are not
      marked at their start (WordPiece).
    continuation: the prefix marking a token that continues a word ("##" for WordPiece),
      "" otherwise. The opposite convention to `marker`.
    byte_level: tokens are spelt in the GPT-2 byte alphabet (one printable character per
      byte: `Ġ` = space, `Ċ` = newline).
    byte_fallback: the vocabulary has the tokens `<0x00>` ... `<0xFF>` for bytes it cannot
      spell otherwise.
    """

    name: str
    marker: str
    continuation: str = ""
    byte_level: bool = False
    byte_fallback: bool = False

    @property
    def strip(self) -> str:
        """What `min_ed_alignment` should remove from this side's tokens: the marker, or for
        WordPiece the continuation prefix."""
        return self.marker or self.continuation


def detect_conventions(tokenizer: Any, *, marker: str | None = None) -> TokenizerConventions:
    """The conventions of a `transformers` tokenizer or a `tokenizers.Tokenizer`.

    marker: set the word-start marker by hand (skips its detection; "" for none).
    Raises ConventionError, naming the tokenizer, when neither a word-start marker nor a
    continuation prefix can be seen in its tokens.
    """
    name = _tokenizer_name(tokenizer)
    vocab = tokenizer.get_vocab()
    byte_level = _is_byte_level(vocab, _backend_config(tokenizer))
    byte_fallback = all(f"<0x{b:02X}>" in vocab for b in range(256))
    continuation = ""
    if marker is None:
        marker = _probe_marker(tokenizer, name)
        if not marker:
            continuation = _probe_continuation(tokenizer, _backend_config(tokenizer))
            if not continuation:
                raise ConventionError(
                    f"tokenizer {name!r}: its tokens show neither a word-start marker nor a "
                    f"continuation prefix (tokens of {' '.join(_PROBE_WORDS)!r}: "
                    f"{_tokens(tokenizer, ' '.join(_PROBE_WORDS))}); pass marker=... to "
                    "detect_conventions (or source_marker / target_marker to the alignment) by hand"
                )
    return TokenizerConventions(
        name=name, marker=marker, continuation=continuation, byte_level=byte_level, byte_fallback=byte_fallback
    )


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _tokens(tokenizer: Any, text: str) -> list[str]:
    if hasattr(tokenizer, "tokenize"):  # transformers
        return list(tokenizer.tokenize(text))
    return list(tokenizer.encode(text, add_special_tokens=False).tokens)  # tokenizers


def _backend_config(tokenizer: Any) -> dict[str, Any]:
    """The `tokenizers` JSON of a fast tokenizer ({} for a slow one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None) or tokenizer
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        return {}
    try:
        return json.loads(to_str())
    except (TypeError, ValueError):
        return {}


def _component_types(config: dict[str, Any]) -> set[str]:
    """Types of the pre-tokenizer, decoder and model, sequences flattened."""
    types: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "type" in node:
                types.add(str(node["type"]))
            for key in ("pretokenizers", "decoders"):
                for child in node.get(key) or ():
                    walk(child)

    for key in ("pre_tokenizer", "decoder", "model"):
        walk(config.get(key))
    return types


def _is_byte_level(vocab: dict[str, int], config: dict[str, Any]) -> bool:
    if "ByteLevel" in _component_types(config):
        return True
    return all(ch in vocab for ch in byte_alphabet())


def _probe_marker(tokenizer: Any, name: str) -> str:
    """The characters the tokens put between two words (the same between every pair)."""
    tokens = _tokens(tokenizer, " ".join(_PROBE_WORDS))
    joined = "".join(tokens)
    between: set[str] = set()
    position = joined.find(_PROBE_WORDS[0])
    if position < 0:
        raise ConventionError(
            f"tokenizer {name!r} does not spell {_PROBE_WORDS[0]!r} in its tokens ({tokens}); pass marker=... by hand"
        )
    position += len(_PROBE_WORDS[0])
    for word in _PROBE_WORDS[1:]:
        found = joined.find(word, position)
        if found < 0:
            raise ConventionError(
                f"tokenizer {name!r} does not spell {word!r} in its tokens ({tokens}); pass marker=... by hand"
            )
        between.add(joined[position:found])
        position = found + len(word)
    if len(between) != 1:
        raise ConventionError(
            f"tokenizer {name!r} separates words inconsistently ({sorted(between)!r}); pass marker=... by hand"
        )
    return between.pop()


def _probe_continuation(tokenizer: Any, config: dict[str, Any]) -> str:
    """WordPiece's continuation prefix: from the model config (or, for a slow tokenizer,
    the pieces' common non-alphanumeric prefix), confirmed on a word split into pieces."""
    prefix = (config.get("model") or {}).get("continuing_subword_prefix") or ""
    unknown = getattr(tokenizer, "unk_token", None)
    for word in _PROBE_LONG_WORDS:
        tokens = _tokens(tokenizer, word)
        if len(tokens) < 2 or (unknown is not None and unknown in tokens):
            continue
        candidate = prefix or tokens[1][: len(tokens[1]) - len(tokens[1].lstrip("#@_~"))]
        if candidate and all(t.startswith(candidate) for t in tokens[1:]):
            return candidate
        return ""
    return ""


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """The GPT-2 byte alphabet: character of byte b at index b. Printable Latin-1 bytes are
    their own character; the others (controls, space, 0x7F-0xA0, 0xAD) take 256, 257, ...
    in byte order, so that every byte is one visible character."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return tuple(chars)


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    return {ch: b for b, ch in enumerate(byte_alphabet())}


def token_bytes(token: str, conventions: TokenizerConventions) -> bytes:
    """The bytes of text a token stands for (the word marker as a space, WordPiece's
    continuation prefix removed and a space before a word start)."""
    if conventions.byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    if conventions.byte_level:
        table = _byte_of_char()
        out = bytearray()
        for ch in token:
            b = table.get(ch)
            out.extend(ch.encode("utf-8") if b is None else bytes([b]))
        return bytes(out)
    if conventions.continuation:
        if token.startswith(conventions.continuation):
            return token[len(conventions.continuation) :].encode("utf-8")
        return (" " + token).encode("utf-8")
    if conventions.marker:
        token = token.replace(conventions.marker, " ")
    return token.encode("utf-8")


def token_text(token: str, conventions: TokenizerConventions) -> str:
    """The richer normalisation: a token's text with all whitespace removed, bytes decoded
    (a partial UTF-8 character keeps its bytes as surrogate escapes, so two tokenizers that
    cut a character at the same byte still agree). Two tokens with the same text compare
    equal whatever their tokenizers' conventions (`Ċ`, `<0x0A>` and a newline; `Ã©` and `é`)."""
    text = token_bytes(token, conventions).decode("utf-8", errors="surrogateescape")
    return "".join(text.split())
