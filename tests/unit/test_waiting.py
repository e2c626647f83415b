"""The tests' one waiting helper: it returns what the condition found, or fails in one line."""

from __future__ import annotations

import itertools

import pytest

from tests.waiting import wait_until


def test_returns_the_first_truthy_value() -> None:
    calls = itertools.count(1)
    assert wait_until(lambda: max(0, next(calls) - 2), timeout_s=10, what="a count") == 1


def test_a_condition_that_never_holds_fails_naming_what_was_awaited() -> None:
    with pytest.raises(AssertionError, match="waiting for the moon") as info:
        wait_until(lambda: None, timeout_s=0, what="the moon", detail=lambda: "last seen: x")
    assert str(info.value).endswith("last seen: x")


def test_the_condition_is_checked_again_once_the_bound_has_passed() -> None:
    calls = itertools.count(1)
    assert wait_until(lambda: next(calls) >= 2, timeout_s=0, what="a second look")
