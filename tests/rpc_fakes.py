"""A gRPC failure as client code sees it, for tests of how that code reacts to a status."""

from __future__ import annotations

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
