"""Process-wide settings for CPU speed, applied once when the CLI starts (and by the benchmark scripts)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters
MMAP_THRESHOLD_BYTES = 512 << 20  # blocks below this come from the reusable heap (activations reach ~100 MB)
TRIM_THRESHOLD_BYTES = 1 << 30  # keep up to 1 GB of freed heap instead of handing it back to the kernel


def keep_freed_memory() -> None:
    """Let glibc reuse freed tensor buffers instead of returning them to the kernel.

    PyTorch frees and re-allocates the same multi-megabyte activation buffers at every step. By default glibc
    maps blocks over 128 KB fresh from the kernel and unmaps them on free, so every step page-faults its
    activations in again: ~30,000 page faults and ~0.1 s of kernel time per cpu-recipe step here, ~1,000 and
    ~3 ms with this (benchmarks/train_throughput.py --profile). Without glibc (macOS, Windows, musl) it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
