"""Keep the heap from holding on to freed tensor memory (glibc only).

Streaming commands allocate and free the same few block-sized temporaries for every tensor
(4-128 MB: fp32 copies, row blocks of residuals and norms). glibc serves an allocation above its
mmap threshold with mmap and unmaps it on free, but the threshold is dynamic: once a block of up
to 32 MiB has been freed, later allocations of that size come from the heap, and the heap keeps
freed memory resident. Measured on ``factorize --rank 32`` of a 2 GiB fp16 checkpoint: peaks of
489-676 MB from run to run with glibc's defaults, 483-485 MB with a fixed 1 MiB threshold.

``limit_heap_retention`` fixes the threshold at 1 MiB (mallopt M_MMAP_THRESHOLD, which also
turns the dynamic adjustment off), the same as running with ``MALLOC_MMAP_THRESHOLD_=1048576``.
It is a no-op off glibc, and when the user has set that variable themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
THRESHOLD_BYTES = 1 << 20


def limit_heap_retention(threshold: int = THRESHOLD_BYTES) -> bool:
    """Serve allocations of at least ``threshold`` bytes by mmap, returned to the OS on free.

    Returns:
        True when the setting was applied; False off Linux/glibc or when
        ``MALLOC_MMAP_THRESHOLD_`` is already set in the environment.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
