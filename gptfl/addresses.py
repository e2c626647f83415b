"""Network addresses in service configs, checked when the config is loaded.

A wrong address otherwise shows up late and vaguely: a silo whose ``coordinator`` lacks a
port dials port 443 forever, and a bad ``metrics_address`` ends the process with a
traceback. These types turn both into the config's one-line error naming the key.
"""

from __future__ import annotations

from typing import Annotated

import pydantic

MAX_PORT = 65535


def _check(value: str, *, listen: bool) -> str:
    host, colon, port = value.rpartition(":")
    lowest = 0 if listen else 1
    if not colon or not port.isdigit() or not lowest <= int(port) <= MAX_PORT:
        if listen:
            want = "host:port (port 0 to 65535; 0: any free port; host empty: every interface)"
        else:
            want = "host:port (port 1 to 65535)"
        raise ValueError(f"expected {want}, got {value!r}")
    if not listen and not host:
        raise ValueError(f"expected host:port with a host, got {value!r}")
    return value


def _check_dial(value: str) -> str:
    return _check(value, listen=False)


def _check_listen(value: str) -> str:
    return _check(value, listen=True)


def _check_optional_listen(value: str) -> str:
    return value if value == "" else _check(value, listen=True)


#: where a client connects: ``host:port``, e.g. ``coordinator.example.org:50051``
DialAddress = Annotated[str, pydantic.AfterValidator(_check_dial)]
#: where a server listens: ``host:port``; port 0 picks a free port, an empty host means all
ListenAddress = Annotated[str, pydantic.AfterValidator(_check_listen)]
#: a listen address, or ``""`` for "this endpoint is off"
OptionalListenAddress = Annotated[str, pydantic.AfterValidator(_check_optional_listen)]
