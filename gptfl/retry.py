"""Jittered exponential backoff for reconnecting and for idempotent calls."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays of ``initial * multiplier**n`` capped at ``maximum``, with "full jitter".

    Full jitter (a uniform draw between zero and the capped delay) keeps many silos that lost
    the coordinator at the same moment from reconnecting in lock step.
    """

    initial_s: float = 0.5
    maximum_s: float = 30.0
    multiplier: float = 2.0

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        rng = rng or random.Random()
        ceiling = self.initial_s
        while True:
            yield rng.uniform(self.initial_s / 2, ceiling)
            ceiling = min(self.maximum_s, ceiling * self.multiplier)
