"""The machine a process runs on: CPU cores, the torch device, and allocator settings.

torch is imported inside the functions that need it, so that describing a run stays light.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from pathlib import Path

from segpipe.core.errors import ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def available_cores() -> int:
    """CPU cores this process may run on (its CPU affinity where the OS has one, else all cores)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def local_gpus() -> int:
    """CUDA devices torch sees on this machine (0 without CUDA)."""
    import torch  # lazy: torch takes 2 s to import; the CLI and the driver ask for cores without it

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def resolve_device(choice: str, *, gpus: int | None = None) -> str:
    """``auto`` -> ``cuda`` when there is a GPU, else ``cpu``; ``cpu`` and ``cuda`` as asked.

    Args:
        choice: ``auto``, ``cpu`` or ``cuda``.
        gpus: GPUs available where the work runs (a cluster's count); default: this machine's.

    Raises:
        ConfigError: an unknown choice, or ``cuda`` where there is no GPU.
    """
    if choice not in DEVICES:
        raise ConfigError(f"--device must be auto, cpu or cuda, got {choice!r}")
    if choice == "cpu":
        return "cpu"
    count = local_gpus() if gpus is None else gpus
    if choice == "cuda" and count == 0:
        raise ConfigError("--device cuda was asked for but there is no CUDA GPU; use --device cpu or auto")
    return "cuda" if count > 0 else "cpu"


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 instructions (AVX512-BF16 or AMX-BF16; read from /proc/cpuinfo, so False
    off Linux). There bf16 autocast is fast; elsewhere it is emulated and slower than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def retain_freed_memory(threshold: int = 1 << 30) -> bool:
    """Let the C heap reuse freed memory instead of mapping fresh pages for every large tensor (glibc, Linux).

    A forward or backward pass allocates activation tensors of tens to hundreds of megabytes and frees them.
    glibc serves allocations above its mmap threshold (at most 32 MiB by default) with fresh mappings and returns
    them on free, so every batch faults in and zeroes its activations again, in system time. Raising the mmap
    threshold to ``threshold`` bytes and the trim threshold to its maximum (2 GiB; mallopt takes a C int) keeps
    freed memory in the heap for the next batch. Results are unchanged; the process's peak is that of one pass,
    but it is not handed back between passes. Effect measured in ``benchmarks/bench_models.py`` and
    ``benchmarks/bench_train_step.py`` (see ``benchmarks/README.md``).

    Returns:
        True if both thresholds were set; False where ``mallopt`` is missing or refuses (another C library).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = bool(mallopt(m_mmap_threshold, threshold)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    log.debug("malloc thresholds %s", "raised" if ok else "unchanged")
    return ok


def process_started_at() -> float:
    """When this process started, as a ``time.time()`` value: on Linux from its start in clock ticks since boot
    (``/proc/self/stat``) and the time since boot (``/proc/uptime``), to 10 ms; elsewhere when this module was first
    imported."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5), counted after the command name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()
