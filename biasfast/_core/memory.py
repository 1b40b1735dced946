"""Keep a long streaming process's private memory flat: glibc's malloc raises its mmap threshold each time a large
mmapped block is freed, after which the per-chunk buffers (tens of MiB) come from the heap, where fragmentation
grows with the number of chunks (measured: `biasfast audit` +159 MiB anonymous at 10x the training rows, +3 MiB
with the threshold fixed; benchmarks/RESULTS.md). A fixed threshold turns that adjustment off: blocks above it are
mapped and returned to the system on free."""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
LARGE_BLOCK_BYTES = 1 << 20


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; False where there is no glibc mallopt."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES) == 1
