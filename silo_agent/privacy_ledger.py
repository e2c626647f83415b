"""The silo's privacy ledger: every DP-SGD step it ever took on its training data.

One JSON file in the silo's ``state_dir`` (:data:`LEDGER_FILE`) holds, per job, the noise
multiplier the job runs at, the rounds trained and the accountant history
(:class:`~silo_agent.dp_budget.Mechanism` entries) of those rounds, in the order the jobs
began. A job's epsilon is the composition of its own history; the lifetime epsilon is the
composition of every job's (all of them ran on the same data).

The file is rewritten after every round, before the round's update leaves the silo,
atomically (:mod:`gptfl.atomic_io`: a crash leaves the old file or the new one), with the
SHA-256 of its content beside it. At start it is read back; a file that does not parse,
does not match its checksum, or holds a value no ledger can hold makes the silo refuse to
start (:class:`gptfl.errors.ConfigError`, exit 3) and is left as it is: the spend is never
reset by the silo. A missing file is an empty ledger (a new silo, or one whose ledger an
admin deleted: the coordinator flags the epsilon that then goes down).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptfl import atomic_io
from gptfl.errors import ConfigError, GptflError
from silo_agent.dp_budget import Mechanism, compose

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
LEDGER_FORMAT = 1


@dataclass(frozen=True)
class JobLedger:
    """What one job has spent.

    Attributes:
        job_id: the job.
        noise_multiplier: the noise the job runs at (fixed at its first round).
        rounds: the rounds trained, in order (a round trained twice, e.g. after a failed
            upload, appears twice: both updates may have left the silo).
        history: the accountant history of those rounds, merged (:func:`compose`).
    """

    job_id: str
    noise_multiplier: float
    rounds: tuple[int, ...]
    history: tuple[Mechanism, ...]


class LedgerDamagedError(ConfigError):
    """The ledger file cannot be trusted; the silo does not start (and never resets it)."""


class PrivacyLedger:
    """The ledger of one silo (see the module docstring); one process writes it."""

    def __init__(self, path: Path, jobs: Sequence[JobLedger] = ()) -> None:
        """Use :meth:`open`.

        Args:
            path: the ledger file.
            jobs: the jobs it holds, in the order they began.
        """
        self.path = path
        self._jobs: dict[str, JobLedger] = {job.job_id: job for job in jobs}

    @classmethod
    def open(cls, state_dir: Path) -> PrivacyLedger:
        """The ledger in ``state_dir``: read back, or empty when there is no file.

        Raises:
            LedgerDamagedError: the file is unreadable, does not match its checksum, or
                holds a value no ledger holds (one line naming the file and the fault).
        """
        path = state_dir / LEDGER_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise LedgerDamagedError(_damaged(path, exc.strerror or str(exc))) from None
        try:
            jobs = _parse(raw)
        except _Fault as fault:
            raise LedgerDamagedError(_damaged(path, str(fault))) from None
        return cls(path, jobs)

    def jobs(self) -> Iterator[JobLedger]:
        """The jobs, in the order they began."""
        return iter(self._jobs.values())

    def job(self, job_id: str) -> JobLedger | None:
        """What ``job_id`` has spent; None before its first round."""
        return self._jobs.get(job_id)

    def job_history(self, job_id: str) -> tuple[Mechanism, ...]:
        """The accountant history of ``job_id`` (empty before its first round)."""
        job = self._jobs.get(job_id)
        return job.history if job is not None else ()

    def lifetime_history(self) -> tuple[Mechanism, ...]:
        """Every job's history, one after the other: all of them ran on this data."""
        return compose(entry for job in self._jobs.values() for entry in job.history)

    def record(
        self,
        job_id: str,
        *,
        round_: int,
        noise_multiplier: float,
        spent: Sequence[Mechanism],
    ) -> JobLedger:
        """Adds a trained round to ``job_id`` and writes the ledger to disk (atomically).

        Called before the round's update leaves the silo; the ledger in memory changes only
        once the file is written.

        Args:
            job_id: the job.
            round_: the round trained.
            noise_multiplier: the job's noise (kept from the job's first round).
            spent: the round's accountant history (the engine's own).

        Returns:
            The job's ledger with the round.

        Raises:
            GptflError: the file cannot be written (the update must not be sent).
        """
        before = self._jobs.get(job_id)
        job = JobLedger(
            job_id=job_id,
            noise_multiplier=before.noise_multiplier if before else noise_multiplier,
            rounds=(*(before.rounds if before else ()), round_),
            history=compose([*(before.history if before else ()), *spent]),
        )
        jobs = dict(self._jobs)
        jobs[job_id] = job
        try:
            atomic_io.write_text(self.path, _render(list(jobs.values())))
        except OSError as exc:
            raise GptflError(
                f"cannot write the privacy ledger {self.path}: {exc.strerror or exc}"
            ) from exc
        self._jobs = jobs
        return job


