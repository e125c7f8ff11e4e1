"""Payload-stream messages encoded and decoded fast, without torch (the client's connection needs them
before any model).

A data chunk is nearly all of a payload stream's bytes, and protobuf's own handling of one costs
several copies: upb's encoder takes ~3 ms for a 2 MiB chunk (30 times a plain copy), building the
message copies the chunk once more, and parsing copies it out of the received bytes. Here a data
chunk travels as a `DataChunk`: the sender's `serializer` frames it in one copy, and the receiver's
`parser` hands back a view of the received bytes. Every other message goes through protobuf, and
both ends stay byte-for-byte compatible with any protobuf implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from google.protobuf.message import Message


class DataChunk(NamedTuple):
    """A payload stream's `data` message (UpdateMessage or InstructionMessage) outside protobuf: the
    chunk as the sender holds it, or a view of the received bytes. It answers `WhichOneof` like the
    message it stands for, so a payload reader takes either."""

    data: bytes | memoryview

    def WhichOneof(self, oneof_group: str) -> str:
        return "data"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, start: int) -> tuple[int, int] | None:
    """The varint at `start` and the offset after it; None if it is truncated or over 10 bytes."""
    value = shift = 0
    for offset in range(start, min(start + 10, len(raw))):
        value |= (raw[offset] & 0x7F) << shift
        if raw[offset] < 0x80:
            return value, offset + 1
        shift += 7
    return None


def _data_tag(message_type: type[Message]) -> bytes:
    return _varint(message_type.DESCRIPTOR.fields_by_name["data"].number << 3 | 2)


def serializer(message_type: type[Message]) -> Callable[[Any], bytes]:
    """`message_type.SerializeToString` for an UpdateMessage or InstructionMessage, which also takes a
    DataChunk; a data chunk is encoded as its field's tag, its length and its bytes, in one copy."""
    tag = _data_tag(message_type)

    def serialize(message: Any) -> bytes:
        if message.WhichOneof("part") != "data":
            return message.SerializeToString()
        data = message.data
        return b"".join((tag, _varint(len(data)), data))

    return serialize


def parser(message_type: type[Message]) -> Callable[[bytes], Any]:
    """`message_type.FromString` for an UpdateMessage or InstructionMessage, except that a message
    that is exactly one `data` field comes back as a DataChunk viewing `raw` (no copy). Anything else,
    malformed input included, is protobuf's to parse (and to refuse with DecodeError)."""
    tag = _data_tag(message_type)

    def parse(raw: bytes) -> Any:
        if raw.startswith(tag):
            length = _read_varint(raw, len(tag))
            if length is not None and length[1] + length[0] == len(raw):
                return DataChunk(memoryview(raw)[length[1]:])
        return message_type.FromString(raw)

    return parse
