"""Resumable, atomic checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is one DCP directory ``OUTPUT/checkpoints/step-00000042`` holding the sharded
model and optimiser (each rank writes its own shards; DCP reshards on load, so a run may
resume on a different number of ranks), the scheduler, the sampler position, the step and
every rank's RNG state. It is written under a temporary name and renamed into place once all
ranks have finished, so a run killed mid-save leaves the previous checkpoint as the newest
complete one. The checkpoint directory must be on a file system all ranks share.

Integrity: DCP unpickles ``.metadata`` and trusts the bytes of its ``.distcp`` files, so a
flipped byte would resume silently (and export garbage weights). Each rank hashes the files
it wrote; rank 0 writes the list (``fusellm_checksums.json``) into the checkpoint before it
is renamed into place, and `load_checkpoint` verifies every listed file, and that no file is
missing or unlisted, before DCP reads anything. A checkpoint made before these lists loads
with a warning. A checkpoint directory is trusted input, as any DCP checkpoint: the list
guards against damage, not against someone who can rewrite both the files and the list.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from fusellm_kernels.store.manifest import StoreError, sha256_file, write_json_atomic

_STEP_DIR = re.compile(r"^step-(\d{8})$")
CHECKSUMS = "fusellm_checksums.json"
CHECKSUMS_FORMAT = "fusellm-checkpoint-checksums"


class CheckpointError(StoreError):
    """A checkpoint's files do not match the list written with it."""


class TrainState(Stateful):
    """Everything a resumed run needs, as one DCP `Stateful` (DCP calls these two methods)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, sampler: Any) -> None:
        self.model, self.optimizer, self.scheduler, self.sampler = model, optimizer, scheduler, sampler
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, _rng_state())  # per-rank states travel as one replicated list
        return {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(), "step": self.step, "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        rng = state["rng"]
        if len(rng) == dist.get_world_size():
            _set_rng_state(rng[dist.get_rank()])
        else:  # another world size: no rank's stream carries over; derive fresh ones deterministically
            torch.manual_seed(self.sampler.seed + 1_000_003 * self.step + dist.get_rank())


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root (temporary directories never match)."""
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    return steps[-1][1] if steps else None


def save_checkpoint(root: Path, state: TrainState, keep: int) -> Path:
    """Write step `state.step` atomically; then delete all but the newest `keep`. Collective."""
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    dist.barrier()
    before = set(os.listdir(tmp)) if tmp.exists() else set()
    dcp.save({"train": state}, checkpoint_id=str(tmp))
    dist.barrier()
    # each rank hashes the data files it wrote (DCP names them __RANK_N.distcp)
    mine = {name: sha256_file(tmp / name) for name in sorted(os.listdir(tmp))
            if name not in before and name.startswith(f"__{dist.get_rank()}_")}
    lists: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(lists, mine)
    if dist.get_rank() == 0:
        files = {name: digest for part in lists for name, digest in part.items()}
        for name in sorted(os.listdir(tmp)):  # .metadata and anything DCP wrote from rank 0 only
            if name not in files and name != CHECKSUMS and not name.startswith("__"):
                files[name] = sha256_file(tmp / name)
        sizes = {name: (tmp / name).stat().st_size for name in files}
        write_json_atomic(tmp / CHECKSUMS, {"format": CHECKSUMS_FORMAT, "step": state.step,
                                            "files": {n: {"sha256": files[n], "size_bytes": sizes[n]} for n in sorted(files)}})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def verify_checkpoint(path: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems of a checkpoint against its checksum list ([] when it is intact). Rank r
    hashes every world-th data file; every rank checks ``.metadata`` (DCP unpickles it) and
    that no file is missing or unlisted. Raises nothing; a missing list is one problem."""
    listing = path / CHECKSUMS
    if not listing.exists():
        return [f"{listing} is missing (a checkpoint made before checksum lists, or not a fusellm checkpoint)"]
    try:
        files = json.loads(listing.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{listing} cannot be read ({e}); the checkpoint is damaged"]
    problems = []
    present = {p.name for p in path.iterdir() if p.is_file() and p.name != CHECKSUMS}
    for name in sorted(present - set(files)):
        problems.append(f"{path / name} is not in {CHECKSUMS}: a file was added to the checkpoint")
    for j, (name, rec) in enumerate(sorted(files.items())):
        f = path / name
        if name not in present:
            problems.append(f"{f} is missing")
        elif f.stat().st_size != rec["size_bytes"]:
            problems.append(f"{f} is {f.stat().st_size} bytes, {rec['size_bytes']} when written: truncated or damaged")
        elif (name == ".metadata" or j % world == rank) and sha256_file(f) != rec["sha256"]:
            problems.append(f"{f} does not match its SHA-256 in {CHECKSUMS}: the file is damaged")
    return problems


def load_checkpoint(path: Path, state: TrainState, verify: bool = True) -> None:
    """Restore `state` from a checkpoint directory (any world size), after checking its files
    against their checksum list. Collective."""
    if verify:
        problems = verify_checkpoint(path, dist.get_rank(), dist.get_world_size())
        unlisted = len(problems) == 1 and problems[0].endswith("not a fusellm checkpoint)")
        found: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(found, [] if unlisted else problems)
        problems = sorted({p for part in found for p in part})
        if problems:
            raise CheckpointError(
                f"checkpoint {path} is damaged: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
                + f". Delete {path} to resume from the previous checkpoint, or start again with --no-resume")
        if unlisted:
            warnings.warn(f"{path} has no {CHECKSUMS} (made by an older version): its files cannot be verified",
                          UserWarning, stacklevel=2)
    dcp.load({"train": state}, checkpoint_id=str(path))
