"""Payload streams without a network: exact reassembly, and every malformed stream refused with its status."""

from __future__ import annotations

import grpc
import pytest
import torch

from fedtune.fedserver import service
from fedtune.fedserver.service import InstructionCache
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
from fedtune.strategies.api import ClientUpdate, Instruction, ReplyContract, ReplyValues, TensorSpec

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


def decoded(messages) -> Instruction:
    reader = PayloadReader("Instruction", LIMITS, LIMITS.max_update_bytes)
    for encoded in messages:
        reader.feed(pb.InstructionMessage.FromString(encoded))
    return instruction_from_stream(reader)


def test_clients_with_the_same_instruction_share_one_encoding_until_the_model_changes():
    cache = InstructionCache(LIMITS.chunk_bytes)
    model = {"w": torch.arange(600, dtype=torch.float32), "b": torch.ones(3)}
    reply = ReplyContract(tensors={name: TensorSpec.like(t) for name, t in model.items()}, values=ReplyValues.TRAINED,
                          doc="trained")
    first = cache.messages(Instruction(round=1, tensors=model, reply=reply))
    again = cache.messages(Instruction(round=1, tensors=dict(model), reply=reply.model_copy()))
    assert again is first  # a second client with the same instruction: the same bytes, not encoded again
    assert torch.equal(decoded(first).tensors["w"], model["w"])
    model["w"].add_(1)  # the global model changed in place
    changed = cache.messages(Instruction(round=1, tensors=model, reply=reply))
    assert changed is not first and torch.equal(decoded(changed).tensors["w"], model["w"])
    model["w"] = model["w"] * 2  # ... or was replaced
    assert torch.equal(decoded(cache.messages(Instruction(round=1, tensors=model))).tensors["w"], model["w"])


@pytest.mark.parametrize("other", [
    lambda model: Instruction(round=2, tensors=model),  # the next round
    lambda model: Instruction(round=1, tensors=model, settings={"base_version": 3}),  # a per-client log (FedKSeed)
    lambda model: Instruction(round=1, tensors=model, settings={"base_version": True}),  # == 1, not on the wire
    lambda model: Instruction(round=1, tensors={"w": model["w"][:10].clone()}),  # its own adapter shape
    lambda model: Instruction(round=1, tensors=model, reply=ReplyContract(
        tensors={"w": TensorSpec.like(model["w"])}, values=ReplyValues.DELTA, doc="delta")),
])
def test_per_client_instructions_are_never_shared(other):
    cache = InstructionCache(LIMITS.chunk_bytes)
    model = {"w": torch.arange(600, dtype=torch.float32)}
    cache.messages(Instruction(round=1, tensors=model, settings={"base_version": 1}))
    instruction = other(model)
    back = decoded(cache.messages(instruction))
    assert (back.round, back.settings) == (instruction.round, instruction.settings)
    assert type(back.settings.get("base_version")) is type(instruction.settings.get("base_version"))
    assert torch.equal(back.tensors["w"], instruction.tensors["w"])


def test_a_large_instruction_is_streamed_from_tensor_memory_not_kept(monkeypatch):
    monkeypatch.setattr(service, "CACHED_INSTRUCTION_BYTES", 1000)
    cache = InstructionCache(LIMITS.chunk_bytes)
    model = {"w": torch.arange(600, dtype=torch.float32)}  # 2400 bytes
    streams = [cache.messages(Instruction(round=1, tensors=model)) for _ in range(2)]
    assert not isinstance(streams[0], tuple) and streams[0] is not streams[1]
    assert all(torch.equal(decoded(stream).tensors["w"], model["w"]) for stream in streams)
