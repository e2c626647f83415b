"""Waiting in tests: poll a condition until it holds, within a bound.

Every test that waits for something another thread or process does (a round to close, a
job to end, a file to appear) waits through :func:`wait_until`, so that each wait is bounded
and a wait that runs out fails with one message saying what was awaited. The bound is a
limit for a broken run, never a figure the test checks: tests do not assert how long
anything took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
    detail: Callable[[], object] | None = None,
) -> T:
    """Calls ``condition`` until it returns a truthy value, and returns that value.

    The condition is called at least once, and once more after the bound has passed, so a
    condition that became true while the test slept is not reported as a timeout.

    Args:
        condition: checked every ``interval_s``; an exception from it ends the wait.
        timeout_s: how long to wait at most.
        what: what is awaited, for the failure message ("round 1 to close").
        interval_s: the pause between two checks.
        detail: called once on a timeout; its value goes into the failure message (a log
            tail, the last status seen).

    Raises:
        AssertionError: ``condition`` was still falsy after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval_s, remaining))
    value = condition()
    if value:
        return value
    message = f"timed out after {timeout_s:g}s waiting for {what}"
    if detail is not None:
        message += f"\n{detail()}"
    raise AssertionError(message)
