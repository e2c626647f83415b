"""Bad input at every stage, on both sides: refused with a precise error, nothing changed,
and the round goes on with the honest silos while the threshold holds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gptfl.errors import (
    BelowThresholdError,
    DuplicateUpdateError,
    ManifestMismatchError,
    PeerKeyError,
    SecureAggregationError,
)
from gptfl.secagg.messages import KeyAdvertisement, ProtocolSettings, RoundContext, UnmaskRequest
from gptfl.secagg.ring import Ring, RingVector
from tests.unit.gptfl.secagg.protocol_driver import SILOS, Cohort, Round, ring_sum, start_round

FIVE = list(SILOS[:5])
RING = Ring(32)
LENGTH = 16


def _inputs() -> dict[str, RingVector]:
    rng = np.random.default_rng(7)
    return {s: rng.integers(0, 2**32, size=LENGTH, dtype=np.uint64).astype(np.uint32) for s in FIVE}


def _round(cohort: Cohort, *, neighbours: int | None = None, round_number: int = 1) -> Round:
    return start_round(
        cohort,
        FIVE,
        settings=ProtocolSettings(threshold=3, neighbours=neighbours),
        ring=RING,
        length=LENGTH,
        context=RoundContext("job-a", round_number),
    )


def _advertised(round_: Round) -> tuple[KeyAdvertisement, ...]:
    for silo, session in round_.silos.items():
        round_.server.receive_advertisement(silo, session.advertise())
    return round_.server.close_advertising()


def _shared(round_: Round) -> None:
    advertisements = _advertised(round_)
    for silo, session in round_.silos.items():
        round_.server.receive_shares(silo, session.share_keys(advertisements))
    round_.server.close_sharing()


def _masked(
    round_: Round, inputs: dict[str, RingVector], *, skip: tuple[str, ...] = ()
) -> UnmaskRequest:
    _shared(round_)
    for silo, session in round_.silos.items():
        if silo not in skip:
            round_.server.receive_masked(
                silo, session.mask(round_.server.envelopes_for(silo), inputs[silo])
            )
    return round_.server.close_masking()


# ---------------------------------------------------------------- the silo refuses


def test_a_silo_refuses_to_reveal_both_kinds_of_share_of_one_peer(cohort: Cohort) -> None:
    round_ = _round(cohort)
    request = _masked(round_, _inputs())
    me, peer = FIVE[0], FIVE[1]
    session = round_.silos[me]
    both = UnmaskRequest(1, request.survivors, (peer,))
    with pytest.raises(SecureAggregationError, match=f"both kinds of share of {peer}"):
        session.unmask(both)
    # It answers the honest request, and the same request again (a lost reply) ...
    first = session.unmask(request)
    assert peer in first.self_mask_shares and not first.mask_key_shares
    assert session.unmask(request) == first
    # ... but having revealed peer's self-mask share, never peer's mask-key share too.
    turned = UnmaskRequest(1, tuple(s for s in request.survivors if s != peer), (peer,))
    with pytest.raises(
        SecureAggregationError, match=f"already revealed its share of {peer}'s self-mask seed"
    ):
        session.unmask(turned)


@pytest.mark.parametrize(
    ("survivors", "dropped", "message"),
    [
        (("silo-00", "silo-01", "silo-02", "silo-09"), (), "outside this round: silo-09"),
        (("silo-01", "silo-02", "silo-03"), ("silo-00",), "does not count silo-00 a survivor"),
        (("silo-00", "silo-01"), ("silo-02",), "2 survivors, threshold 3"),
    ],
)
def test_a_silo_refuses_a_bad_unmask_request(
    cohort: Cohort, survivors: tuple[str, ...], dropped: tuple[str, ...], message: str
) -> None:
    round_ = _round(cohort)
    _masked(round_, _inputs())
    with pytest.raises((SecureAggregationError, BelowThresholdError), match=message):
        round_.silos["silo-00"].unmask(UnmaskRequest(1, survivors, dropped))


def test_a_silo_refuses_an_unmask_request_of_another_round(cohort: Cohort) -> None:
    round_ = _round(cohort)
    request = _masked(round_, _inputs())
    with pytest.raises(SecureAggregationError, match="for round 0, this is round 1"):
        round_.silos["silo-00"].unmask(dataclasses.replace(request, round=0))


def test_a_silo_refuses_relayed_keys_that_are_not_what_was_signed(cohort: Cohort) -> None:
    round_ = _round(cohort)
    advertisements = list(_advertised(round_))
    session = round_.silos["silo-00"]
    # The coordinator swaps a peer's mask key for one of its own.
    forged = [*advertisements]
    forged[1] = dataclasses.replace(forged[1], mask_public=b"\x09" * 32)
    with pytest.raises(PeerKeyError, match="silo-01 are not signed"):
        session.share_keys(forged)
    # ... or this silo's own keys.
    forged = [
        dataclasses.replace(advertisements[0], cipher_public=b"\x09" * 32),
        *advertisements[1:],
    ]
    with pytest.raises(SecureAggregationError, match="not its own"):
        session.share_keys(forged)
    with pytest.raises(SecureAggregationError, match="relayed twice"):
        session.share_keys([*advertisements, advertisements[2]])
    with pytest.raises(SecureAggregationError, match="leave silo-00 out"):
        session.share_keys(advertisements[1:])
    with pytest.raises(BelowThresholdError, match="2 silos advertised keys, threshold 3"):
        session.share_keys(advertisements[:2])
    # None of that changed anything: the honest relay still works.
    assert len(session.share_keys(advertisements)) == 4


def test_keys_replayed_from_a_previous_round_are_refused(cohort: Cohort) -> None:
    old = _round(cohort, round_number=1)
    old_keys = _advertised(old)
    new = _round(cohort, round_number=2)
    new_keys = list(_advertised(new))
    replay = [old_keys[1] if a.silo_id == "silo-01" else a for a in new_keys]
    with pytest.raises(SecureAggregationError, match="is for round 1, this is round 2"):
        new.silos["silo-00"].share_keys(replay)
    # Relabelled with the new round number, the old signature gives it away.
    relabelled = [
        dataclasses.replace(old_keys[1], round=2) if a.silo_id == "silo-01" else a for a in new_keys
    ]
    with pytest.raises(PeerKeyError, match="for this round"):
        new.silos["silo-00"].share_keys(relabelled)


def test_a_silo_refuses_shares_not_meant_for_it_or_from_a_non_neighbour(cohort: Cohort) -> None:
    round_ = _round(cohort, neighbours=2)
    _shared(round_)
    server, me = round_.server, "silo-00"
    mine = list(server.envelopes_for(me))
    neighbours = {e.sender for e in mine}
    outsider = next(s for s in FIVE if s not in neighbours and s != me)
    someone_elses = next(e for e in server.envelopes_for(outsider) if e.sender != me)
    session = round_.silos[me]
    with pytest.raises(SecureAggregationError, match=f"for {outsider} were relayed to {me}"):
        session.mask([*mine, someone_elses], RING.zeros(LENGTH))
    from_outsider = server._shares[outsider][0]  # sealed by a silo that is not my neighbour
    with pytest.raises(SecureAggregationError, match=f"from {outsider}, which is not a neighbour"):
        session.mask([*mine, dataclasses.replace(from_outsider, receiver=me)], RING.zeros(LENGTH))
    with pytest.raises(SecureAggregationError, match="do not open"):
        session.mask(
            [dataclasses.replace(mine[0], sealed=mine[1].sealed), mine[1]], RING.zeros(LENGTH)
        )
    assert session.mask(mine, RING.zeros(LENGTH)).shape == (LENGTH,)


def test_a_silo_takes_its_steps_in_order(cohort: Cohort) -> None:
    round_ = _round(cohort)
    session = round_.silos["silo-00"]
    with pytest.raises(
        SecureAggregationError, match="cannot mask its input: its round is at step new"
    ):
        session.mask([], RING.zeros(LENGTH))
    session.advertise()
    with pytest.raises(
        SecureAggregationError, match="cannot advertise keys: its round is at step advertised"
    ):
        session.advertise()


# ---------------------------------------------------------------- the server refuses


def test_the_server_refuses_bad_keys(cohort: Cohort) -> None:
    round_ = _round(cohort)
    server, sessions = round_.server, round_.silos
    advertisement = sessions["silo-00"].advertise()
    with pytest.raises(SecureAggregationError, match="silo-01 sent keys in the name of silo-00"):
        server.receive_advertisement("silo-01", advertisement)
    with pytest.raises(PeerKeyError):
        server.receive_advertisement(
            "silo-00", dataclasses.replace(advertisement, mask_public=b"\x09" * 32)
        )
    with pytest.raises(SecureAggregationError, match="for round 2, this is round 1"):
        server.receive_advertisement("silo-00", dataclasses.replace(advertisement, round=2))
    server.receive_advertisement("silo-00", advertisement)
    server.receive_advertisement("silo-00", advertisement)  # a retried call is no error
    other = dataclasses.replace(sessions["silo-01"].advertise(), silo_id="silo-00")
    with pytest.raises(SecureAggregationError, match="already advertised other keys"):
        server.receive_advertisement("silo-00", other)
    stranger = start_round(
        cohort, ["silo-07"], settings=ProtocolSettings(2), ring=RING, length=LENGTH
    )
    with pytest.raises(SecureAggregationError, match="silo-07 is not in round 1"):
        server.receive_advertisement("silo-07", stranger.silos["silo-07"].advertise())


def test_the_server_refuses_bad_shares(cohort: Cohort) -> None:
    round_ = _round(cohort, neighbours=2)
    advertisements = _advertised(round_)
    server = round_.server
    envelopes = round_.silos["silo-00"].share_keys(advertisements)
    first = envelopes[0]
    non_neighbour = next(
        s for s in FIVE if s != "silo-00" and s not in {e.receiver for e in envelopes}
    )
    cases = [
        (
            [*envelopes[:1], dataclasses.replace(envelopes[1], receiver="silo-09")],
            "silo-09, which is not in this round",
        ),
        (
            [*envelopes[:1], dataclasses.replace(envelopes[1], receiver=non_neighbour)],
            "not its neighbour",
        ),
        ([first, first], "two envelopes for"),
        (envelopes[:1], "sent no shares for"),
        ([dataclasses.replace(first, round=0), *envelopes[1:]], "for round 0"),
        ([dataclasses.replace(first, sender="silo-01"), *envelopes[1:]], "in the name of silo-01"),
        ([dataclasses.replace(first, sealed=first.sealed[:-1]), *envelopes[1:]], "bytes, expected"),
    ]
    for bad, message in cases:
        with pytest.raises(SecureAggregationError, match=message):
            server.receive_shares("silo-00", bad)
    server.receive_shares("silo-00", envelopes)


def test_the_server_refuses_bad_masked_inputs_and_counts_good_ones_once(cohort: Cohort) -> None:
    round_ = _round(cohort)
    _shared(round_)
    server = round_.server
    with pytest.raises(ManifestMismatchError, match="shape \\(15,\\), expected \\(16,\\)"):
        server.receive_masked("silo-00", RING.zeros(LENGTH - 1))
    with pytest.raises(ManifestMismatchError, match="dtype uint64, expected uint32"):
        server.receive_masked("silo-00", np.zeros(LENGTH, dtype=np.uint64))
    with pytest.raises(
        SecureAggregationError, match="silo-09 sent a masked input but is not among"
    ):
        server.receive_masked("silo-09", RING.zeros(LENGTH))
    server.receive_masked("silo-00", RING.zeros(LENGTH))
    with pytest.raises(DuplicateUpdateError, match="already in the sum"):
        server.receive_masked("silo-00", RING.zeros(LENGTH))
    assert server.masked_count == 1


def test_the_server_refuses_bad_unmask_replies_and_finishes_with_the_honest(cohort: Cohort) -> None:
    inputs = _inputs()
    round_ = _round(cohort, neighbours=2)
    request = _masked(round_, inputs, skip=("silo-04",))
    server, sessions = round_.server, round_.silos
    assert request.dropped == ("silo-04",)
    honest = {s: sessions[s].unmask(request) for s in request.survivors}
    cheat = "silo-00"
    reply = honest[cheat]
    survivor = next(s for s in reply.self_mask_shares if s != cheat)
    a_share = reply.self_mask_shares[cheat]
    graph = server._graph  # which silos silo-00 never received shares from
    stranger = next(s for s in request.survivors if s != cheat and s not in graph[cheat])
    cases = [
        (
            dataclasses.replace(
                reply, mask_key_shares={**reply.mask_key_shares, survivor: a_share}
            ),
            "both kinds of share of",
        ),
        (
            dataclasses.replace(
                reply,
                mask_key_shares={survivor: a_share},
                self_mask_shares={k: v for k, v in reply.self_mask_shares.items() if k != survivor},
            ),
            f"share of {survivor}'s mask key, which this round must never hold",
        ),
        (
            dataclasses.replace(
                reply,
                mask_key_shares={},
                self_mask_shares={**reply.self_mask_shares, "silo-04": a_share},
            ),
            "silo-04's self-mask seed",
        ),
        (
            dataclasses.replace(
                reply, self_mask_shares={**reply.self_mask_shares, "silo-09": a_share}
            ),
            "silo-09, which is not in this round",
        ),
        (
            dataclasses.replace(
                reply, self_mask_shares={**reply.self_mask_shares, stranger: a_share}
            ),
            f"share for {stranger}, from which it received none",
        ),
        (
            dataclasses.replace(
                reply, self_mask_shares={cheat: dataclasses.replace(a_share, x=a_share.x + 1)}
            ),
            "not its own",
        ),
        (dataclasses.replace(reply, round=0), "for round 0"),
        (dataclasses.replace(reply, silo_id="silo-01"), "silo-00 sent an unmask reply for silo-01"),
    ]
    for bad, message in cases:
        with pytest.raises(SecureAggregationError, match=message):
            server.receive_unmask(cheat, bad)
    with pytest.raises(SecureAggregationError, match="silo-04 is not a survivor"):
        server.receive_unmask("silo-04", dataclasses.replace(reply, silo_id="silo-04"))
    # The cheat's reply was never taken. In this sparse graph each secret has three
    # holders, so without it some dropped or surviving secret is one share short: the round
    # fails cleanly, naming it (a dropped silo never holds its own share).
    for silo, good in honest.items():
        if silo != cheat:
            server.receive_unmask(silo, good)
    with pytest.raises(BelowThresholdError, match=r"cannot unmask silo-0\d: [12] share"):
        server.finish()
    assert server.stage.value == "failed"


def test_a_rejected_unmask_reply_leaves_the_round_to_the_honest_silos(cohort: Cohort) -> None:
    inputs = _inputs()
    round_ = _round(cohort)  # the complete graph: every survivor holds a share of everyone
    request = _masked(round_, inputs, skip=("silo-04",))
    server, sessions = round_.server, round_.silos
    replies = {s: sessions[s].unmask(request) for s in request.survivors}
    cheat = replies["silo-00"]
    with pytest.raises(SecureAggregationError, match="both kinds"):
        server.receive_unmask(
            "silo-00",
            dataclasses.replace(
                cheat, mask_key_shares={"silo-01": cheat.self_mask_shares["silo-01"]}
            ),
        )
    for silo in ("silo-01", "silo-02", "silo-03"):
        server.receive_unmask(silo, replies[silo])
    assert server.unmask_count == 3
    result = server.finish()
    np.testing.assert_array_equal(
        result, ring_sum(RING, [inputs[s] for s in request.survivors], LENGTH)
    )
