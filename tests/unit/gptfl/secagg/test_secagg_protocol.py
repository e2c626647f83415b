"""Whole rounds between real silo sessions and a server session: the unmasked sum is exact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gptfl.errors import BelowThresholdError
from gptfl.secagg.graph import neighbour_graph
from gptfl.secagg.messages import ProtocolSettings
from gptfl.secagg.ring import Ring
from tests.unit.gptfl.secagg.protocol_driver import SILOS, Cohort, ring_sum, run_round, start_round


@st.composite
def rounds(draw: st.DrawFn) -> dict[str, object]:
    """A round's shape: silos, threshold, graph, ring, length, inputs and who drops when."""
    count = draw(st.integers(3, 7))
    silos = sorted(
        draw(st.lists(st.sampled_from(SILOS), min_size=count, max_size=count, unique=True))
    )
    threshold = draw(st.integers(2, count))
    neighbours = draw(st.none() | st.integers(threshold - 1, count - 1))
    bits = draw(st.sampled_from([8, 13, 31, 32, 40, 53]))
    length = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    # Each dropper drops after one of the stages; mostly no more than the threshold allows
    # (the sum must come out), sometimes more (the round must fail cleanly).
    order = draw(st.permutations(silos))
    spare = count - threshold
    drops = draw(st.integers(0, spare) | st.just(spare + 1))
    fates = dict.fromkeys(silos, "stays")
    for silo in order[:drops]:
        fates[silo] = draw(st.sampled_from(["advertise", "share", "share", "mask"]))
    return {
        "silos": silos,
        "settings": ProtocolSettings(threshold=threshold, neighbours=neighbours),
        "ring": Ring(bits),
        "length": length,
        "seed": seed,
        "fates": fates,
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=rounds())
def test_the_unmasked_sum_is_the_exact_sum_of_the_survivors_inputs(
    cohort: Cohort, shape: dict[str, object]
) -> None:
    silos: list[str] = shape["silos"]  # type: ignore[assignment]
    ring: Ring = shape["ring"]  # type: ignore[assignment]
    length: int = shape["length"]  # type: ignore[assignment]
    settings_: ProtocolSettings = shape["settings"]  # type: ignore[assignment]
    fates: dict[str, str] = shape["fates"]  # type: ignore[assignment]
    rng = np.random.default_rng(shape["seed"])  # type: ignore[arg-type]
    inputs = {
        silo: rng.integers(0, ring.modulus, size=length, dtype=np.uint64).astype(ring.dtype)
        for silo in silos
    }
    round_ = start_round(cohort, silos, settings=settings_, ring=ring, length=length)
    graph = neighbour_graph(silos, degree=settings_.neighbours, seed=round_.context.encode())
    survivors = expected_survivors(graph, settings_.threshold, fates)
    try:
        result = run_round(
            round_,
            inputs,
            drop_after_advertise=[s for s, f in fates.items() if f == "advertise"],
            drop_after_share=[s for s, f in fates.items() if f == "share"],
            drop_after_mask=[s for s, f in fates.items() if f == "mask"],
        )
    except BelowThresholdError:
        assert survivors is None, "the round failed though enough shares remained"
        assert round_.server.stage.value == "failed"
        event("below threshold")
        return
    assert survivors is not None, "the round finished though a secret had too few shares"
    assert round_.server.survivors == survivors
    event(f"{len(round_.server.dropped)} dropped after sharing")
    expected = ring_sum(ring, [inputs[s] for s in survivors], length)
    assert result.dtype == ring.dtype
    np.testing.assert_array_equal(result, expected)


def expected_survivors(
    graph: dict[str, frozenset[str]], threshold: int, fates: dict[str, str]
) -> tuple[str, ...] | None:
    """The survivors a round with these dropouts must end with, or None if it must fail:
    worked out from the rules, not from the sessions."""
    holders = {silo: graph[silo] | {silo} for silo in graph}
    sharing = {s for s, fate in fates.items() if fate != "advertise"}
    while short := {s for s in sharing if len(holders[s] & sharing) < threshold}:
        sharing -= short  # a silo whose secrets too few could hold is left out
    masked = {s for s in sharing if fates[s] != "share"}
    replying = {s for s in masked if fates[s] != "mask"}
    needed = list(sharing)  # dropped silos' mask keys and survivors' seeds
    if min(len(sharing), len(masked), len(replying)) < threshold:
        return None
    if any(len(holders[s] & replying) < threshold for s in needed):
        return None
    return tuple(sorted(masked))


def test_no_dropout_complete_graph(cohort: Cohort) -> None:
    silos = list(SILOS[:5])
    ring = Ring(32)
    rng = np.random.default_rng(1)
    inputs = {
        s: rng.integers(0, 2**32, size=1000, dtype=np.uint64).astype(np.uint32) for s in silos
    }
    round_ = start_round(cohort, silos, settings=ProtocolSettings(3), ring=ring, length=1000)
    result = run_round(round_, inputs)
    np.testing.assert_array_equal(result, ring_sum(ring, list(inputs.values()), 1000))
    # Every masked input differs from its input (a mask that does nothing would pass the sum).
    for silo in silos:
        assert np.mean(round_.masked[silo] == inputs[silo]) < 0.01


def test_one_silo_dropped_after_masking_still_gives_the_sum_of_the_others(cohort: Cohort) -> None:
    silos = list(SILOS[:5])
    ring = Ring(32)
    rng = np.random.default_rng(2)
    inputs = {s: rng.integers(0, 2**32, size=64, dtype=np.uint64).astype(np.uint32) for s in silos}
    round_ = start_round(cohort, silos, settings=ProtocolSettings(3), ring=ring, length=64)
    result = run_round(round_, inputs, drop_after_share=[silos[2]])
    assert round_.server.dropped == (silos[2],)
    others = [inputs[s] for s in silos if s != silos[2]]
    np.testing.assert_array_equal(result, ring_sum(ring, others, 64))


def test_below_threshold_the_round_fails_cleanly(cohort: Cohort) -> None:
    silos = list(SILOS[:5])
    ring = Ring(32)
    inputs = {s: ring.zeros(8) for s in silos}
    round_ = start_round(cohort, silos, settings=ProtocolSettings(3), ring=ring, length=8)
    with pytest.raises(BelowThresholdError, match="2 masked inputs arrived, threshold 3"):
        run_round(round_, inputs, drop_after_share=silos[:3])
    assert round_.server.stage.value == "failed"
    with pytest.raises(Exception, match="failed stage"):
        round_.server.finish()


def test_sparse_graph_round_with_ten_silos(cohort: Cohort) -> None:
    silos = list(SILOS)
    ring = Ring(24)
    rng = np.random.default_rng(3)
    inputs = {s: rng.integers(0, 2**24, size=32, dtype=np.uint64).astype(np.uint32) for s in silos}
    settings_ = ProtocolSettings(threshold=3, neighbours=4)
    round_ = start_round(cohort, silos, settings=settings_, ring=ring, length=32)
    result = run_round(round_, inputs, drop_after_share=[silos[0]], drop_after_mask=[silos[5]])
    survivors = [s for s in silos if s != silos[0]]
    np.testing.assert_array_equal(result, ring_sum(ring, [inputs[s] for s in survivors], 32))
    # Each silo sent shares to its four neighbours only, not to all nine others.
    assert all(len(round_.server._graph[s]) == 4 for s in silos)
