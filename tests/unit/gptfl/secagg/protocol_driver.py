"""Runs whole secure-aggregation rounds between real silo sessions and a real server session.

No network: the driver plays the coordinator's relay, handing each stage's output from the
server session to the silo sessions and back, with silos dropping out where a test says.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gptfl import pki
from gptfl.secagg.authentication import PeerVerifier, SiloCredentials
from gptfl.secagg.messages import ProtocolSettings, RoundContext
from gptfl.secagg.ring import Ring, RingVector
from gptfl.secagg.server_session import ServerSession
from gptfl.secagg.silo_session import SiloSession

#: the silos of the test PKI, in id order
SILOS = tuple(f"silo-{i:02d}" for i in range(10))


@dataclass(frozen=True)
class Cohort:
    """Every test silo's credentials and the verifier they share."""

    credentials: Mapping[str, SiloCredentials]
    verifier: PeerVerifier

    @classmethod
    def from_pki(cls, pki_dir: Path) -> Cohort:
        credentials = {
            silo: SiloCredentials.from_files(pki.participant_files(pki_dir, "silo", silo))
            for silo in SILOS
        }
        verifier = PeerVerifier.from_ca_file(pki_dir / pki.CA_DIR / pki.CA_CERT_FILE)
        return cls(credentials, verifier)


@dataclass
class Round:
    """One round's sessions, both sides."""

    server: ServerSession
    silos: dict[str, SiloSession]
    context: RoundContext
    ring: Ring
    masked: dict[str, RingVector] = field(default_factory=dict)


def start_round(
    cohort: Cohort,
    silos: Sequence[str],
    *,
    settings: ProtocolSettings,
    ring: Ring,
    length: int,
    context: RoundContext | None = None,
    num_examples: Mapping[str, int] | None = None,
) -> Round:
    context = context or RoundContext("job-a", 1)
    sessions = {
        silo: SiloSession(
            credentials=cohort.credentials[silo],
            verifier=cohort.verifier,
            context=context,
            settings=settings,
            ring=ring,
            num_examples=(num_examples or {}).get(silo, 10),
        )
        for silo in silos
    }
    server = ServerSession(
        context=context,
        settings=settings,
        ring=ring,
        length=length,
        silos=silos,
        verifier=cohort.verifier,
    )
    return Round(server, sessions, context, ring)


def run_round(
    round_: Round,
    inputs: Mapping[str, RingVector],
    *,
    drop_after_advertise: Collection[str] = (),
    drop_after_share: Collection[str] = (),
    drop_after_mask: Collection[str] = (),
) -> RingVector:
    """Runs the four stages; a silo in ``drop_after_X`` does step X and nothing after.

    Returns:
        What the server unmasks.
    """
    server, sessions = round_.server, round_.silos
    for silo, session in sessions.items():
        server.receive_advertisement(silo, session.advertise())
    advertisements = server.close_advertising()
    active = [s for s in sessions if s not in drop_after_advertise]
    for silo in active:
        server.receive_shares(silo, sessions[silo].share_keys(advertisements))
    sharing = server.close_sharing()
    active = [s for s in sharing if s not in drop_after_share]
    for silo in active:
        masked = sessions[silo].mask(server.envelopes_for(silo), inputs[silo])
        round_.masked[silo] = masked
        server.receive_masked(silo, masked)
    request = server.close_masking()
    for silo in request.survivors:
        if silo not in drop_after_mask:
            server.receive_unmask(silo, sessions[silo].unmask(request))
    return server.finish()


def ring_sum(ring: Ring, vectors: Sequence[RingVector], length: int) -> RingVector:
    total = ring.zeros(length)
    for vector in vectors:
        ring.add_into(total, vector)
    return total
