"""Payload-stream messages outside protobuf (`protos.wire`): byte-identical to protobuf on the way out,
the same message on the way in, a data chunk as a view of the received bytes."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.wire import DataChunk, parser, serializer

MESSAGE_TYPES = [pb.UpdateMessage, pb.InstructionMessage]


def same(parsed, message) -> bool:
    part = message.WhichOneof("part")
    if isinstance(parsed, DataChunk):
        return part == "data" and bytes(parsed.data) == message.data
    return parsed == message


def samples(message_type):
    return [message_type(data=bytes(range(256)) * 8192), message_type(data=b""), message_type(data=b"x" * 200),
            message_type(sha256=b"d" * 32), message_type(header={})]


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_data_chunks_encoded_directly_are_the_bytes_protobuf_would_send(message_type):
    encode = serializer(message_type)
    for message in samples(message_type):
        assert encode(message) == message.SerializeToString()
        if message.WhichOneof("part") == "data":
            assert encode(DataChunk(message.data)) == message.SerializeToString()
            assert encode(DataChunk(memoryview(message.data))) == message.SerializeToString()


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_a_data_chunk_is_parsed_as_a_view_of_the_received_bytes(message_type):
    parse = parser(message_type)
    for message in samples(message_type):
        raw = message.SerializeToString()
        parsed = parse(raw)
        assert same(parsed, message) and parsed.WhichOneof("part") == message.WhichOneof("part")
        assert isinstance(parsed, DataChunk) == (message.WhichOneof("part") == "data")
        if isinstance(parsed, DataChunk):
            assert parsed.data.obj is raw  # no copy


@pytest.mark.parametrize("message_type", MESSAGE_TYPES)
def test_other_encodings_parse_as_protobuf_parses_them(message_type):
    """Other valid encodings parse as protobuf would; broken ones fail as they fail in protobuf."""
    parse = parser(message_type)
    tag = message_type(data=b"").SerializeToString()[:1]
    padded_length = tag + b"\x83\x80\x00" + b"abc"  # the length 3 as a non-minimal varint: still valid protobuf
    twice = message_type(data=b"first").SerializeToString() + message_type(data=b"second").SerializeToString()
    then_trailer = message_type(data=b"abc").SerializeToString() + message_type(sha256=b"d" * 32).SerializeToString()
    for raw in (padded_length, twice, then_trailer):
        assert same(parse(raw), message_type.FromString(raw))
    assert bytes(parse(padded_length).data) == b"abc"
    assert parse(twice).data == b"second"  # the last value of a repeated scalar field wins
    assert parse(then_trailer).WhichOneof("part") == "sha256"  # a later oneof member replaces the earlier
    for broken in (tag + b"\x05abc", tag + b"\x80" * 11, tag):
        with pytest.raises(DecodeError):
            parse(broken)
