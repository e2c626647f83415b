"""Shamir secret sharing of 32-byte secrets over the prime field of ``2^521 - 1``.

A secret is the constant term of a random polynomial of degree ``threshold - 1``; a share is
the polynomial's value at a holder's point ``x`` (a silo's 1-based position in the round).
Any ``threshold`` shares give the secret back by Lagrange interpolation at zero; fewer say
nothing about it. The field is the Mersenne prime ``2^521 - 1``, larger than any 32-byte
secret, so every secret is a field element as it is.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from gptfl.errors import BelowThresholdError, SecureAggregationError

#: the field's prime, the Mersenne prime M521
PRIME = (1 << 521) - 1
#: the length of the secrets shared (X25519 private keys, mask seeds)
SECRET_BYTES = 32
#: a share's value, big-endian
SHARE_VALUE_BYTES = (PRIME.bit_length() + 7) // 8
#: the most holders a secret can be split among (a point must fit in 4 bytes on the wire)
MAX_POINT = (1 << 32) - 1


@dataclass(frozen=True)
class Share:
    """One holder's share of a secret.

    Attributes:
        x: the holder's point, ``1 .. MAX_POINT``.
        y: the polynomial's value there, ``0 .. PRIME - 1``.
    """

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 1 <= self.x <= MAX_POINT:
            raise SecureAggregationError(
                f"a share's point must be in [1, {MAX_POINT}], got {self.x}"
            )
        if not 0 <= self.y < PRIME:
            raise SecureAggregationError("a share's value is outside the field")

    def value_bytes(self) -> bytes:
        return self.y.to_bytes(SHARE_VALUE_BYTES, "big")

    @classmethod
    def from_value_bytes(cls, x: int, data: bytes) -> Share:
        """The share at ``x`` whose value is ``data`` (big-endian).

        Raises:
            SecureAggregationError: the wrong length, or a value outside the field.
        """
        if len(data) != SHARE_VALUE_BYTES:
            raise SecureAggregationError(
                f"a share's value must be {SHARE_VALUE_BYTES} bytes, got {len(data)}"
            )
        return cls(x, int.from_bytes(data, "big"))


def split(secret: bytes, *, threshold: int, points: Sequence[int]) -> list[Share]:
    """Splits ``secret`` into one share per point, any ``threshold`` of which recover it.

    Args:
        secret: exactly :data:`SECRET_BYTES` bytes.
        threshold: how many shares recover the secret; 1 <= threshold <= len(points).
        points: the holders' distinct points.

    Returns:
        The shares, in the order of ``points``.

    Raises:
        ValueError: a secret of the wrong length, repeated points, or a threshold out of range.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(points)) != len(points):
        raise ValueError("share points must be distinct")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold must be in [1, {len(points)}], got {threshold}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in points]


def reconstruct(shares: Sequence[Share], *, threshold: int) -> bytes:
    """The secret that ``threshold`` (or more) shares of one split recover.

    With more than ``threshold`` shares, the extra ones must lie on the same polynomial.

    Raises:
        BelowThresholdError: fewer than ``threshold`` shares at distinct points.
        SecureAggregationError: two different values at one point, extra shares that do not
            agree, or a result that is not a 32-byte secret (the shares are not of one split).
    """
    by_point: dict[int, int] = {}
    for share in shares:
        if by_point.setdefault(share.x, share.y) != share.y:
            raise SecureAggregationError(f"two different shares at point {share.x}")
    if len(by_point) < threshold:
        raise BelowThresholdError(
            f"{len(by_point)} share(s) cannot recover a secret split with threshold {threshold}"
        )
    points = list(by_point.items())
    basis, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _interpolate(basis, x) != y:
            raise SecureAggregationError(f"the share at point {x} is not of the same secret")
    value = _interpolate(basis, 0)
    if value >= 1 << (8 * SECRET_BYTES):
        raise SecureAggregationError("the shares are not of one 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """The polynomial with these coefficients (constant first) at ``x``, by Horner's rule."""
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points`` (Lagrange)."""
    total = 0
    for j, (xj, yj) in enumerate(points):
        numerator, denominator = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                numerator = numerator * (at - xm) % PRIME
                denominator = denominator * (xj - xm) % PRIME
        total = (total + yj * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total
