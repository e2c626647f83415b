"""The allocator tuning the coordinator and the silo agent apply at start."""

from __future__ import annotations

import ctypes.util

import pytest

from gptfl.memory import tune_allocator


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to tune")
def test_glibc_accepts_the_settings() -> None:
    assert tune_allocator() is True
