"""Host memory that stays with the process between steps (glibc's malloc, on Linux).

On CPU, XLA allocates each step's temporaries as one block (gigabytes for a BERT-base Q-Former step).
glibc's malloc serves any block over its mmap threshold (at most 32 MiB) with a fresh mmap and returns
it to the kernel on free, so every step faults its temporaries in again, page by page, and the kernel
zeroes each page. Measured on a 2-core VM for `slit bench stage1`: 1.08 M page faults and 5 s of system
time per step; with freed memory kept in the process, none, and the step went from 11.2 s to 8.9 s.

`keep_freed_memory()` sets three malloc parameters through `mallopt`, before the threads that allocate
exist: no mmap for large blocks (M_MMAP_MAX=0: they come from the heap, where a freed block is reused),
no returning of the heap's top to the kernel (M_TRIM_THRESHOLD), one arena for all threads
(M_ARENA_MAX=1: other threads' arenas would still mmap blocks larger than their 64 MiB heaps). The
process then keeps its peak host memory until it exits, which a training or benchmark process reaches
in its first step anyway; with one arena, XLA's (multithreaded, malloc-heavy) compilation takes ~20%
longer (stage-one bench: 52 -> 63 s), once per run. The `slit` command sets this when it starts (not
when `slit.cli.main` is called from another program). `SLIT_KEEP_FREED_MEMORY=0` turns it off;
elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc malloc.h
NEVER_TRIM = -1  # glibc stores the trim threshold as size_t: -1 is the largest, so never


def keep_freed_memory() -> bool:
    """Applies the malloc parameters above; returns whether they were set (glibc, not turned off)."""
    if os.environ.get("SLIT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:  # glibc's soname (find_library would start `ldconfig` on every `slit` command)
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))
    return all(mallopt(option, value) == 1 for option, value in settings)
