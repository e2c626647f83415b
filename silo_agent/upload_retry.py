"""When a silo sends its update again after an upload failed.

A trained update is the silo's finished work for the round; it is worth a second try when
the failure says nothing against the update itself:

- ``DATA_LOSS``: the bytes were damaged on the way;
- ``CANCELLED``: the coordinator ended the call. It does that to an upload that stalled (to
  free its slot for the silos queued behind it) and when the round closes during the upload.
  Sent again, the first kind is accepted if the round is still open, and the second is
  refused with the precise reason (``FAILED_PRECONDITION``, "round N closed ...").

Everything else (the coordinator refused the update, or is unreachable) goes to the caller,
and no try starts once the task's deadline has passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)

UPLOAD_ATTEMPTS = 3
RETRIED_CODES = frozenset({grpc.StatusCode.DATA_LOSS, grpc.StatusCode.CANCELLED})

T = TypeVar("T")


def upload_with_retries(
    send: Callable[[], T],
    *,
    task_id: str,
    deadline_unix: float,
    clock: Callable[[], float] = time.time,
) -> T:
    """Calls ``send`` until it returns, at most :data:`UPLOAD_ATTEMPTS` times.

    Raises:
        grpc.RpcError: the last failure, or the first one that is not worth a retry.
    """
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            return send()
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in RETRIED_CODES or attempt == UPLOAD_ATTEMPTS or clock() >= deadline_unix:
                raise
            log.warning(
                "upload of task %s failed (%s: %s); sending it again (attempt %d of %d)",
                task_id,
                code.name,
                exc.details(),
                attempt + 1,
                UPLOAD_ATTEMPTS,
            )
    raise AssertionError("unreachable: the last attempt returns or raises")
