"""Vectors in the ring ``Z_{2^bits}``: the arithmetic of masked inputs and their wire form.

A ring element is held in the smallest unsigned machine word that fits (``uint32`` up to 32
bits, ``uint64`` above). Numpy's unsigned arithmetic wraps modulo the word, and because the
modulus is a power of two, reducing with a bit mask afterwards gives the same result as
arithmetic modulo ``2^bits`` all along. On the wire a vector is the same bits in the signed
integer type of the same width (``int32``/``int64``), since that is what tensors carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gptfl.errors import ConfigError, ManifestMismatchError, SecureAggregationError

#: the smallest ring worth having (quantization needs some levels per silo)
MIN_BITS = 8
#: the largest ring: a sum below 2^53 converts to float64 exactly when it is dequantized
MAX_BITS = 53

#: a vector of ring elements (unsigned words)
RingVector = npt.NDArray[np.unsignedinteger]


@dataclass(frozen=True)
class Ring:
    """The ring ``Z_{2^bits}``.

    Attributes:
        bits: the ring's width; elements are ``0 .. 2^bits - 1``.

    Raises:
        ConfigError: ``bits`` is outside ``[MIN_BITS, MAX_BITS]``.
    """

    bits: int

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"secure aggregation bits must be an integer in [{MIN_BITS}, {MAX_BITS}], "
                f"got {self.bits!r}"
            )

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        """The unsigned word the elements are held in."""
        return np.dtype(np.uint32) if self.bits <= 32 else np.dtype(np.uint64)

    @property
    def wire_dtype(self) -> np.dtype[np.signedinteger]:
        """The signed integer type of the same width, in which vectors travel."""
        return np.dtype(np.int32) if self.bits <= 32 else np.dtype(np.int64)

    @property
    def word_bytes(self) -> int:
        return self.dtype.itemsize

    def zeros(self, length: int) -> RingVector:
        return np.zeros(length, dtype=self.dtype)

    def reduce(self, vector: RingVector) -> RingVector:
        """Reduces ``vector`` modulo ``2^bits`` in place (a no-op at the word's own width)."""
        if self.bits < 8 * self.word_bytes:
            np.bitwise_and(vector, self.dtype.type(self.modulus - 1), out=vector)
        return vector

    def add_into(self, total: RingVector, other: RingVector) -> None:
        """``total += other`` modulo ``2^bits``, in place."""
        np.add(total, other, out=total)
        self.reduce(total)

    def subtract_into(self, total: RingVector, other: RingVector) -> None:
        """``total -= other`` modulo ``2^bits``, in place."""
        np.subtract(total, other, out=total)
        self.reduce(total)

    def check(self, vector: npt.NDArray[np.generic], *, length: int, what: str) -> RingVector:
        """Checks that ``vector`` holds ``length`` elements of this ring.

        Args:
            vector: the candidate, in :attr:`dtype`.
            length: how many elements it must hold.
            what: how the message names it (e.g. ``"masked input of silo-a"``).

        Returns:
            The vector unchanged.

        Raises:
            ManifestMismatchError: the wrong dtype, shape or length.
            SecureAggregationError: an element is ``2^bits`` or more.
        """
        if vector.dtype != self.dtype:
            raise ManifestMismatchError(f"{what} has dtype {vector.dtype}, expected {self.dtype}")
        if vector.shape != (length,):
            raise ManifestMismatchError(
                f"{what} has shape {tuple(vector.shape)}, expected ({length},)"
            )
        if self.bits < 8 * self.word_bytes and length and int(vector.max()) >= self.modulus:
            raise SecureAggregationError(f"{what} holds values outside the ring of 2^{self.bits}")
        return vector  # type: ignore[return-value]

    def to_wire(self, vector: RingVector) -> npt.NDArray[np.signedinteger]:
        """The vector's bits as signed integers of the same width (no copy)."""
        return vector.view(self.wire_dtype)

    def from_wire(self, wire: npt.NDArray[np.generic], *, length: int, what: str) -> RingVector:
        """A vector that arrived as signed integers, checked (see :meth:`check`).

        Raises:
            ManifestMismatchError: the wrong dtype, shape or length.
            SecureAggregationError: an element is outside the ring.
        """
        if wire.dtype != self.wire_dtype:
            raise ManifestMismatchError(
                f"{what} has dtype {wire.dtype}, expected {self.wire_dtype}"
            )
        return self.check(wire.view(self.dtype), length=length, what=what)
