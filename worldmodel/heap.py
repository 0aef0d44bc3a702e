"""Freed memory kept in the process, so that a training step's large tensors stop page-faulting every step.

glibc's malloc serves every request above a threshold (128 KiB at first, adapting up to 32 MiB) with a fresh
``mmap`` and unmaps it when it is freed. A vision step of the ``cpu`` profile allocates and frees several hundred
megabytes of activations and gradients, so the kernel maps, zeroes and faults in new pages for all of them on every
step: ~150,000 page faults a step, a quarter of its time on 2 cores with AVX-512 kernels (docs/PERFORMANCE.md,
"Freed memory kept in the process"). With ``mmap`` off for malloc (``M_MMAP_MAX`` 0) and the heap's top never given
back (``M_TRIM_THRESHOLD`` at its largest), a step runs in the pages of the steps before it, once the heap has
settled (a few steps). The process then holds its peak memory for the whole run, 5-15% above glibc's peak in the
measurements. Other C libraries (macOS, musl) are left as they are.

The setting is the process's, from the call on, and cannot be undone: the entry points call ``keep_freed_memory``
before they build anything; a library import never does.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_MAX = -4
TRIM_NEVER = 2**31 - 1  # mallopt takes an int: the heap's top is given back only beyond 2 GiB free


class HeapDecision(NamedTuple):
    """Whether freed memory stays in the process, and why, as printed once and stored in summary.json."""

    kept: bool
    reason: str


def glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (it has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory(enabled: bool = True) -> HeapDecision:
    """Tell glibc's malloc to keep freed memory in the process (``enabled``), or say why it is left alone."""
    if not enabled:
        return HeapDecision(False, "heap: glibc's defaults (--no-keep-freed-memory)")
    libc = glibc()
    if libc is None:
        return HeapDecision(False, "heap: not glibc, its allocator left as it is")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER) != 1:
        return HeapDecision(False, "heap: glibc refused mallopt, its allocator left as it is")
    return HeapDecision(True, f"heap: freed memory kept in the process (glibc {libc.gnu_get_libc_version().decode()}: "
                              "no mmap per large tensor, no trimming)")
