"""Shared benchmark machinery: the JSON-lines record, timing, measured ceilings, rotation.

Every benchmark under bench/ writes `BenchRecord`s (one JSON object per line) and leaves
plotting to `bench.plot`. Ceilings are measured on the card the benchmark runs on, in the
same run, so that ratios to the floor compare like with like (see
docs/performance.md: "measure the baselines in the same run on the same card").
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import re
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, NamedTuple, TypeVar

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MIB = 2**20
QUANTILES = (0.5, 0.2, 0.8)  # median and the spread reported beside it


@dataclasses.dataclass(frozen=True)
class BenchRecord:
    """One line of a results file: one provider on one shape on one card.

    Timing fields are None when the provider was skipped; `extra["skipped"]` then says why.
    bytes_moved / flops are what the op must move / compute at least (counted before
    timing); floor_ms is the larger of bytes_moved at the measured copy bandwidth and flops
    at the measured matmul rate, and ratio_to_floor = median_ms / floor_ms.
    """

    op: str
    provider: str
    shape: dict[str, Any]
    dtype: str
    card: str
    torch: str
    triton: str | None
    commit: str
    date: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    peak_extra_mib: float | None
    bytes_moved: int | None
    flops: int | None
    achieved_gbps: float | None
    achieved_tflops: float | None
    floor_ms: float | None
    ratio_to_floor: float | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return self.median_ms is None


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(BenchRecord))


def append_jsonl(path: str | Path, record: BenchRecord) -> None:
    """Append one record; appending (not rewriting) keeps the history of earlier runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(dataclasses.asdict(record)) + "\n")


def read_jsonl(path: str | Path) -> list[BenchRecord]:
    """All records of a file; unknown keys (from a newer schema) are moved into `extra`."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        raw = json.loads(line)
        known = {k: raw.pop(k) for k in RECORD_FIELDS if k in raw}
        known["extra"] = {**known.get("extra", {}), **raw}
        records.append(BenchRecord(**{k: known.get(k) for k in RECORD_FIELDS}))
    return records


# ---------------------------------------------------------------------------- environment


def resolve_device(name: str | None) -> torch.device:
    """`None` picks CUDA when present; asking for CUDA without one is an error, not a fallback."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return device


def card_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def sanitise(name: str) -> str:
    """A card name as a folder name: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "unknown"


def results_dir(card: str) -> Path:
    path = BENCH_DIR / "results" / sanitise(card)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass(frozen=True)
class Environment:
    """What every record of one run shares."""

    card: str
    torch: str
    triton: str | None
    commit: str
    dirty: bool  # uncommitted changes to tracked files: the commit alone does not say what ran
    date: str


def environment(device: torch.device | str) -> Environment:
    commit = _git("rev-parse", "--short", "HEAD")
    return Environment(
        card=card_name(device),
        torch=torch.__version__,
        triton=_version("triton"),
        commit=commit or "unknown",
        dirty=bool(commit and _git("status", "--porcelain", "--untracked-files=no")),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


# ---------------------------------------------------------------------------- timing


class Timing(NamedTuple):
    median_ms: float
    p20_ms: float
    p80_ms: float


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any], *, warmup_ms: float, rep_ms: float, device: torch.device | str | None = None, min_reps: int = 5
) -> Timing:
    """(median, p20, p80) in ms of `fn()`.

    CUDA: triton's do_bench, which times each call with events and flushes L2 between calls.
    CPU: a perf_counter loop; the first call runs before the warm-up window so that a
    compile or first allocation never counts, and at least `min_reps` calls are timed.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        import triton.testing

        with torch.cuda.device(device):
            q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return Timing(*(float(x) for x in q))
    fn()
    end = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < end:
        fn()
    times: list[float] = []
    end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return Timing(*(float(x) for x in q))


def peak_extra_memory(fn: Callable[[], Any], device: torch.device | str) -> float | None:
    """MiB allocated by `fn()` at its peak above what was allocated before (None on CPU).

    Inputs allocated before the call are excluded by construction; whatever `fn` returns is
    included (the caller subtracts outputs it does not want counted, e.g. a gradient).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MIB


# ---------------------------------------------------------------------------- ceilings


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Rates measured on this card in this run; None where not measured."""

    copy_bytes_per_s: float | None = None
    matmul_flops_per_s: float | None = None

    def floor_ms(self, bytes_moved: int | None, flops: int | None) -> float | None:
        """Roofline floor: the op can run no faster than its bytes or its FLOPs allow."""
        parts = []
        if bytes_moved and self.copy_bytes_per_s:
            parts.append(bytes_moved / self.copy_bytes_per_s * 1e3)
        if flops and self.matmul_flops_per_s:
            parts.append(flops / self.matmul_flops_per_s * 1e3)
        return max(parts) if parts else None

    def as_extra(self) -> dict[str, float]:
        out = {}
        if self.copy_bytes_per_s:
            out["copy_gbps"] = round(self.copy_bytes_per_s / 1e9, 2)
        if self.matmul_flops_per_s:
            out["matmul_tflops"] = round(self.matmul_flops_per_s / 1e12, 2)
        return out


