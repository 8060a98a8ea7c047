"""One job per directory: advisory OS file locks on the stores a job writes and reads.

A job that writes a directory (a teacher store, an alignment, blocks, a training run, the
main job's run directory) holds an exclusive ``flock`` on ``DIR/.fusellm.lock`` for its whole
life; a job that reads a store holds a shared lock on the store's lock file, so a second
writer, or an ``--overwrite`` of a store another job is reading, refuses at once instead of
mixing or deleting files. The kernel drops a process's locks when it dies, SIGKILL included,
so a crashed job never leaves a stale lock behind. The writer records who holds the lock
(job id, host, pid, command, start time) in the file, for the refusal message.

Under torchrun only rank 0 takes the locks; it broadcasts the job id, and every other rank
checks that the lock file names that id (`confirm_holder`), so ranks of two different jobs
cannot mix on one output.

The lock is advisory: only fusellm jobs take it (``rm -rf`` does not). On network file systems
(NFS, Lustre, some FUSE mounts) ``flock`` may be local to one host or do nothing: there it
does not protect, and one job per output is the user's responsibility.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fusellm_kernels.store.manifest import StoreError

LOCK_NAME = ".fusellm.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; jobs run unlocked
    fcntl = None  # type: ignore[assignment]


class LockedError(StoreError):
    """Another job holds the directory."""


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"job {info.get('job_id')} (pid {info.get('pid')} on {info.get('host')}, {info.get('purpose')}, "
                f"since {info.get('started')})")
    except (OSError, ValueError, AttributeError):
        return "another job"


def _only_readers(path: Path) -> bool:
    """True when the lock that refused an exclusive request is held shared (by readers)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


class JobLock:
    """An exclusive (``write``) or shared (``read``) lock on one directory, held until
    `release` or the process's exit. Use as a context manager or keep it for the job's life."""

    def __init__(self, directory: str | os.PathLike[str], mode: Literal["write", "read"], purpose: str,
                 job_id: str | None = None) -> None:
        self.directory = Path(directory)
        self.mode = mode
        self.purpose = purpose
        self.job_id = job_id or new_job_id()
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def acquire(self) -> JobLock:
        if fcntl is None or self._fd is not None:
            return self
        if self.mode == "write":
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        else:
            try:  # created when missing (a copied store), so an --overwrite elsewhere sees the reader
                fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
            except OSError:
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except OSError:
                    return self  # a read-only store no writer ever locked: no job can write there either
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.mode == "write" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if self.mode == "write" and _only_readers(self.path):
                raise LockedError(
                    f"{self.directory} is being read by another job (a shared lock on {self.path}); writing or "
                    "--overwrite there now would change files under it: wait for it to finish, or choose another "
                    "--output") from None
            if self.mode == "write":
                raise LockedError(
                    f"{self.directory} is in use by {_holder(self.path)}: one job per directory. Wait for it to "
                    f"finish or stop it, or choose another --output (the lock is {self.path}; it is released "
                    "when that process exits)") from None
            raise LockedError(
                f"{self.directory} is being written by {_holder(self.path)}; wait for that job to finish before "
                "reading it") from None
        self._fd = fd
        if self.mode == "write":
            info = {"job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(), "purpose": self.purpose,
                    "command": " ".join(sys.argv[:1] + sys.argv[1:8]),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockSet:
    """The locks of one job: what it writes (exclusive) and what it reads (shared)."""

    def __init__(self, purpose: str, job_id: str | None = None) -> None:
        self.purpose = purpose
        self.job_id = job_id or new_job_id()
        self._locks: list[JobLock] = []

    def write(self, directory: str | os.PathLike[str]) -> LockSet:
        self._locks.append(JobLock(directory, "write", self.purpose, self.job_id).acquire())
        return self

    def read(self, *directories: str | os.PathLike[str]) -> LockSet:
        seen = {lk.directory.resolve() for lk in self._locks}
        for d in directories:
            if Path(d).resolve() not in seen:
                self._locks.append(JobLock(d, "read", self.purpose, self.job_id).acquire())
                seen.add(Path(d).resolve())
        return self

    def release(self) -> None:
        for lk in reversed(self._locks):
            lk.release()
        self._locks.clear()

    def __enter__(self) -> LockSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def confirm_holder(directory: str | os.PathLike[str], job_id: str) -> None:
    """On a rank other than 0: the lock rank 0 took on `directory` must name this job's id."""
    if fcntl is None:
        return
    path = Path(directory) / LOCK_NAME
    try:
        info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    if info.get("job_id") != job_id:
        raise LockedError(f"{directory} is locked by {_holder(path)}, not by this job ({job_id}); is --output shared "
                          "by two launches, or not on a file system all ranks see?")


def clear_directory(directory: str | os.PathLike[str]) -> None:
    """Delete what a directory holds except its lock file (``--overwrite`` under the lock)."""
    import shutil

    d = Path(directory)
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
