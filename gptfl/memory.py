"""Tunes glibc's allocator for processes that stream weights in 1 MiB messages.

Every weight stream moves as ~1 MiB messages, each a fresh Python ``bytes`` on both ends.
glibc serves blocks that size with ``mmap`` by default (or after its dynamic threshold is
reset), so every message costs a map, an unmap and the page faults to touch 256 new pages:
about as much CPU as the sha256 of the same bytes (bench/transfer.py). Two settings avoid it
while keeping memory bounded:

- ``M_MMAP_THRESHOLD`` = 4 MiB: message-sized blocks come from the heap and are reused; what
  is larger (tensors, whole payload buffers) is still mapped and goes back to the system
  as soon as it is freed;
- ``M_TRIM_THRESHOLD`` = 32 MiB: at most that much free memory stays at the top of a heap.

Fixing the threshold also stops glibc from raising it after large frees, which had let peak
memory grow with the number of silos (docs/benchmarks.md, bench/aggregate.py). The
coordinator and the silo agent call :func:`tune_allocator` at start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# from <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 32 << 20


def tune_allocator() -> bool:
    """Sets glibc's mmap and trim thresholds; False (and no change) on other C libraries."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    log.debug("glibc allocator tuned: %s", ok)
    return ok
