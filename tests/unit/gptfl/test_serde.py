"""Every fleet message survives its trip through protobuf (gptfl.serde), whatever its values.

Values are drawn within what the wire can carry: uint32 rounds and batch sizes, uint64
counts and seeds, times in whole milliseconds, finite floats, any text protobuf accepts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl import serde
from gptfl.errors import DECLINE_KINDS, ValidationError
from gptfl.fleet_messages import (
    ACCOUNTANTS,
    Decline,
    EvaluationReport,
    FleetPhase,
    PrivacySpend,
    PullReply,
    RegisterAck,
    Registration,
    SecAggSubmission,
    UpdateHeader,
    UploadResult,
)
from gptfl.models.fingerprint import ModelFingerprint
from gptfl.models.spec import ModelSpec
from gptfl.proto.v1 import fleet_pb2
from gptfl.secagg import shamir
from gptfl.secagg.messages import (
    KeyAdvertisement,
    SecAggSettings,
    SecAggTask,
    ShareEnvelope,
    UnmaskReply,
    UnmaskRequest,
)
from gptfl.task import LocalSettings, TaskKind, TaskSpec

T = TypeVar("T")

UINT32 = st.integers(min_value=0, max_value=2**32 - 1)
UINT64 = st.integers(min_value=0, max_value=2**64 - 1)
TEXT = st.text(max_size=40)
ID = st.text(min_size=1, max_size=40)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
METRICS = st.dictionaries(TEXT, FINITE, max_size=5)
#: the CPUs are shared: a slow example is no failure
_ANY_PACE = settings(deadline=None)


def _seconds_in_ms(ms: st.SearchStrategy[int]) -> st.SearchStrategy[float]:
    """Durations and times the wire carries in whole milliseconds."""
    return ms.map(lambda value: value / 1000)


LOCAL_SETTINGS = st.builds(
    LocalSettings,
    epochs=st.integers(min_value=1, max_value=2**32 - 1),
    batch_size=st.integers(min_value=1, max_value=2**32 - 1),
    learning_rate=st.floats(min_value=0, exclude_min=True, allow_infinity=False),
    momentum=st.floats(min_value=0, max_value=1, exclude_max=True),
    weight_decay=st.floats(min_value=0, allow_infinity=False),
    proximal_mu=st.floats(min_value=0, allow_infinity=False),
    seed=UINT64,
)
MODEL_SPECS = st.builds(
    ModelSpec,
    arch=ID,
    num_classes=st.integers(min_value=2, max_value=2**32 - 1),
    in_channels=st.sampled_from([1, 3]),
    image_size=st.integers(min_value=8, max_value=2**32 - 1),
)


@st.composite
def _secagg_settings(draw: st.DrawFn) -> SecAggSettings:
    threshold = draw(st.integers(min_value=2, max_value=50))
    max_silos = draw(st.integers(min_value=threshold, max_value=1000))
    bits = draw(st.integers(min_value=8 + max_silos.bit_length(), max_value=53))
    neighbours = draw(st.none() | st.integers(min_value=threshold - 1, max_value=2**32 - 1))
    clip = draw(st.floats(min_value=0, exclude_min=True, allow_infinity=False))
    return SecAggSettings(threshold, bits, clip, max_silos, neighbours)


KEYS = st.builds(
    KeyAdvertisement,
    round=UINT32,
    silo_id=TEXT,
    cipher_public=st.binary(max_size=40),
    mask_public=st.binary(max_size=40),
    num_examples=UINT64,
    certificate_pem=st.binary(max_size=100),
    signature=st.binary(max_size=80),
)
ENVELOPES = st.builds(
    ShareEnvelope, round=UINT32, sender=TEXT, receiver=TEXT, sealed=st.binary(max_size=200)
)
SHARES = st.dictionaries(
    TEXT,
    st.builds(
        shamir.Share,
        x=st.integers(min_value=1, max_value=shamir.MAX_POINT),
        y=st.integers(min_value=0, max_value=shamir.PRIME - 1),
    ),
    max_size=4,
)
UNMASK_REPLIES = st.builds(
    UnmaskReply, round=UINT32, silo_id=TEXT, mask_key_shares=SHARES, self_mask_shares=SHARES
)
SECAGG_TASKS = st.builds(
    SecAggTask,
    settings=_secagg_settings(),
    advertisements=st.lists(KEYS, max_size=3).map(tuple),
    envelopes=st.lists(ENVELOPES, max_size=3).map(tuple),
    unmask=st.none()
    | st.builds(
        UnmaskRequest,
        round=UINT32,
        survivors=st.lists(TEXT, max_size=4).map(tuple),
        dropped=st.lists(TEXT, max_size=4).map(tuple),
    ),
)
TASKS = st.builds(
    TaskSpec,
    task_id=TEXT,
    job_id=TEXT,
    round=UINT32,
    kind=st.sampled_from(TaskKind),
    model_spec=MODEL_SPECS,
    model_digest=TEXT,
    local=LOCAL_SETTINGS,
    # int64 milliseconds; within +-2**53 ms a float of seconds still holds every millisecond
    deadline_unix=_seconds_in_ms(st.integers(min_value=-(2**50), max_value=2**50)),
    rounds=UINT32,
    secagg=st.none() | SECAGG_TASKS,
)


PRIVACY = st.builds(
    PrivacySpend,
    epsilon=st.floats(min_value=0, allow_infinity=False),
    delta=st.floats(min_value=0, max_value=1, exclude_max=True),
    accountant=st.sampled_from(ACCOUNTANTS),
)


def _headers(privacy: st.SearchStrategy[PrivacySpend | None]) -> st.SearchStrategy[UpdateHeader]:
    return st.builds(
        UpdateHeader,
        task_id=TEXT,
        round=UINT32,
        num_examples=UINT64,
        train_metrics=METRICS,
        train_seconds=FINITE,
        privacy=privacy,
    )


def _round_trip(to_pb: Callable[[T], Any], from_pb: Callable[[Any], T], value: T) -> None:
    pb = to_pb(value)
    again = from_pb(type(pb).FromString(pb.SerializeToString()))  # through the bytes too
    assert again == value


@_ANY_PACE
@given(LOCAL_SETTINGS)
def test_local_settings(value: LocalSettings) -> None:
    _round_trip(serde.local_settings_to_pb, serde.local_settings_from_pb, value)


@_ANY_PACE
@given(TASKS)
def test_task(value: TaskSpec) -> None:
    _round_trip(serde.task_to_pb, serde.task_from_pb, value)


FINGERPRINTS = st.lists(
    st.builds(
        ModelFingerprint,
        arch=st.text(min_size=1, max_size=40),
        provider=st.text(max_size=40),
        provider_version=st.text(max_size=40),
        layout_sha256=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    ),
    max_size=4,
).map(tuple)


@_ANY_PACE
@given(st.builds(Registration, agent_version=TEXT, device=TEXT, num_train_examples=UINT64,
                 num_eval_examples=UINT64, models=FINGERPRINTS))  # fmt: skip
def test_registration(value: Registration) -> None:
    _round_trip(serde.registration_to_pb, serde.registration_from_pb, value)


@_ANY_PACE
@given(st.builds(RegisterAck, silo_id=TEXT, heartbeat_interval_s=_seconds_in_ms(UINT32),
                 coordinator_version=TEXT))  # fmt: skip
def test_register_ack(value: RegisterAck) -> None:
    _round_trip(serde.register_ack_to_pb, serde.register_ack_from_pb, value)


@_ANY_PACE
@given(
    st.builds(
        PullReply,
        phase=st.sampled_from(FleetPhase),
        job_id=TEXT,
        task=st.none() | TASKS,
        retry_after_s=_seconds_in_ms(UINT32),
    )
)
def test_pull_reply(value: PullReply) -> None:
    _round_trip(serde.pull_reply_to_pb, serde.pull_reply_from_pb, value)


@_ANY_PACE
@given(_headers(st.none() | PRIVACY))
def test_update_header(value: UpdateHeader) -> None:
    _round_trip(serde.update_header_to_pb, serde.update_header_from_pb, value)


@_ANY_PACE
@given(_headers(PRIVACY))
def test_privacy_spend(value: UpdateHeader) -> None:
    """A silo's spend travels inside the update header (it has no message of its own)."""
    _round_trip(serde.update_header_to_pb, serde.update_header_from_pb, value)


