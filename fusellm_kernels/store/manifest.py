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


#: which stage writes each kind of store, for messages that say what to re-run
WRITERS = {"teacher store": "fusellm teacher", "alignment": "fusellm align", "blocks": "fusellm assemble",
           "checkpoint": "fusellm train"}

# files already verified by this process: resolved path -> (sha256, size, mtime_ns, inode).
# Every rank checks the files it reads once, however many store objects open them.
_VERIFIED: dict[str, tuple[str, int, int, int]] = {}


def verify_file(path: str | os.PathLike[str], expected_sha256: str, expected_size: int | None = None,
                *, kind: str | None = None) -> None:
    """Raise `ChecksumError` naming `path` (and the stage that wrote it) when its bytes are not
    the recorded ones. A file this process verified before, unchanged since (size, mtime,
    inode), is not read again."""
    path = Path(path)
    writer = f" (written by `{WRITERS[kind]}`)" if kind in WRITERS else ""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise StoreError(f"{path}{writer} is listed in the manifest but missing") from None
    key = str(path.resolve())
    stamp = (expected_sha256, st.st_size, st.st_mtime_ns, st.st_ino)
    if _VERIFIED.get(key) == stamp:
        return
    redo = (f"delete it and its .json sidecar and resume `{WRITERS[kind]}` to rewrite it" if kind in WRITERS
            else "delete it and its .json sidecar and resume the job to rewrite it")
    if expected_size is not None and st.st_size != expected_size:
        raise ChecksumError(f"{path}{writer} is {st.st_size} bytes but the manifest recorded {expected_size}; "
                            f"the file is corrupted or truncated: {redo}")
    digest = sha256_file(path)
    if digest != expected_sha256:
        raise ChecksumError(
            f"{path}{writer} has SHA-256 {digest[:12]}… but the manifest recorded {expected_sha256[:12]}…; "
            f"the file is corrupted: {redo}"
        )
    _VERIFIED[key] = stamp


def forget_verified() -> None:
    """Drop this process's record of verified files (tests that damage a file in place)."""
    _VERIFIED.clear()


def inside(root: str | os.PathLike[str], rel: str, what: str) -> Path:
    """`root / rel` for a path recorded in a manifest, refusing absolute paths and paths that
    leave `root` (``..``, symlinks out): a manifest is data, never a way to name other files."""
    root = Path(root)
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel:
        raise StoreError(f"{root / 'manifest.json'} lists {what} {rel!r}: shard paths must be relative to the store; "
                         "the manifest is damaged or was edited by hand")
    full = root / rel
    base = root.resolve()
    if not full.resolve().is_relative_to(base):
        raise StoreError(f"{root / 'manifest.json'} lists {what} {rel!r}, which resolves outside {root}; "
                         "refusing to read it (the manifest is damaged or was edited by hand)")
    return full


def record_path(path: str | os.PathLike[str], manifest_dir: str | os.PathLike[str]) -> str:
    """How a manifest in `manifest_dir` records another path (a model, a store): relative to
    the manifest, so a tree of runs can be moved or mounted elsewhere as a whole."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(manifest_dir))


def recorded_path(value: str, manifest_dir: str | os.PathLike[str], version: int, relative_since: int) -> Path:
    """The path a manifest recorded with `record_path` (format_version >= relative_since), or
    as given on the command line by older versions (absolute, or relative to the working
    directory of the job that wrote it), which keep resolving as before, with a warning."""
    if version >= relative_since:
        return Path(value) if os.path.isabs(value) else Path(os.path.normpath(Path(manifest_dir) / value))
    import warnings

    warnings.warn(f"{Path(manifest_dir) / 'manifest.json'} (format_version {version}) records {value!r} as given on "
                  "its command line, resolved from the working directory; rewrite the store with this version "
                  "to record paths relative to the manifest", UserWarning, stacklevel=3)
    return Path(value)
