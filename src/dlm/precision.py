"""Which precision and how many threads dlm computes with on this machine.

bfloat16 is fast only where the hardware computes it natively: CUDA GPUs that support it (Ampere and later) and
CPUs with AMX or AVX512_BF16, whose oneDNN kernels PyTorch uses. Elsewhere PyTorch emulates bf16 and a matmul runs
tens of times slower than in float32 (issue 17: 0.2 vs 47 GFLOP/s on an AVX2-only AMD EPYC; on this project's
Xeon with oneDNN capped at AVX2, a 256 x 256 matmul 79-121x slower). So `precision="auto"` (the default of every
training and evaluation command) means bf16 only where it is native and float32 elsewhere; forcing bf16 where it
is emulated works but warns once, with the ratio measured here.

The CPU question is answered from the CPU's flags (torch.cpu's cpuinfo, else /proc/cpuinfo): without amx_bf16 or
avx512_bf16, bf16 is emulated. With them (or on a CPU whose flags are unknown) a short probe decides, because a
flag is not enough: oneDNN may be capped below it (ONEDNN_MAX_CPU_ISA) or predate it. The probe times a 256 x 256
matmul in both dtypes (a few ms where native) once per process.

Threads: torch's OpenMP threads wait for each other at every op, so a thread whose core another process takes
stalls them all. On this project's 2-core machine `lm.generate` (128 tokens, 64 steps) took 0.72 s with one
thread and 0.48 s with two when idle, but 22 s with two beside one CPU-bound process, against 0.71 s with one
(benchmarks/results/threads.json). The default (`threads=0`) therefore leaves one core free: max(1, CPUs - 1),
and only ever lowers torch's own count; OMP_NUM_THREADS, when set, is obeyed.

    resolve_precision("auto", "cpu")   # "bf16" on AMX / AVX512_BF16, else "fp32"
    with autocast("cpu", "bf16"): ...
    lm = DiffusionLM.from_pretrained("default", dtype="auto")   # resolve_dtype
    set_threads(0)                     # the default; set_threads(4) for exactly four
"""

from __future__ import annotations

import functools
import os
import platform
import time
import warnings
from contextlib import AbstractContextManager
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = ("auto", "float32", "bfloat16", "float16")
NATIVE_RATIO = 2.0  # bf16 / fp32 matmul time below which bf16 counts as native (native: 0.3-1.1; emulated: > 40)
PROBE_N = 256  # probe matmul size: big enough that the emulated path shows (small ones hide in call overhead)
_warned: set[str] = set()


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else what `platform` knows): every speed figure names it."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_flags() -> dict[str, bool] | None:
    """{"amx_bf16": ..., "avx512_bf16": ...} for an x86 CPU, None where they do not apply or cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None
    cpu = getattr(torch, "cpu", None)
    amx, avx = getattr(cpu, "_is_amx_tile_supported", None), getattr(cpu, "_is_avx512_bf16_supported", None)
    if amx is not None and avx is not None:  # cpuinfo, as PyTorch itself sees the CPU
        try:
            return {"amx_bf16": bool(amx()), "avx512_bf16": bool(avx())}
        except RuntimeError:
            pass
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    words = set(flags.split(":", 1)[1].split())
    return {"amx_bf16": "amx_bf16" in words, "avx512_bf16": "avx512_bf16" in words}


@functools.lru_cache(maxsize=1)
def bf16_matmul_ratio() -> float:
    """Time of a bf16 matmul over that of a float32 one on this CPU, on one thread (best of a few; cached)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(PROBE_N, PROBE_N, generator=g), torch.randn(PROBE_N, PROBE_N, generator=g)

    def best(x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
        x @ y  # warm-up: oneDNN compiles its kernel on the first call
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a busy machine stalls multi-threaded kernels and hides the difference
    try:
        fp32 = best(a, b, 5)
        bf16 = best(a.bfloat16(), b.bfloat16(), 2)
    finally:
        torch.set_num_threads(threads)
    return bf16 / max(fp32, 1e-9)


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Does `device` compute bfloat16 natively (fast), rather than emulate it?"""
    kind = _device_type(device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no including_emulation argument
            return bool(torch.cuda.is_bf16_supported())
    if kind != "cpu":
        return False  # mps, xpu, ...: not measured here; float32 is the safe choice
    flags = cpu_bf16_flags()
    if flags is not None and not any(flags.values()):
        return False  # no bf16 instructions at all: emulated, no need to measure
    return bf16_matmul_ratio() < NATIVE_RATIO


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """"auto" | "fp32" | "bf16" -> "fp32" | "bf16" for `device`: auto is bf16 only where it is native.

    Forcing "bf16" where it is emulated is allowed (e.g. to reproduce a bf16 run) but warns once per device type,
    with the measured slowdown."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        _warn_emulated(_device_type(device))
    return precision


def _warn_emulated(kind: str) -> None:
    if kind in _warned:
        return
    _warned.add(kind)
    if kind == "cpu":
        how = f"a bf16 matmul measured {bf16_matmul_ratio():.0f}x slower than float32 here"
    else:
        how = f"{kind} does not support it natively"
    warnings.warn(f"bf16 is emulated on this {kind} ({how}); --precision auto (or fp32) is faster",
                  RuntimeWarning, stacklevel=3)


def autocast(device: str | torch.device, precision: str) -> AbstractContextManager:
    """torch.autocast to bf16 for a resolved precision "bf16"; a disabled autocast (float32) for "fp32"."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"autocast takes a resolved precision (fp32 or bf16), got {precision!r}")
    return torch.autocast(_device_type(device), dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype weights are loaded in: a name ("float32", "bfloat16", "float16"), a torch.dtype, or "auto".

    auto: bfloat16 where the device computes it natively, else float32, whatever the checkpoint stores. On this
    project's AMX Xeon the shipped default model (stored in bf16) generates 128 tokens in 64 steps in 0.42 s in
    bf16 against 0.73 s in float32 (one thread); with oneDNN capped at AVX2 (bf16 emulated) bf16 took 4.5 s
    against 1.1 s. So even a float32 checkpoint is read as bf16 where bf16 is native: it is faster there."""
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype, None) if dtype in DTYPES else None
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    if resolved == torch.bfloat16 and not native_bf16(device):
        _warn_emulated(_device_type(device))
    return resolved


# ----- threads ----------------------------------------------------------------------------------------------
def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """One fewer than the usable CPUs (at least 1), so that one other busy process cannot stall torch's threads."""
    return max(1, usable_cpus() - 1)


def set_threads(threads: int = 0) -> int:
    """Apply a --threads value once, for every command: n > 0 sets exactly n; 0 (the default) lowers torch's
    count to `default_threads()` unless OMP_NUM_THREADS is set. Returns the number of threads now in use."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: the default, {default_threads()} here), got {threads}")
    if threads > 0:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > default_threads():
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()
