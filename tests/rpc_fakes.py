"""A gRPC failure as client code sees it, and a client that only fails, for tests of how code
reacts to a status."""

from __future__ import annotations

from typing import Any

import grpc


class FakeRpcError(grpc.RpcError):
    """What a failed call raises: ``code()`` and ``details()``."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details or code.name)
        self._code, self._details = code, details or f"failed with {code.name}"

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class RefusingClient:
    """A client (``AdminClient``, ``SynthClient``) whose every call raises ``error``."""

    def __init__(self, error: grpc.RpcError) -> None:
        self._error = error

    def __enter__(self) -> RefusingClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def __getattr__(self, _name: str) -> Any:
        def call(*_args: object, **_kwargs: object) -> None:
            raise self._error

        return call
