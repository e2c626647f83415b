"""A copy-free codec for the one message that carries weight bytes: a stream part holding a Chunk.

Weight streams (``WeightStreamPart`` downloads, ``UploadPart`` uploads) are almost entirely
1 MiB chunk messages. Through the generated protobuf classes each chunk's bytes are copied
three times on the way out (into the message, out to the wire, ...) and twice on the way in,
with Python object churn around every copy; that made serialisation the largest cost of a
transfer (bench/transfer.py). This module writes and reads exactly those messages directly in
the protobuf wire format:

- :func:`encode_chunk_part` produces the bytes protobuf itself would produce for
  ``Part(chunk=Chunk(...))`` (same fields, same order, zero values omitted), with one copy of
  the data;
- :func:`decode_chunk_part` reads such a message and returns the chunk with its data as a
  view into the received bytes (no copy). It accepts only the canonical form and returns
  ``None`` for anything else, so the caller parses that with protobuf: every message still
  means exactly what protobuf says it means.

``tests/unit/gptfl/test_chunk_wire.py`` checks both directions against the generated classes.
"""

from __future__ import annotations

from gptfl.weights import Chunk

_VARINT = 0
_LEN = 2
# Chunk's field numbers in proto/gptfl/v1/common.proto
_INDEX, _OFFSET, _DATA, _CRC32 = 1, 2, 3, 4
_UINT64_MAX = (1 << 64) - 1
_UINT32_MAX = (1 << 32) - 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def encode_chunk_part(part_field: int, chunk: Chunk) -> bytes:
    """The wire bytes of a stream part whose field ``part_field`` holds ``chunk``."""
    head = bytearray()
    if chunk.index:
        head += _tag(_INDEX, _VARINT) + _varint(chunk.index)
    if chunk.offset:
        head += _tag(_OFFSET, _VARINT) + _varint(chunk.offset)
    size = len(chunk.data)
    if size:
        head += _tag(_DATA, _LEN) + _varint(size)
    tail = _tag(_CRC32, _VARINT) + _varint(chunk.crc32) if chunk.crc32 else b""
    inner_size = len(head) + size + len(tail)
    outer = _tag(part_field, _LEN) + _varint(inner_size)
    return b"".join((outer, head, chunk.data, tail))


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ``(-1, end)`` when malformed."""
    value = 0
    shift = 0
    while pos < end and shift < 70:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, end


def decode_chunk_part(raw: bytes, part_field: int) -> Chunk | None:
    """The chunk in a canonical chunk part, its data a view into ``raw``; else ``None``."""
    buf = memoryview(raw)
    end = len(buf)
    tag, pos = _read_varint(buf, 0, end)
    if tag != part_field << 3 | _LEN:
        return None
    size, pos = _read_varint(buf, pos, end)
    if size != end - pos:  # exactly one field, spanning the message
        return None
    values = {_INDEX: 0, _OFFSET: 0, _CRC32: 0}
    data: memoryview | bytes = b""
    seen: set[int] = set()
    while pos < end:
        tag, pos = _read_varint(buf, pos, end)
        field, wire_type = tag >> 3, tag & 7
        if tag < 0 or field in seen:
            return None
        seen.add(field)
        if field == _DATA and wire_type == _LEN:
            size, pos = _read_varint(buf, pos, end)
            if size < 0 or size > end - pos:
                return None
            data = buf[pos : pos + size]
            pos += size
        elif field in values and wire_type == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            limit = _UINT32_MAX if field == _CRC32 else _UINT64_MAX
            if not 0 <= value <= limit:
                return None
            values[field] = value
        else:
            return None
    return Chunk(values[_INDEX], values[_OFFSET], data, values[_CRC32])