@_ANY_PACE
@given(st.builds(UploadResult, accepted=st.booleans(), message=TEXT))
def test_upload_result(value: UploadResult) -> None:
    _round_trip(serde.upload_result_to_pb, serde.upload_result_from_pb, value)


@_ANY_PACE
@given(
    st.builds(EvaluationReport, task_id=TEXT, round=UINT32, num_examples=UINT64, metrics=METRICS)
)
def test_evaluation_report(value: EvaluationReport) -> None:
    _round_trip(serde.evaluation_report_to_pb, serde.evaluation_report_from_pb, value)


@_ANY_PACE
@given(st.builds(Decline, task_id=TEXT, reason=ID, kind=st.sampled_from(DECLINE_KINDS)))
def test_decline(value: Decline) -> None:
    _round_trip(serde.decline_to_pb, serde.decline_from_pb, value)


@_ANY_PACE
@given(
    st.builds(
        SecAggSubmission,
        task_id=TEXT,
        payload=KEYS | st.lists(ENVELOPES, max_size=3).map(tuple) | UNMASK_REPLIES,
    )
)
def test_secagg_submission(value: SecAggSubmission) -> None:
    _round_trip(serde.secagg_submission_to_pb, serde.secagg_submission_from_pb, value)


def test_secagg_wire_errors_are_named() -> None:
    with pytest.raises(ValidationError, match="submission for task t1 is empty"):
        serde.secagg_submission_from_pb(fleet_pb2.SecAggSubmission(task_id="t1"))
    bad = fleet_pb2.SecAggSettings(threshold=3, bits=16, clip_range=1.0, max_silos=1000)
    with pytest.raises(ValidationError, match="invalid secure aggregation settings: .*bits 16"):
        serde.secagg_settings_from_pb(bad)
    twice = fleet_pb2.SecAggUnmaskReply(
        silo_id="a",
        self_mask_shares=[fleet_pb2.SecAggShare(silo_id="b", x=1, y=bytes(66))] * 2,
    )
    with pytest.raises(ValidationError, match="the self-mask shares names b twice"):
        serde.unmask_reply_from_pb(twice)
    short = fleet_pb2.SecAggUnmaskReply(
        silo_id="a", mask_key_shares=[fleet_pb2.SecAggShare(silo_id="b", x=1, y=b"1")]
    )
    with pytest.raises(ValidationError, match="66 bytes"):
        serde.unmask_reply_from_pb(short)


