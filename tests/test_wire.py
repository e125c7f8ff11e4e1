"""Typed messages <-> protobuf: exact round trips and named decode errors."""

from __future__ import annotations

import pytest
import torch

from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.convert import (
    DTYPES,
    WireFormatError,
    instruction_from_proto,
    instruction_to_proto,
    tensor_from_proto,
    tensor_to_proto,
    update_from_proto,
    update_to_proto,
)
from fedtune.strategies.api import ClientUpdate, Instruction


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_every_dtype_round_trips_bit_exactly(dtype):
    source = (torch.randn(3, 5) * 50).to(dtype)
    back = tensor_from_proto(tensor_to_proto("t", source))
    assert back.dtype == dtype and back.shape == source.shape
    assert torch.equal(back, source)


def test_messages_round_trip_with_typed_settings():
    instruction = Instruction(round=3, tensors={"a": torch.ones(2)},
                              settings={"flag": True, "k": 7, "lr": 0.5, "s": "x"})
    back = instruction_from_proto(instruction_to_proto(instruction))
    assert back.settings == instruction.settings and type(back.settings["k"]) is int
    update = ClientUpdate(client_id="c", round=3, num_examples=9, tensors={"b": torch.zeros(1, 4)},
                          metrics={"train_loss": 1.5})
    again = update_from_proto(update_to_proto(update))
    assert again.client_id == "c" and again.num_examples == 9 and torch.equal(again.tensors["b"], update.tensors["b"])


def test_truncated_or_mislabelled_tensors_are_named():
    message = tensor_to_proto("layer.weight", torch.ones(4, 4))
    message.data = message.data[:-3]
    with pytest.raises(WireFormatError, match="layer.weight.*61 data bytes, expected 64"):
        tensor_from_proto(message)
    with pytest.raises(WireFormatError, match="unknown dtype 'float8'"):
        tensor_from_proto(pb.Tensor(name="x", dtype="float8", shape=[1], data=b"\x00"))
    duplicate = pb.ClientUpdate(client_id="c", round=1, num_examples=1,
                                tensors=[tensor_to_proto("x", torch.ones(1)), tensor_to_proto("x", torch.ones(1))])
    with pytest.raises(WireFormatError, match="'x' appears twice"):
        update_from_proto(duplicate)
