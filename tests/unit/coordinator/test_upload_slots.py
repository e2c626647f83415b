"""Upload slots: bounded concurrency, buffer reuse, giving up at a deadline."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.upload_slots import UploadSlots


def test_a_finished_uploads_buffer_is_lent_to_the_next() -> None:
    slots = UploadSlots(1)
    with slots.slot(1.0) as lend:
        assert lend is not None
        first = lend(1000)
        assert len(first) == 1000
    with slots.slot(1.0) as lend:
        assert lend is not None
        assert lend(1000) is first


def test_another_size_gets_a_new_buffer_and_drops_the_old() -> None:
    slots = UploadSlots(1)
    with slots.slot(1.0) as lend:
        assert lend is not None
        old = lend(1000)
    with slots.slot(1.0) as lend:
        assert lend is not None
        new = lend(2000)
        assert new is not old and len(new) == 2000


def test_dropped_spares_are_not_lent_again() -> None:
    slots = UploadSlots(1)
    with slots.slot(1.0) as lend:
        assert lend is not None
        old = lend(10)
    slots.drop_spares()
    with slots.slot(1.0) as lend:
        assert lend is not None
        assert lend(10) is not old


def test_no_slot_within_the_timeout_yields_none() -> None:
    slots = UploadSlots(1)
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with slots.slot(1.0):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    try:
        with slots.slot(0.2) as lend:
            assert lend is None
    finally:
        release.set()
        thread.join(10)
    with slots.slot(1.0) as lend:  # the slot came back when the holder let go
        assert lend is not None


def test_a_slot_freed_while_an_upload_waits_goes_to_it() -> None:
    """An upload waits for a slot (within its timeout) instead of giving up at once."""
    slots = UploadSlots(1)
    holding, release, waiting = threading.Event(), threading.Event(), threading.Event()
    got: list[bool] = []

    def hold() -> None:
        with slots.slot(1.0):
            holding.set()
            release.wait(10)

    def wait_for_slot() -> None:
        waiting.set()
        with slots.slot(30.0) as lend:
            got.append(lend is not None)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    assert waiting.wait(10)
    waiter.join(0.1)
    assert waiter.is_alive()  # it waits while the slot is held
    release.set()
    holder.join(10)
    waiter.join(10)
    assert got == [True]


def test_at_most_count_slots_are_held_at_once() -> None:
    slots = UploadSlots(2)
    active = 0
    most = 0
    lock = threading.Lock()

    def upload() -> None:
        nonlocal active, most
        with slots.slot(10.0) as lend:
            assert lend is not None
            with lock:
                active += 1
                most = max(most, active)
            time.sleep(0.02)
            with lock:
                active -= 1

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert 1 <= most <= 2


def test_at_least_one_slot() -> None:
    with pytest.raises(ValueError, match="at least one"):
        UploadSlots(0)


def test_an_upload_that_ends_after_the_drop_keeps_nothing() -> None:
    slots = UploadSlots(1)
    with slots.slot(1.0) as lend:
        assert lend is not None
        old = lend(10)
        slots.drop_spares()  # the round closed while this upload was finishing
    with slots.slot(1.0) as lend:
        assert lend is not None
        assert lend(10) is not old


def test_a_prepared_buffer_is_lent_to_the_first_upload() -> None:
    slots = UploadSlots(1)
    slots.prepare(64)
    slots.prepare(64)  # already there: no second buffer
    assert len(slots._spare) == 1
    prepared = slots._spare[0]
    with slots.slot(1.0) as lend:
        assert lend is not None
        assert lend(64) is prepared
