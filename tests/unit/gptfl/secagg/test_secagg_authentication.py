"""Silos' keys are vouched for by their TLS identities; the coordinator cannot forge them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gptfl import pki
from gptfl.errors import PeerKeyError, PkiError
from gptfl.secagg.authentication import SiloCredentials, sign_advertisement
from gptfl.secagg.messages import KeyAdvertisement, RoundContext
from tests.unit.gptfl.secagg.protocol_driver import Cohort

CONTEXT = RoundContext("job-a", 4)


def _advertise(credentials: SiloCredentials, context: RoundContext = CONTEXT) -> KeyAdvertisement:
    return sign_advertisement(
        credentials, context, cipher_public=b"c" * 32, mask_public=b"m" * 32, num_examples=7
    )


def test_a_silos_signed_keys_verify(cohort: Cohort) -> None:
    advertisement = _advertise(cohort.credentials["silo-01"])
    assert advertisement.silo_id == "silo-01"
    cohort.verifier.verify(advertisement, CONTEXT)


@pytest.mark.parametrize(
    "change",
    [
        {"mask_public": b"x" * 32},  # the coordinator swaps in a key of its own
        {"cipher_public": b"x" * 32},
        {"num_examples": 70},
        {"signature": b"\x30\x00"},
    ],
)
def test_keys_altered_in_relay_do_not_verify(cohort: Cohort, change: dict[str, object]) -> None:
    altered = dataclasses.replace(_advertise(cohort.credentials["silo-01"]), **change)  # type: ignore[arg-type]
    with pytest.raises(PeerKeyError, match="not signed by its certificate"):
        cohort.verifier.verify(altered, CONTEXT)


def test_keys_signed_for_another_round_do_not_verify(cohort: Cohort) -> None:
    old = _advertise(cohort.credentials["silo-01"], RoundContext("job-a", 3))
    with pytest.raises(PeerKeyError, match="for this round"):
        cohort.verifier.verify(dataclasses.replace(old, round=4), CONTEXT)


def test_a_silo_cannot_advertise_keys_in_another_silos_name(cohort: Cohort) -> None:
    mine = _advertise(cohort.credentials["silo-01"])
    claimed = dataclasses.replace(mine, silo_id="silo-02")
    with pytest.raises(
        PeerKeyError, match="keys advertised for silo-02 come with the certificate of silo silo-01"
    ):
        cohort.verifier.verify(claimed, CONTEXT)


def test_a_certificate_from_another_ca_is_refused(cohort: Cohort, tmp_path: Path) -> None:
    pki.init_pki(tmp_path, coordinator_hosts=["localhost"], silos=["silo-01"])
    impostor = SiloCredentials.from_files(pki.participant_files(tmp_path, "silo", "silo-01"))
    with pytest.raises(PeerKeyError, match="not from this CA"):
        cohort.verifier.verify(_advertise(impostor), CONTEXT)


def test_a_non_silo_certificate_is_refused(cohort: Cohort, pki_dir: Path) -> None:
    files = pki.participant_files(pki_dir, "admin")
    with pytest.raises(PkiError, match="the certificate of role admin, not a silo"):
        SiloCredentials.from_files(files)
    admin = SiloCredentials("admin", files.cert.read_bytes(), pki.load_private_key(files.key))  # type: ignore[arg-type]
    with pytest.raises(PeerKeyError, match="certificate of admin admin"):
        cohort.verifier.verify(_advertise(admin), CONTEXT)


def test_garbage_instead_of_a_certificate_is_refused(cohort: Cohort) -> None:
    advertisement = dataclasses.replace(
        _advertise(cohort.credentials["silo-01"]), certificate_pem=b"junk"
    )
    with pytest.raises(PeerKeyError, match="not PEM"):
        cohort.verifier.verify(advertisement, CONTEXT)
