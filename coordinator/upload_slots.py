"""Bounds how many updates are received at once, and reuses their receive buffers.

Each update being received needs a buffer of the model's size. Holding at most
``max_concurrent_uploads`` of them bounds the coordinator's memory (bench/aggregate.py). A silo
sends its weights only once it holds a slot (``UploadReply.ready``), so silos that wait hold
nothing in the coordinator's transport buffers either. Handing a finished upload's buffer to
the next one saves faulting in fresh pages for every update, about 0.05 s of CPU per 100 MB
(twice the update's BLAKE3 digest, bench/transfer.py). The job drops the kept buffers when a
round's uploads are over, so they cost nothing while the round closes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from gptfl.weights import PayloadBuffer, new_payload_buffer


class UploadSlots:
    """``count`` slots; while held, a slot lends receive buffers, returned when it is let go."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"need at least one upload slot, got {count}")
        self._count = count
        self._slots = threading.BoundedSemaphore(count)
        self._lock = threading.Lock()
        self._spare: list[PayloadBuffer] = []
        self._generation = 0  # advanced by drop_spares()

    @contextmanager
    def slot(self, timeout_s: float) -> Iterator[Callable[[int], PayloadBuffer] | None]:
        """Waits up to ``timeout_s`` for a free slot.

        Yields ``None`` when none freed up in time, else a function that lends a buffer of the
        given size (contents unspecified). Lent buffers go back to the pool when the block
        ends, so nothing may keep views into them beyond it.
        """
        if not self._slots.acquire(timeout=max(0.0, timeout_s)):
            yield None
            return
        with self._lock:
            generation = self._generation
        lent: list[PayloadBuffer] = []

        def lend(nbytes: int) -> PayloadBuffer:
            buffer = self._take(nbytes)
            lent.append(buffer)
            return buffer

        try:
            yield lend
        finally:
            with self._lock:
                # An upload that ends after drop_spares() keeps nothing: the round is closing.
                for buffer in lent:
                    if generation == self._generation and len(self._spare) < self._count:
                        self._spare.append(buffer)
            self._slots.release()

    def prepare(self, nbytes: int) -> None:
        """Allocates one buffer of ``nbytes`` ahead of need (when no spare of that size is kept),
        its pages faulted in now (a bytearray is zeroed as it is made)."""
        with self._lock:
            if any(len(spare) == nbytes for spare in self._spare):
                return
        buffer = bytearray(nbytes)
        with self._lock:
            if len(self._spare) < self._count:
                self._spare.append(buffer)

    def drop_spares(self) -> None:
        """Frees the buffers kept for reuse, and those of uploads still in progress as they end
        (the round's uploads are over)."""
        with self._lock:
            self._spare.clear()
            self._generation += 1

    def _take(self, nbytes: int) -> PayloadBuffer:
        with self._lock:
            for i, spare in enumerate(self._spare):
                if len(spare) == nbytes:
                    return self._spare.pop(i)
            self._spare.clear()  # another size: the model changed, the old buffers are useless
        return new_payload_buffer(nbytes)
