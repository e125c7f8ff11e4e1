"""Payload streams without a network: exact reassembly, and every malformed stream refused with its status."""

from __future__ import annotations

import grpc
import pytest
import torch

from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.limits import Limits
from fedtune.protos.payload import (
    PayloadError,
    PayloadReader,
    instruction_from_stream,
    instruction_messages,
    update_from_stream,
    update_messages,
)
from fedtune.strategies.api import ClientUpdate, Instruction

LIMITS = Limits(chunk_bytes=1024, max_message_bytes=1 << 20, max_update_bytes=1 << 20, max_tensors=8, max_metrics=4,
                max_name_bytes=32)


def sample_update() -> ClientUpdate:
    generator = torch.Generator().manual_seed(0)
    return ClientUpdate(client_id="c1", round=2, num_examples=5, metrics={"train_loss": 0.5}, tensors={
        "a": torch.randn(300, 3, generator=generator),  # 3600 bytes: spans chunks
        "b": torch.randn(7, generator=generator).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3, dtype=torch.int64),
    })


def read(messages, what="ClientUpdate", limits=LIMITS) -> PayloadReader:
    reader = PayloadReader(what, limits, limits.max_update_bytes)
    for message in messages:
        reader.feed(message)
    return reader


def expect(code: grpc.StatusCode, pattern: str, messages, limits=LIMITS) -> None:
    with pytest.raises(PayloadError, match=pattern) as caught:
        update_from_stream(read(messages, limits=limits))
    assert caught.value.code == code


def test_update_round_trips_bit_exactly_across_chunk_boundaries():
    update = sample_update()
    messages = list(update_messages(update, LIMITS.chunk_bytes))
    data = [m.data for m in messages if m.WhichOneof("part") == "data"]
    assert len(data) == 4 and all(len(chunk) <= LIMITS.chunk_bytes for chunk in data)
    back = update_from_stream(read(messages))
    assert (back.client_id, back.round, back.num_examples, back.metrics) == ("c1", 2, 5, {"train_loss": 0.5})
    for name, tensor in update.tensors.items():
        assert back.tensors[name].dtype == tensor.dtype and torch.equal(back.tensors[name], tensor), name


def test_instruction_round_trips_with_settings():
    instruction = Instruction(round=4, tensors={"w": torch.arange(600, dtype=torch.float32)},
                              settings={"k": 3, "flag": True, "s": "x"})
    back = instruction_from_stream(read(instruction_messages(instruction, 1024), "Instruction"))
    assert back.settings == instruction.settings and torch.equal(back.tensors["w"], instruction.tensors["w"])


def test_truncated_stream_is_data_loss():
    messages = list(update_messages(sample_update(), LIMITS.chunk_bytes))
    expect(grpc.StatusCode.DATA_LOSS, r"truncated: it ended after 1024 of 3625 payload bytes", messages[:2])
    expect(grpc.StatusCode.DATA_LOSS, r"truncated: 1024 of 3625 payload bytes before the sha256",
           [*messages[:2], messages[-1]])


def test_checksum_mismatch_is_data_loss():
    messages = list(update_messages(sample_update(), LIMITS.chunk_bytes))
    damaged = bytearray(messages[1].data)
    damaged[10] ^= 1
    messages[1] = pb.UpdateMessage(data=bytes(damaged))
    expect(grpc.StatusCode.DATA_LOSS, "sha256: the payload's digest .* does not match", messages)


def test_limits_are_named():
    update = sample_update()
    big = ClientUpdate(client_id="c", round=1, num_examples=1, tensors={"huge": torch.zeros(300_000)})
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, r"at least 1200000 bytes is over the limit max_update_bytes=1048576",
           update_messages(big, 1024))
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, r"chunk of 2048 bytes is over the limit chunk_bytes=1024",
           update_messages(update, 2048))
    many = ClientUpdate(client_id="c", round=1, num_examples=1, tensors={f"t{i}": torch.zeros(1) for i in range(9)})
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, r"9 tensors, over the limit max_tensors=8", update_messages(many, 1024))
    long_name = ClientUpdate(client_id="c", round=1, num_examples=1, tensors={"x" * 40: torch.zeros(1)})
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, r"over the limit max_name_bytes=32", update_messages(long_name, 1024))


def test_malformed_headers_name_the_field():
    def header(**fields) -> list[pb.UpdateMessage]:
        return [pb.UpdateMessage(header=pb.ClientUpdate(client_id="c", round=1, num_examples=1, **fields))]

    expect(grpc.StatusCode.INVALID_ARGUMENT, r"tensors\['x'\].dtype: unknown dtype 'float8'",
           header(tensors=[pb.Tensor(name="x", dtype="float8", shape=[1])]))
    expect(grpc.StatusCode.INVALID_ARGUMENT, r"tensors\['x'\].shape: negative dimension",
           header(tensors=[pb.Tensor(name="x", dtype="float32", shape=[-1])]))
    expect(grpc.StatusCode.INVALID_ARGUMENT, r"tensors\['x'\].data: must be empty in a stream header",
           header(tensors=[pb.Tensor(name="x", dtype="float32", shape=[1], data=b"\0\0\0\0")]))
    expect(grpc.StatusCode.INVALID_ARGUMENT, r"tensors\['x'\]: name appears twice",
           header(tensors=[pb.Tensor(name="x", dtype="float32", shape=[1])] * 2))
    expect(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be `header`, got `data`",
           [pb.UpdateMessage(data=b"abc")])
    overflow = [*header(tensors=[pb.Tensor(name="x", dtype="float32", shape=[1])]), pb.UpdateMessage(data=b"12345")]
    expect(grpc.StatusCode.INVALID_ARGUMENT, "5 bytes, more than the 4 the header's tensors hold", overflow)


def test_bool_bytes_must_be_zero_or_one():
    import hashlib

    messages = [pb.UpdateMessage(header=pb.ClientUpdate(client_id="c", round=1, num_examples=1,
                                                        tensors=[pb.Tensor(name="m", dtype="bool", shape=[2])])),
                pb.UpdateMessage(data=b"\x01\x07"), pb.UpdateMessage(sha256=hashlib.sha256(b"\x01\x07").digest())]
    expect(grpc.StatusCode.INVALID_ARGUMENT, r"tensors\['m'\]: bool bytes must be 0 or 1", messages)


def test_limits_require_room_for_a_chunk_in_a_message():
    with pytest.raises(ValueError, match="max_message_bytes .* must exceed limits.chunk_bytes"):
        Limits(chunk_bytes=1 << 20, max_message_bytes=1 << 20)
