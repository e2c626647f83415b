"""Canonical byte strings for what secure aggregation signs, seals and derives keys from.

Every field is length-prefixed, so two different tuples never encode to the same bytes
(``("ab", "c")`` and ``("a", "bc")`` differ), whatever the silo ids look like.
"""

from __future__ import annotations

import struct


def frame(*parts: bytes | str | int) -> bytes:
    """Encodes ``parts`` as a sequence of (4-byte big-endian length, bytes) records.

    Args:
        parts: byte strings as they are, strings as UTF-8, integers (>= 0) as 8 bytes
            big-endian.

    Raises:
        ValueError: a negative integer or a part of 4 GiB or more.
    """
    out = bytearray()
    for part in parts:
        if isinstance(part, str):
            data = part.encode()
        elif isinstance(part, int):
            if part < 0:
                raise ValueError(f"cannot frame the negative integer {part}")
            data = part.to_bytes(8, "big")
        else:
            data = bytes(part)
        if len(data) >= 1 << 32:
            raise ValueError("a framed part must be shorter than 4 GiB")
        out += struct.pack(">I", len(data))
        out += data
    return bytes(out)
