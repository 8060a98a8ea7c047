"""Launch configurations of the Triton ops as pure functions of (shape, device properties).

Every launcher asks these functions what to launch, so the choice a GPU would make can be
asked for on any machine: `fusion_loss_launch(8192, 128_256, H100)` is what an H100 runs.
`spec=None` means "not a CUDA device" (the Triton interpreter): wide blocks and a handful of
programs, since the interpreter's cost is per program and per op.

Occupancy. A persistent kernel's launcher asks for `programs_per_sm` programs on every SM;
they are resident together only if each thread needs at most
    regs_per_sm / (programs_per_sm · num_warps · 32)
registers (rounded down to the allocation unit of 8): 64 for 2 programs × 16 warps and for
4 programs × 8 warps on sm_80/sm_90. That budget is also handed to ptxas as `.maxnreg`
(Triton's `maxnreg` launch option): left alone, ptxas aims for more programs per SM than
the launcher can use and spills a few loop-invariant addresses to get to 40 registers
(measured: 12–24 bytes at 8 and 16 warps, triton 3.8); told the real budget it keeps them
in registers. `tests/test_compile_targets.py` compiles every configuration these functions
can return for sm_80 and sm_90 and checks the kernels fit it without spilling.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch

MIB = 1 << 20


@dataclass(frozen=True)
class DeviceSpec:
    """The properties of a CUDA device that the launch choices depend on."""

    name: str
    capability: tuple[int, int]
    sm_count: int
    l2_bytes: int
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_shared_per_block: int = 232448  # opt-in shared memory one program may use, bytes
    shared_per_sm: int = 233472

    @property
    def arch(self) -> int:
        """The compute capability as Triton's target wants it (90 for sm_90)."""
        return self.capability[0] * 10 + self.capability[1]


A100 = DeviceSpec("NVIDIA A100-SXM4-80GB", (8, 0), sm_count=108, l2_bytes=40 * MIB, max_shared_per_block=166912,
                  shared_per_sm=167936)
H100 = DeviceSpec("NVIDIA H100 80GB HBM3", (9, 0), sm_count=132, l2_bytes=50 * MIB)
H200 = DeviceSpec("NVIDIA H200", (9, 0), sm_count=132, l2_bytes=60 * MIB)
KNOWN_DEVICES = (A100, H100, H200)

_assumed: contextvars.ContextVar[DeviceSpec | None] = contextvars.ContextVar("fusellm_assumed_device", default=None)


@contextlib.contextmanager
def assume_device(spec: DeviceSpec) -> Iterator[None]:
    """Make the launchers choose as on `spec` for tensors that are not on a CUDA device.

    Used to record what a GPU would launch (the compile check runs the real launchers on
    meta tensors under this); kernels launched on CPU tensors under it are not meaningful."""
    token = _assumed.set(spec)
    try:
        yield
    finally:
        _assumed.reset(token)


_programs: contextvars.ContextVar[int | None] = contextvars.ContextVar("fusellm_programs_per_sm", default=None)


@contextlib.contextmanager
def persistent_programs(programs_per_sm: int) -> Iterator[None]:
    """Launch the fusion-loss kernel with `programs_per_sm` persistent programs per SM instead
    of the launcher's choice, for launches made inside the block (the benchmark's sweep:
    `with persistent_programs(3): fusion_loss(...)`). The register budget follows
    (`register_limit`); more programs than an SM's threads hold is refused."""
    if programs_per_sm < 1:
        raise ValueError(f"programs_per_sm must be at least 1, got {programs_per_sm}")
    token = _programs.set(programs_per_sm)
    try:
        yield
    finally:
        _programs.reset(token)


def device_spec(device: torch.device) -> DeviceSpec | None:
    """The spec of a CUDA device (read once per device), or None elsewhere (unless assumed)."""
    if device.type != "cuda":
        return _assumed.get()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_spec(index)


_SPECS: dict[int, DeviceSpec] = {}


def _cuda_spec(index: int) -> DeviceSpec:
    if index not in _SPECS:
        p = torch.cuda.get_device_properties(index)
        _SPECS[index] = DeviceSpec(
            name=p.name,
            capability=(p.major, p.minor),
            sm_count=p.multi_processor_count,
            l2_bytes=getattr(p, "L2_cache_size", 50 * MIB),
            regs_per_sm=getattr(p, "regs_per_multiprocessor", 65536),
            max_threads_per_sm=getattr(p, "max_threads_per_multi_processor", 2048),
            max_shared_per_block=getattr(p, "shared_memory_per_block_optin", 232448),
            shared_per_sm=getattr(p, "shared_memory_per_multiprocessor", 233472),
        )
    return _SPECS[index]


@dataclass(frozen=True)
class Launch:
    """One kernel launch: `grid` programs of `num_warps` warps, the kernel's block size
    (BLOCK_V, BLOCK_R or BLOCK_N, as the kernel names it), and the number of programs per
    SM the choice relies on being resident together (0: no assumption, e.g. the interpreter)."""

    grid: int
    num_warps: int
    block: int
    programs_per_sm: int
    maxnreg: int | None = None  # the register budget those programs leave each thread (None: ptxas decides)


