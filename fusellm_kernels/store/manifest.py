"""Manifest plumbing every on-disk store of the pipeline shares.

A store is a directory of shards plus one versioned JSON manifest. The rules that keep a
killed or re-run job from ever being read as complete live here:

* every file is written to a temporary name in the same directory and renamed into place
  (`os.replace` is atomic on POSIX), so a half-written file never has its final name;
* a shard counts as done only when its small JSON sidecar exists, and the sidecar is written
  after the shard, carrying the shard's SHA-256;
* a resumed job compares its settings with the stored ones and refuses a difference, naming
  the setting (settings keys are the command-line option names with ``_`` for ``-``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class StoreError(RuntimeError):
    """A store on disk is missing, incomplete, from another version or corrupted."""


class ChecksumError(StoreError):
    """A shard's bytes do not match the checksum its manifest recorded."""


class SettingsMismatchError(StoreError):
    """A resumed job was started with settings that differ from the stored ones."""


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that `path` either holds all of it or does not change."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise StoreError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON ({e}); the file is damaged") from None


def settings_hash(settings: dict[str, Any]) -> str:
    return sha256_bytes(json.dumps(settings, sort_keys=True).encode())[:16]


def check_same_settings(stored: dict[str, Any], requested: dict[str, Any], where: str | os.PathLike[str]) -> None:
    """Raise `SettingsMismatchError` naming the first setting that differs."""
    for key in sorted(set(stored) | set(requested)):
        old, new = stored.get(key, "<absent>"), requested.get(key, "<absent>")
        if old != new:
            raise SettingsMismatchError(
                f"{where} was started with {key}={old!r}, but this run asks for {key}={new!r}; "
                f"resume with the same --{key.replace('_', '-')}, or write to another --output "
                "(or pass --overwrite to discard the stored shards)"
            )


@dataclass(frozen=True)
class ShardInfo:
    """One completed shard, as its sidecar JSON and the manifest record it.

    file: path relative to the store directory.  sha256/size_bytes: of that file.
    documents/tokens: what it holds.  first_doc_id/last_doc_id: the smallest and largest id it holds (readers search by them).
    extra: stage-specific counts (e.g. flagged documents), plain JSON values.
    """

    index: int
    file: str
    sha256: str
    size_bytes: int
    documents: int
    tokens: int
    first_doc_id: int
    last_doc_id: int
    extra: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(obj: dict[str, Any]) -> ShardInfo:
        return ShardInfo(**obj)


def verify_file(path: str | os.PathLike[str], expected_sha256: str, expected_size: int | None = None) -> None:
    """Raise `ChecksumError` naming `path` when its bytes are not the recorded ones."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} is listed in the manifest but missing")
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise ChecksumError(f"{path} is {size} bytes but the manifest recorded {expected_size}; the shard is corrupted")
    digest = sha256_file(path)
    if digest != expected_sha256:
        raise ChecksumError(
            f"{path} has SHA-256 {digest[:12]}… but the manifest recorded {expected_sha256[:12]}…; "
            "the shard is corrupted: delete it and its .json sidecar and resume the job to rewrite it"
        )
