"""Typed messages (`fedtune.strategies.api`) <-> protobuf, and the byte sizes fedsim reports.

Decoding checks every tensor's byte length against its dtype and shape, so a truncated or
mislabelled tensor is an error that names it, never a silent reshape.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedtune.protos import fedtune_pb2 as pb
from fedtune.strategies.api import (
    ClientUpdate,
    DeviceProfile,
    Instruction,
    ReplyContract,
    ReplyValues,
    Setting,
    TensorMap,
    TensorSpec,
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class WireFormatError(ValueError):
    """A protobuf message that does not decode to valid tensors; names the tensor or field."""


def tensor_to_proto(name: str, tensor: torch.Tensor) -> pb.Tensor:
    if tensor.dtype not in DTYPE_NAMES:
        raise WireFormatError(f"tensor {name!r}: dtype {tensor.dtype} cannot travel")
    flat = tensor.detach().contiguous().cpu()
    raw = (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).numpy()
    return pb.Tensor(name=name, dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape),
                     data=raw.astype(raw.dtype.newbyteorder("<"), copy=False).tobytes())


def tensor_from_proto(message: pb.Tensor) -> torch.Tensor:
    if message.dtype not in DTYPES:
        raise WireFormatError(f"tensor {message.name!r}: unknown dtype {message.dtype!r}")
    if any(dim < 0 for dim in message.shape):
        raise WireFormatError(f"tensor {message.name!r}: negative dimension in shape {list(message.shape)}")
    dtype = DTYPES[message.dtype]
    item = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(message.shape) * item
    if len(message.data) != expected:
        raise WireFormatError(
            f"tensor {message.name!r}: {len(message.data)} data bytes, expected {expected} "
            f"for {message.dtype} {list(message.shape)}"
        )
    storage_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    numpy_dtype = torch.empty((), dtype=storage_dtype).numpy().dtype.newbyteorder("<")
    array = np.frombuffer(message.data, dtype=numpy_dtype).reshape(tuple(message.shape))
    tensor = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def tensors_from_proto(messages) -> TensorMap:
    tensors: TensorMap = {}
    for message in messages:
        if message.name in tensors:
            raise WireFormatError(f"tensor {message.name!r} appears twice")
        tensors[message.name] = tensor_from_proto(message)
    return tensors


def _scalar_to_proto(value: Setting) -> pb.Scalar:
    if isinstance(value, bool):
        return pb.Scalar(bool_value=value)
    if isinstance(value, int):
        return pb.Scalar(int_value=value)
    if isinstance(value, float):
        return pb.Scalar(float_value=value)
    return pb.Scalar(string_value=str(value))


def _scalar_from_proto(message: pb.Scalar) -> Setting:
    kind = message.WhichOneof("value")
    if kind is None:
        raise WireFormatError("setting with no value")
    return getattr(message, kind)


def reply_to_proto(contract: ReplyContract) -> pb.ReplyContract:
    return pb.ReplyContract(
        tensors=[pb.ReplyContract.TensorShape(name=name, dtype=DTYPE_NAMES[spec.dtype],
                                              shape=[-1 if size is None else size for size in spec.shape])
                 for name, spec in contract.tensors.items()],
        values=contract.values.name, doc=contract.doc, codec=contract.codec,
    )


def reply_from_proto(message: pb.ReplyContract) -> ReplyContract:
    if message.values == pb.ReplyContract.VALUES_UNSPECIFIED:
        raise WireFormatError("ReplyContract.values is unspecified")
    for shape in message.tensors:
        if shape.dtype not in DTYPES:
            raise WireFormatError(f"ReplyContract tensor {shape.name!r}: unsupported dtype {shape.dtype!r}")
    return ReplyContract(
        tensors={shape.name: TensorSpec(shape=tuple(None if size < 0 else size for size in shape.shape),
                                        dtype=DTYPES[shape.dtype]) for shape in message.tensors},
        values=ReplyValues[pb.ReplyContract.Values.Name(message.values)], doc=message.doc, codec=message.codec,
    )


def instruction_to_proto(instruction: Instruction) -> pb.Instruction:
    return pb.Instruction(
        round=instruction.round,
        tensors=[tensor_to_proto(name, t) for name, t in instruction.tensors.items()],
        settings={key: _scalar_to_proto(value) for key, value in instruction.settings.items()},
        reply=None if instruction.reply is None else reply_to_proto(instruction.reply),
    )


def instruction_from_proto(message: pb.Instruction) -> Instruction:
    return Instruction(
        round=message.round,
        tensors=tensors_from_proto(message.tensors),
        settings={key: _scalar_from_proto(value) for key, value in message.settings.items()},
        reply=reply_from_proto(message.reply) if message.HasField("reply") else None,
    )


def update_to_proto(update: ClientUpdate) -> pb.ClientUpdate:
    return pb.ClientUpdate(
        client_id=update.client_id,
        round=update.round,
        num_examples=update.num_examples,
        tensors=[tensor_to_proto(name, t) for name, t in update.tensors.items()],
        metrics=dict(update.metrics),
    )


def update_from_proto(message: pb.ClientUpdate) -> ClientUpdate:
    return ClientUpdate(
        client_id=message.client_id,
        round=message.round,
        num_examples=message.num_examples,
        tensors=tensors_from_proto(message.tensors),
        metrics=dict(message.metrics),
    )


def wire_size(message: Instruction | ClientUpdate) -> int:
    """Serialized protobuf bytes of a message: what crosses the link (before gRPC's 5-byte frame)."""
    encoded = instruction_to_proto(message) if isinstance(message, Instruction) else update_to_proto(message)
    return encoded.ByteSize()


def payload_size(tensors: TensorMap) -> int:
    """Tensor payload bytes alone (sum of numel x element size), without framing."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def profile_to_proto(profile: DeviceProfile) -> pb.DeviceProfile:
    return pb.DeviceProfile(memory_mb=profile.memory_mb, compute_class=profile.compute_class,
                            codecs=list(profile.codecs), threads=profile.threads, accelerator=profile.accelerator,
                            step_ms=profile.step_ms)


def profile_from_proto(message: pb.DeviceProfile) -> DeviceProfile:
    """The profile a client sent; ValueError naming the field for a value out of its documented range."""
    return DeviceProfile(memory_mb=max(message.memory_mb, 0), compute_class=message.compute_class or "cpu",
                         codecs=tuple(message.codecs) or ("none",), threads=message.threads,
                         accelerator=message.accelerator, step_ms=message.step_ms)
