"""The silos the coordinator has heard from, and which of them count as connected."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from gptfl.errors import PermissionDeniedError


@dataclass(frozen=True)
class SiloRecord:
    silo_id: str
    agent_version: str = ""
    device: str = ""
    num_train_examples: int = 0
    num_eval_examples: int = 0
    state: str = "idle"
    last_seen_monotonic: float = 0.0
    last_seen_unix: float = 0.0
    rounds_participated: int = 0
    examples_contributed: int = 0


class SiloRegistry:
    """Thread-safe record of silos; a silo is connected while it is heard from in time."""

    def __init__(
        self,
        *,
        timeout_s: float,
        allowed: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._timeout_s = timeout_s
        self._allowed = frozenset(allowed)
        self._clock = clock
        self._wall = wall_clock
        self._silos: dict[str, SiloRecord] = {}
        self._lock = threading.Lock()

    @property
    def allowed(self) -> frozenset[str]:
        """The silos that may connect (``allowed_silos``); empty: any silo."""
        return self._allowed

    def check_allowed(self, silo_id: str) -> None:
        if self._allowed and silo_id not in self._allowed:
            raise PermissionDeniedError(
                f"silo {silo_id!r} is not in this coordinator's allowed_silos"
            )

    def register(
        self,
        silo_id: str,
        *,
        agent_version: str,
        device: str,
        num_train_examples: int,
        num_eval_examples: int,
    ) -> SiloRecord:
        self.check_allowed(silo_id)
        with self._lock:
            record = self._silos.get(silo_id, SiloRecord(silo_id))
            record = replace(
                record,
                agent_version=agent_version,
                device=device,
                num_train_examples=num_train_examples,
                num_eval_examples=num_eval_examples,
                last_seen_monotonic=self._clock(),
                last_seen_unix=self._wall(),
            )
            self._silos[silo_id] = record
            return record

    def touch(self, silo_id: str, state: str | None = None) -> None:
        """Notes that ``silo_id`` was heard from (any RPC counts)."""
        self.check_allowed(silo_id)
        with self._lock:
            record = self._silos.get(silo_id, SiloRecord(silo_id))
            self._silos[silo_id] = replace(
                record,
                state=state if state is not None else record.state,
                last_seen_monotonic=self._clock(),
                last_seen_unix=self._wall(),
            )

    def record_participation(self, silo_id: str, examples: int) -> None:
        with self._lock:
            record = self._silos.get(silo_id, SiloRecord(silo_id))
            self._silos[silo_id] = replace(
                record,
                rounds_participated=record.rounds_participated + 1,
                examples_contributed=record.examples_contributed + examples,
            )

    def is_connected(self, record: SiloRecord) -> bool:
        return self._clock() - record.last_seen_monotonic <= self._timeout_s

    def connected(self) -> list[str]:
        with self._lock:
            return sorted(s for s, r in self._silos.items() if self.is_connected(r))

    def records(self, silo_ids: list[str]) -> list[SiloRecord]:
        """The records of the given silos (one that was never heard from has zero counts)."""
        with self._lock:
            return [self._silos.get(s, SiloRecord(s)) for s in silo_ids]

    def snapshot(self) -> list[SiloRecord]:
        with self._lock:
            return [self._silos[s] for s in sorted(self._silos)]