def _damaged(path: Path, why: str) -> str:
    return (
        f"the privacy ledger {path} is damaged ({why}); the silo will not start with it. "
        "Restore it from a backup: deleting it would forget this silo's privacy spend"
    )


class _Fault(Exception):
    """What is wrong with a ledger file's content."""


def _body(jobs: Sequence[JobLedger]) -> dict[str, Any]:
    return {
        "jobs": [
            {
                "job_id": job.job_id,
                "noise_multiplier": job.noise_multiplier,
                "rounds": list(job.rounds),
                "history": [[e.noise_multiplier, e.sample_rate, e.steps] for e in job.history],
            }
            for job in jobs
        ]
    }


def ledger_checksum(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _render(jobs: Sequence[JobLedger]) -> str:
    body = _body(jobs)
    document = {"format": LEDGER_FORMAT, "ledger": body, "sha256": ledger_checksum(body)}
    return json.dumps(document, indent=1, allow_nan=False) + "\n"


def _parse(raw: bytes) -> list[JobLedger]:
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Fault(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or set(document) != {"format", "ledger", "sha256"}:
        raise _Fault("not a ledger document")
    if document["format"] != LEDGER_FORMAT:
        raise _Fault(f"format {document['format']!r}, this silo reads {LEDGER_FORMAT}")
    body = document["ledger"]
    if not isinstance(body, dict) or set(body) != {"jobs"} or not isinstance(body["jobs"], list):
        raise _Fault("no list of jobs")
    try:
        digest = ledger_checksum(body)
    except ValueError as exc:  # NaN or infinity in the body
        raise _Fault(str(exc)) from None
    if digest != document["sha256"]:
        raise _Fault("checksum mismatch")
    jobs = [_job(entry) for entry in body["jobs"]]
    if len({job.job_id for job in jobs}) != len(jobs):
        raise _Fault("a job appears twice")
    return jobs


def _job(entry: Any) -> JobLedger:
    keys = {"job_id", "noise_multiplier", "rounds", "history"}
    if not isinstance(entry, dict) or set(entry) != keys:
        raise _Fault("a job entry without exactly job_id, noise_multiplier, rounds, history")
    job_id = entry["job_id"]
    if not isinstance(job_id, str) or not job_id:
        raise _Fault("a job without an id")
    rounds, history = entry["rounds"], entry["history"]
    if not isinstance(rounds, list) or not all(_count(r) for r in rounds):
        raise _Fault(f"job {job_id}: rounds are not positive integers")
    if not isinstance(history, list):
        raise _Fault(f"job {job_id}: no history list")
    return JobLedger(
        job_id=job_id,
        noise_multiplier=_positive(entry["noise_multiplier"], f"job {job_id}: noise_multiplier"),
        rounds=tuple(rounds),
        history=tuple(_mechanism(item, job_id) for item in history),
    )


def _mechanism(item: Any, job_id: str) -> Mechanism:
    if not isinstance(item, list) or len(item) != 3:
        raise _Fault(f"job {job_id}: a history entry is not [noise, rate, steps]")
    noise, rate, steps = item
    rate = _positive(rate, f"job {job_id}: a sampling rate")
    if rate > 1 or not _count(steps):
        raise _Fault(f"job {job_id}: a history entry out of range")
    return Mechanism(_positive(noise, f"job {job_id}: a noise multiplier"), rate, steps)


def _count(value: Any) -> bool:
    return type(value) is int and value >= 1


def _positive(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise _Fault(f"{what} is not a positive number")
    return float(value)
