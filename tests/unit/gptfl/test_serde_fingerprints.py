"""Model fingerprints on the wire: a round trip, and the bounds on what a silo may send."""

from __future__ import annotations

import pytest

from gptfl import serde
from gptfl.errors import ValidationError
from gptfl.models.fingerprint import ModelFingerprint, local_fingerprints
from gptfl.proto.v1 import fleet_pb2


def test_round_trip_through_a_serialized_request() -> None:
    found = list(local_fingerprints())
    request = fleet_pb2.RegisterRequest(models=serde.fingerprints_to_pb(found))
    parsed = fleet_pb2.RegisterRequest.FromString(request.SerializeToString())
    assert serde.fingerprints_from_pb(parsed.models) == found


@pytest.mark.parametrize(
    ("models", "needle"),
    [
        ([ModelFingerprint("a", "p", "1", "x")] * (serde.MAX_FINGERPRINTS + 1), "at most 1024"),
        ([ModelFingerprint("", "p", "1", "x")], "needs an arch"),
        ([ModelFingerprint("a", "p" * 257, "1", "x")], "at most 256 characters (arch 'a')"),
    ],
)
def test_too_many_or_malformed_fingerprints_are_refused(
    models: list[ModelFingerprint], needle: str
) -> None:
    with pytest.raises(ValidationError, match=r"^models: ") as error:
        serde.fingerprints_from_pb(serde.fingerprints_to_pb(models))
    assert needle in str(error.value)
