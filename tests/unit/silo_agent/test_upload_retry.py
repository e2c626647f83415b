"""The silo agent sends a finished update again only when the failure allows it."""

from __future__ import annotations

import grpc
import pytest

from silo_agent.upload_retry import UPLOAD_ATTEMPTS, upload_with_retries
from tests.rpc_fakes import FakeRpcError


class _Sender:
    """Fails with the given codes, in order, then returns the attempt number."""

    def __init__(self, *codes: grpc.StatusCode) -> None:
        self.codes = list(codes)
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.codes:
            raise FakeRpcError(self.codes.pop(0))
        return self.calls


def _send(sender: _Sender, *, now: float = 0.0, deadline: float = 100.0) -> int:
    return upload_with_retries(sender, task_id="t1", deadline_unix=deadline, clock=lambda: now)


@pytest.mark.parametrize("code", [grpc.StatusCode.DATA_LOSS, grpc.StatusCode.CANCELLED])
def test_a_damaged_or_ended_upload_is_sent_again(code: grpc.StatusCode) -> None:
    sender = _Sender(code)
    assert _send(sender) == 2


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.FAILED_PRECONDITION,  # the round closed: the update is too late
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAVAILABLE,  # the agent reconnects instead
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
)
def test_other_failures_reach_the_caller_at_once(code: grpc.StatusCode) -> None:
    sender = _Sender(code)
    with pytest.raises(grpc.RpcError) as failure:
        _send(sender)
    assert failure.value.code() == code
    assert sender.calls == 1


def test_no_retry_after_the_task_deadline() -> None:
    sender = _Sender(grpc.StatusCode.CANCELLED)
    with pytest.raises(grpc.RpcError):
        _send(sender, now=100.0, deadline=100.0)
    assert sender.calls == 1


def test_attempts_are_bounded() -> None:
    sender = _Sender(*[grpc.StatusCode.DATA_LOSS] * UPLOAD_ATTEMPTS)
    with pytest.raises(grpc.RpcError):
        _send(sender)
    assert sender.calls == UPLOAD_ATTEMPTS


def test_a_retry_that_hits_the_closed_round_reports_that_reason() -> None:
    sender = _Sender(grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION)
    with pytest.raises(grpc.RpcError) as failure:
        _send(sender)
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert sender.calls == 2
