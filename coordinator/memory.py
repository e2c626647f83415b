"""Keeps the coordinator's memory near what it holds, not what it once held.

glibc's malloc raises its mmap threshold after large blocks are freed, so later ~1 MiB
buffers (gRPC messages, chunk copies) land in per-thread arenas and are never returned to the
system. Across many uploads that made peak memory grow with the number of silos
(docs/benchmarks.md, bench/aggregate.py). A fixed threshold keeps such buffers in mmap'd
blocks that go back to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from <malloc.h>
MMAP_THRESHOLD_BYTES = 128 * 1024


def pin_mmap_threshold() -> bool:
    """Fixes glibc's mmap threshold; False (and no change) on other C libraries."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    log.debug("mallopt(M_MMAP_THRESHOLD, %d): %s", MMAP_THRESHOLD_BYTES, ok)
    return ok
