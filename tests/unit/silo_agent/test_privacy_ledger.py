"""The privacy ledger round-trips through disk; a damaged file is refused and left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptfl.errors import ConfigError, GptflError
from silo_agent.dp_budget import Mechanism
from silo_agent.privacy_ledger import (
    LEDGER_FILE,
    JobLedger,
    LedgerDamagedError,
    PrivacyLedger,
    ledger_checksum,
)

A = Mechanism(0.7440185546875, 1 / 13, 13)
B = Mechanism(1.5, 0.25, 8)


def _filled(state_dir: Path) -> PrivacyLedger:
    ledger = PrivacyLedger.open(state_dir)
    ledger.record("job-1", round_=1, noise_multiplier=A.noise_multiplier, spent=[A])
    ledger.record("job-1", round_=2, noise_multiplier=A.noise_multiplier, spent=[A])
    ledger.record("job-2", round_=1, noise_multiplier=B.noise_multiplier, spent=[B])
    return ledger


def test_a_missing_ledger_is_empty_and_nothing_is_written_before_a_round(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    assert list(ledger.jobs()) == [] and ledger.lifetime_history() == ()
    assert ledger.job("job-1") is None and ledger.job_history("job-1") == ()
    assert not (tmp_path / LEDGER_FILE).exists()


def test_the_ledger_round_trips_through_disk(tmp_path: Path) -> None:
    written = _filled(tmp_path)
    again = PrivacyLedger.open(tmp_path)
    assert (
        list(again.jobs())
        == list(written.jobs())
        == [
            JobLedger(
                "job-1",
                A.noise_multiplier,
                (1, 2),
                (Mechanism(A.noise_multiplier, A.sample_rate, 26),),
            ),
            JobLedger("job-2", B.noise_multiplier, (1,), (B,)),
        ]
    )
    # every job on this data, in the order they began
    assert again.lifetime_history() == (Mechanism(A.noise_multiplier, A.sample_rate, 26), B)
    # floats survive exactly: the composed history is the one the noise was calibrated on
    assert again.job_history("job-1")[0].sample_rate == 1 / 13


def test_the_job_keeps_the_noise_of_its_first_round(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    ledger.record("job", round_=1, noise_multiplier=2.0, spent=[Mechanism(2.0, 0.1, 10)])
    job = ledger.record("job", round_=2, noise_multiplier=3.0, spent=[Mechanism(2.0, 0.1, 10)])
    assert job.noise_multiplier == 2.0 and job.history == (Mechanism(2.0, 0.1, 20),)
    # a round trained twice (both updates may have left the silo) counts twice
    job = ledger.record("job", round_=2, noise_multiplier=2.0, spent=[Mechanism(2.0, 0.1, 10)])
    assert job.rounds == (1, 2, 2) and job.history == (Mechanism(2.0, 0.1, 30),)


def _retotal(text: str) -> str:
    """Edits a step count and recomputes nothing: the checksum catches it."""
    document = json.loads(text)
    document["ledger"]["jobs"][0]["history"][0][2] = 1
    return json.dumps(document)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda text: text[: len(text) // 2], "not JSON"),
        (lambda text: "", "not JSON"),
        (lambda text: "[]", "not a ledger document"),
        (_retotal, "checksum mismatch"),
        (lambda text: text.replace('"format": 1', '"format": 2'), "format 2"),
        (lambda text: text.replace('"sha256": "', '"sha256": "0', 1), "checksum mismatch"),
    ],
)
def test_a_damaged_ledger_is_refused_and_left_as_it_is(
    tmp_path: Path, damage: object, why: str
) -> None:
    _filled(tmp_path)
    path = tmp_path / LEDGER_FILE
    assert callable(damage)
    damaged = damage(path.read_text())
    path.write_text(damaged)
    with pytest.raises(LedgerDamagedError) as refused:
        PrivacyLedger.open(tmp_path)
    message = str(refused.value)
    assert isinstance(refused.value, ConfigError)  # the silo exits 3
    assert "\n" not in message
    assert message.startswith(f"the privacy ledger {path} is damaged ({why}")
    assert message.endswith("deleting it would forget this silo's privacy spend")
    assert path.read_text() == damaged  # never reset, never rewritten


def test_a_value_no_ledger_holds_is_refused_even_with_a_matching_checksum(
    tmp_path: Path,
) -> None:
    """A checksum is no proof of sense: a ledger written by a bug or by hand is checked too."""
    _filled(tmp_path)
    path = tmp_path / LEDGER_FILE
    document = json.loads(path.read_text())
    for job in document["ledger"]["jobs"]:
        job["history"][0][1] = 1.5  # a sampling rate above 1
    document["sha256"] = ledger_checksum(document["ledger"])
    path.write_text(json.dumps(document))
    with pytest.raises(LedgerDamagedError, match=r"job job-1: a history entry out of range"):
        PrivacyLedger.open(tmp_path)


def test_an_unwritable_ledger_keeps_the_spend_in_memory_unchanged(tmp_path: Path) -> None:
    """The update must not leave when its spend could not be written."""
    ledger = _filled(tmp_path)
    before = list(ledger.jobs())
    path = tmp_path / LEDGER_FILE
    path.unlink()
    path.mkdir()  # a file cannot replace a folder, whoever writes
    with pytest.raises(GptflError, match="cannot write the privacy ledger"):
        ledger.record("job-1", round_=3, noise_multiplier=A.noise_multiplier, spent=[A])
    assert list(ledger.jobs()) == before