def _launch(spec: DeviceSpec, grid: int, num_warps: int, block: int, programs_per_sm: int) -> Launch:
    return Launch(grid=grid, num_warps=num_warps, block=block, programs_per_sm=programs_per_sm,
                  maxnreg=register_limit(spec, num_warps, programs_per_sm) if programs_per_sm > 0 else None)


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


LARGE_VOCAB = 65536


TAIL_PROGRAMS_PER_SM = 2  # teacher_tail="bucket": see fusion_loss_launch


def fusion_loss_launch(n: int, v: int, spec: DeviceSpec | None, programs_per_sm: int | None = None,
                       elem_bytes: int = 2, row_aligned: bool = True, tail: bool = False) -> Launch:
    """The fusion-loss kernel: persistent programs over rows, a vocabulary block of ≤ 4096.

    On GPUs the programs in flight bound pass 2's L2 footprint (programs × V × bytes: the
    backwards walk re-reads the row's most recent blocks from L2) and a few programs per SM
    keep HBM busy: 4 programs of 8 warps below V = 65 536, 2 of 16 warps from there.
    `programs_per_sm` (or an enclosing `persistent_programs`) overrides that (the benchmark
    sweeps it).

    Block: 16 logits per thread where they arrive as 16-byte vectors (16-bit logits whose
    row stride is a multiple of 16 elements, `row_aligned`), else 8 — fp32 vectors hold 4
    logits, and an unaligned row (V = 50 257) is read element by element; either way 16 per
    thread would need more addresses than the 64-register budget holds (measured: 4–36
    bytes of spills at 8 warps).

    `tail` (teacher_tail="bucket"): 2 programs of 8 warps at every V (128 registers): its
    per-candidate Q_s accumulators, float64 block sums and per-entry β spilled 4–40 bytes in
    some variants at 64 registers (4 × 8 or 2 × 16 warps) and 4 bytes at 80 (3 × 8), measured
    with ptxas for sm_80/sm_90 on the CI set; it keeps 16 warps an SM in flight, half the default."""
    if spec is None:
        return Launch(grid=min(n, 4), num_warps=4, block=min(_next_power_of_2(v), 1 << 15), programs_per_sm=0)
    large = v >= LARGE_VOCAB and not tail
    pps = programs_per_sm if programs_per_sm is not None else _programs.get()
    pps = pps if pps is not None else (2 if large else (TAIL_PROGRAMS_PER_SM if tail else 4))
    warps = 16 if large else 8
    if pps * warps * 32 > spec.max_threads_per_sm:
        raise ValueError(f"{pps} programs per SM of {warps} warps need {pps * warps * 32} threads; "
                         f"an SM of {spec.name} holds {spec.max_threads_per_sm}")
    per_thread = 16 if elem_bytes <= 2 and row_aligned else 8
    block = min(4096, warps * 32 * per_thread)
    return _launch(spec, grid=max(1, min(n, spec.sm_count * pps)), num_warps=warps,
                   block=min(_next_power_of_2(v), block), programs_per_sm=pps)


def scale_rows_launch(n: int, v: int, spec: DeviceSpec | None, elem_bytes: int = 2, row_aligned: bool = True) -> Launch:
    """grad *= upstream row-wise: one program per row, the fusion loss's block and warps."""
    loss = fusion_loss_launch(n, v, spec, elem_bytes=elem_bytes, row_aligned=row_aligned)
    return dataclasses.replace(loss, grid=n)


def segment_weights_launch(n: int, spec: DeviceSpec | None) -> Launch:
    """One program per row (the segment's first row does the work); 4 warps, blocks of rows.
    Tiny programs: 8 per SM resident keeps the launch from being latency-bound."""
    if spec is None:
        return Launch(grid=n, num_warps=4, block=32, programs_per_sm=0)
    return _launch(spec, grid=n, num_warps=4, block=256, programs_per_sm=8)


def teacher_gather_launch(n: int, spec: DeviceSpec | None) -> Launch:
    """Blocks of 64 target rows per program, 4 warps, 8 programs per SM."""
    grid = -(-n // 64)
    if spec is None:
        return Launch(grid=grid, num_warps=4, block=64, programs_per_sm=0)
    return _launch(spec, grid=grid, num_warps=4, block=64, programs_per_sm=8)


def register_limit(spec: DeviceSpec, num_warps: int, programs_per_sm: int) -> int:
    """The most registers per thread at which `programs_per_sm` programs fit on one SM."""
    if programs_per_sm <= 0:
        return 255
    per_thread = spec.regs_per_sm // (programs_per_sm * num_warps * 32)
    return min(255, per_thread - per_thread % 8)


def resident_programs(spec: DeviceSpec, registers: int, num_warps: int, shared_bytes: int) -> int:
    """How many programs of this kernel one SM holds at once (registers, threads, shared memory)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = spec.regs_per_sm // (per_warp * num_warps)
    by_threads = spec.max_threads_per_sm // (num_warps * 32)
    by_shared = spec.shared_per_sm // (shared_bytes + 1024) if shared_bytes else by_threads  # 1 KiB reserved per program
    return max(0, min(by_regs, by_threads, by_shared, 32))
