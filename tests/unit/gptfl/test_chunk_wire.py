"""The copy-free chunk codec (gptfl.chunk_wire) agrees with the generated protobuf classes."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfl import serde
from gptfl.chunk_wire import decode_chunk_part, encode_chunk_part
from gptfl.proto.v1 import common_pb2, fleet_pb2
from gptfl.weights import Chunk

# (message class, field number of its `chunk`)
PARTS = [
    (common_pb2.WeightStreamPart, 2),
    (fleet_pb2.UploadPart, 3),
]

chunks = st.builds(
    Chunk,
    index=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=3000),
    crc32=st.integers(0, 2**32 - 1),
)


def _pb_bytes(message_class: type, chunk: Chunk) -> bytes:
    part = message_class()
    serde.fill_chunk(part.chunk, chunk)
    data: bytes = part.SerializeToString()
    return data


def _same(a: Chunk, b: Chunk) -> bool:
    return (a.index, a.offset, bytes(a.data), a.crc32) == (
        b.index,
        b.offset,
        bytes(b.data),
        b.crc32,
    )


@pytest.mark.parametrize(("message_class", "field"), PARTS)
@settings(max_examples=200, deadline=None)
@given(chunk=chunks)
def test_encoding_is_byte_identical_to_protobuf(
    message_class: type, field: int, chunk: Chunk
) -> None:
    assert encode_chunk_part(field, chunk) == _pb_bytes(message_class, chunk)


@pytest.mark.parametrize(("message_class", "field"), PARTS)
@settings(max_examples=200, deadline=None)
@given(chunk=chunks)
def test_decoding_reads_what_protobuf_wrote(message_class: type, field: int, chunk: Chunk) -> None:
    decoded = decode_chunk_part(_pb_bytes(message_class, chunk), field)
    assert decoded is not None
    assert _same(decoded, chunk)


def test_decoded_data_is_a_view_into_the_message() -> None:
    raw = encode_chunk_part(2, Chunk(3, 4096, b"x" * 5000, 77))
    decoded = decode_chunk_part(raw, 2)
    assert decoded is not None
    assert isinstance(decoded.data, memoryview)
    assert decoded.data.obj is raw


def test_other_parts_are_left_to_protobuf() -> None:
    manifest = common_pb2.WeightStreamPart(manifest=common_pb2.Manifest(total_bytes=5))
    header = fleet_pb2.UploadPart(header=fleet_pb2.UpdateHeader(task_id="t", round=1))
    assert decode_chunk_part(manifest.SerializeToString(), 2) is None
    assert decode_chunk_part(header.SerializeToString(), 3) is None
    # a chunk part of the other message kind (field 2 is the manifest in an UploadPart)
    assert decode_chunk_part(encode_chunk_part(2, Chunk(0, 0, b"ab", 1)), 3) is None
    # through serde, such parts still come out as the right protobuf messages
    part = serde.deserialize_weight_part(manifest.SerializeToString())
    assert isinstance(part, common_pb2.WeightStreamPart)
    assert part.manifest.total_bytes == 5


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda raw: raw + b"\x28\x01", id="a field after the part"),
        pytest.param(lambda raw: raw[:-1], id="truncated"),
        pytest.param(lambda raw: raw[:2] + b"\xff" * 12 + raw[2:], id="garbage varint"),
    ],
)
def test_non_canonical_messages_fall_back_to_protobuf(mangle: object) -> None:
    raw = encode_chunk_part(2, Chunk(1, 1 << 20, b"payload", 12345))
    assert callable(mangle)
    mangled = mangle(raw)
    assert decode_chunk_part(mangled, 2) is None


def test_a_repeated_inner_field_falls_back_to_protobuf_semantics() -> None:
    # protobuf keeps the last value of a repeated scalar; the fast path must not guess
    inner = b"\x08\x01" + b"\x1a\x02hi" + b"\x08\x07"
    raw = b"\x12" + bytes([len(inner)]) + inner
    assert decode_chunk_part(raw, 2) is None
    part = serde.deserialize_weight_part(raw)
    assert isinstance(part, common_pb2.WeightStreamPart)
    assert part.chunk.index == 7


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64))
def test_any_bytes_decode_as_protobuf_reads_them_or_not_at_all(raw: bytes) -> None:
    decoded = decode_chunk_part(raw, 2)
    if decoded is None:
        return
    reference = common_pb2.WeightStreamPart.FromString(raw)
    assert reference.WhichOneof("part") == "chunk"
    assert _same(decoded, serde.chunk_from_pb(reference.chunk))


def test_malformed_bytes_still_fail_in_protobuf() -> None:
    with pytest.raises(DecodeError):
        serde.deserialize_upload_part(b"\x1a\x05ab")
