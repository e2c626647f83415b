"""Tunes glibc's allocator for processes that stream weights in 1 MiB messages.

Every weight stream moves as ~1 MiB messages, each a fresh Python ``bytes`` on both ends.
glibc serves blocks that size with ``mmap`` by default (or after its dynamic threshold is
reset), so every message costs a map, an unmap and the page faults to touch 256 new pages:
about 0.05 s of CPU per 100 MB, more than the digest of the same bytes (bench/transfer.py).
These settings avoid it while keeping memory bounded:

- ``M_MMAP_THRESHOLD`` = 4 MiB: message-sized blocks come from the heap and are reused; what
  is larger (tensors, whole payload buffers) is still mapped and goes back to the system
  as soon as it is freed;
- ``M_TRIM_THRESHOLD`` = 32 MiB: at most that much free memory stays at the top of a heap;
- ``M_ARENA_MAX`` = 1: one heap for all threads. gRPC serves each call on its own thread, and
  with an arena per thread every arena kept its own freed message buffers: about 0.9 MiB more
  coordinator memory per connected silo (bench/aggregate.py, 2 against 32 silos), against
  0.2 MiB with one arena. Python allocates small objects itself, so the one heap's lock is
  taken about once per message, not per object.

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
M_ARENA_MAX = -8
ARENA_MAX = 1
MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 32 << 20


def tune_allocator() -> bool:
    """Applies the settings above; False (and no change) on other C libraries."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_ARENA_MAX, ARENA_MAX),
    )
    applied = [bool(mallopt(param, value)) for param, value in settings]  # each, always
    ok = all(applied)
    log.debug("glibc allocator tuned: %s", ok)
    return ok