def measure_copy_bandwidth(device: torch.device | str, *, rep_ms: float = 200.0) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read + bytes written.

    1 GiB on CUDA (far beyond L2, so it measures HBM); 64 MiB on CPU (keeps CI fast).
    """
    device = torch.device(device)
    nbytes = 2**30 if device.type == "cuda" else 64 * MIB
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup_ms=25.0, rep_ms=rep_ms, device=device)
    return 2 * nbytes / (t.median_ms * 1e-3)


def measure_matmul_tflops(device: torch.device | str, *, rep_ms: float = 200.0) -> float:
    """Dense matmul rate in FLOP/s: bf16 8192³ on CUDA, fp32 1024³ on CPU; random data,
    since zeros let the hardware save power and clock higher than real work does."""
    device = torch.device(device)
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, warmup_ms=25.0, rep_ms=rep_ms, device=device)
    return 2 * n**3 / (t.median_ms * 1e-3)


# ---------------------------------------------------------------------------- inputs

T = TypeVar("T")


def cache_bytes(device: torch.device | str) -> int:
    """Last-level cache the inputs must outgrow: the GPU's L2 (50 MB on an H100)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 10**6))
    return 32 * MIB


class InputRotation(Generic[T]):
    """Enough independent input sets that together they exceed the cache, used in turn.

    Timing one set over and over would measure cache hits for inputs that fit in L2; with
    sets whose total exceeds it, each call finds its inputs evicted. `make(i)` must build
    set i from random data (zeros take hardware fast paths that real data does not).
    """

    def __init__(self, make: Callable[[int], T], bytes_per_set: int, *, cache: int, max_sets: int = 8) -> None:
        count = max(1, min(max_sets, cache // max(bytes_per_set, 1) + 1))
        self.sets: list[T] = [make(i) for i in range(count)]
        self._next = 0

    def __len__(self) -> int:
        return len(self.sets)

    def next(self) -> T:
        item = self.sets[self._next]
        self._next = (self._next + 1) % len(self.sets)
        return item


# ---------------------------------------------------------------------------- records


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_record(
    *,
    op: str,
    provider: str,
    shape: dict[str, Any],
    dtype: torch.dtype | str,
    env: Environment,
    timing: Timing | None = None,
    bytes_moved: int | None = None,
    flops: int | None = None,
    ceilings: Ceilings = Ceilings(),
    peak_extra_mib: float | None = None,
    extra: dict[str, Any] | None = None,
) -> BenchRecord:
    """A record with the derived rates filled in; pass `timing=None` and extra["skipped"] to skip."""
    extra = {**ceilings.as_extra(), **(extra or {})}
    if env.dirty:
        extra["git_dirty"] = True
    floor = ceilings.floor_ms(bytes_moved, flops)
    median = timing.median_ms if timing else None
    seconds = median * 1e-3 if median else None
    return BenchRecord(
        op=op,
        provider=provider,
        shape=dict(shape),
        dtype=dtype if isinstance(dtype, str) else dtype_name(dtype),
        card=env.card,
        torch=env.torch,
        triton=env.triton,
        commit=env.commit,
        date=env.date,
        median_ms=median,
        p20_ms=timing.p20_ms if timing else None,
        p80_ms=timing.p80_ms if timing else None,
        peak_extra_mib=None if peak_extra_mib is None else round(peak_extra_mib, 1),
        bytes_moved=bytes_moved,
        flops=flops,
        achieved_gbps=bytes_moved / seconds / 1e9 if bytes_moved and seconds else None,
        achieved_tflops=flops / seconds / 1e12 if flops and seconds else None,
        floor_ms=floor,
        ratio_to_floor=median / floor if median and floor else None,
        extra=extra,
    )


def shape_label(shape: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def format_table(records: Iterable[BenchRecord]) -> str:
    """A plain-text table of records for the end of a run."""

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    rows = [("shape", "provider", "median ms", "p20-p80 ms", "GB/s", "TFLOP/s", "x floor", "extra MiB", "note")]
    for r in records:
        note = str(r.extra.get("skipped", "")) if r.skipped else ""
        spread = "-" if r.skipped else f"{r.p20_ms:.3f}-{r.p80_ms:.3f}"
        rows.append((
            shape_label(r.shape), r.provider, num(r.median_ms, ".3f"), spread, num(r.achieved_gbps, ".1f"),
            num(r.achieved_tflops, ".1f"), num(r.ratio_to_floor, ".2f"), num(r.peak_extra_mib, ".0f"), note[:60],
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