def test_every_fleet_message_type_has_a_round_trip_test() -> None:
    """A domain type added to gptfl.fleet_messages needs its test here too."""
    from gptfl import fleet_messages

    types = {
        name
        for name, value in vars(fleet_messages).items()
        if dataclasses.is_dataclass(value) and value.__module__ == fleet_messages.__name__
    }
    tested = {name.removeprefix("test_").replace("_", "") for name in globals()}
    assert {name.lower() for name in types} <= tested


@_ANY_PACE
@given(kind=TEXT.filter(lambda kind: kind not in DECLINE_KINDS))
def test_a_decline_of_an_unknown_kind_counts_as_other(kind: str) -> None:
    pb = fleet_pb2.DeclineTaskRequest(task_id="t1", reason="why", kind=kind)
    assert serde.decline_from_pb(pb) == Decline(task_id="t1", reason="why", kind="other")


def test_a_decline_needs_a_reason() -> None:
    with pytest.raises(ValidationError, match="needs a reason"):
        serde.decline_from_pb(fleet_pb2.DeclineTaskRequest(task_id="t1", kind="refused"))


def test_train_config_has_the_fields_of_local_settings() -> None:
    """serde maps the two by name: a field added to one must be added to the other."""
    proto = [f.name for f in fleet_pb2.TrainConfig.DESCRIPTOR.fields]
    assert proto == [f.name for f in dataclasses.fields(LocalSettings)]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be >= 1, got 0"),
        ("batch_size", 0, "batch_size must be >= 1, got 0"),
        ("momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
    ],
)
def test_out_of_range_settings_from_the_wire_are_named(
    field: str, value: float, message: str
) -> None:
    pb = serde.local_settings_to_pb(LocalSettings(epochs=1, batch_size=1, learning_rate=0.1))
    setattr(pb, field, value)
    with pytest.raises(ValidationError) as info:
        serde.local_settings_from_pb(pb)
    assert str(info.value) == f"invalid training settings: {message}"
