"""Keep freed host memory in the process when training on the CPU.

glibc hands every freed block above its mmap threshold back to the kernel, so a CPU training
step that allocates and frees gigabytes of activations page-faults and zeroes all of them again
on the next step (a large share of a base CPU step: benchmarks/RESULTS.md, "CPU measurements cited by
the code").
Two process-wide settings keep that memory: glibc's `mallopt` (large blocks from the heap, which
is never trimmed) and torch's `THP_MEM_ALLOC_ENABLE` (2 MB pages for large tensors, read when
torch first allocates one). The cost is that the process keeps its peak host memory. GPU runs
are left alone: their activations live in CUDA's own caching allocator.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc malloc.h
_INT_MAX = 2 ** 31 - 1


def retain_freed_memory() -> bool:
    """Apply both settings; True when glibc accepted them (False on other C libraries)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS: no mallopt
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def retain_freed_memory_on_cpu() -> bool:
    import torch

    return False if torch.cuda.is_available() else retain_freed_memory()
