"""Resumable, atomic checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is one DCP directory ``OUTPUT/checkpoints/step-00000042`` holding the sharded
model and optimiser (each rank writes its own shards; DCP reshards on load, so a run may
resume on a different number of ranks), the scheduler, the sampler position, the step and
every rank's RNG state. It is written under a temporary name and renamed into place once all
ranks have finished, so a run killed mid-save leaves the previous checkpoint as the newest
complete one. The checkpoint directory must be on a file system all ranks share.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

_STEP_DIR = re.compile(r"^step-(\d{8})$")


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
    dcp.save({"train": state}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, state: TrainState) -> None:
    """Restore `state` from a checkpoint directory (any world size). Collective."""
    dcp.load({"train": state}, checkpoint_id=str(path))
