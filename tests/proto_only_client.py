"""A fedtune client written from protos/fedtune.proto alone, as a device vendor would write one.

It imports grpc, numpy and the modules protoc generates from the .proto, and nothing else of fedtune
(no strategies, tasks or fedclient code, no torch): every reply is built from what the wire says,
the instruction's ReplyContract. It does no training, which the contract allows: it replies with
the values a client that took zero steps would hold (TRAINED: what it received; DELTA: zeros;
OTHER: what it received for a fixed shape, nothing for a list of any length). It registers with the
codecs ["none"], as a device that implements no codec does.

    python tests/proto_only_client.py --server HOST:PORT --token T --ca CA.pem --name NAME

It prints one JSON line at the end: the rounds it answered, the liveness timeout it was told, and the
modules it had imported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator

import grpc
import numpy as np

from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as pb_grpc

# Tensor.dtype names (fedtune.proto, message Tensor) and their little-endian numpy layouts; bfloat16 is
# carried as the upper 16 bits of a float32, so its raw bytes are read as uint16.
NUMPY_DTYPES = {
    "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float64": "<f8", "int64": "<i8", "int32": "<i4",
    "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "u1",
}
GRPC_DEFAULT_RECEIVE = 4 * 1024 * 1024  # all a client may assume before Register tells it the limits


def receive_payload(stream: Iterator[pb.InstructionMessage]) -> tuple[pb.Instruction, dict[str, np.ndarray]]:
    """The header, then data chunks, then the SHA-256 of their concatenation ("Payload streams")."""
    header = next(stream).header
    payload = bytearray()
    for message in stream:
        if message.WhichOneof("part") == "data":
            payload += message.data
        else:
            if hashlib.sha256(payload).digest() != message.sha256:
                raise ValueError("instruction payload: SHA-256 mismatch")
            break
    tensors, offset = {}, 0
    for tensor in header.tensors:
        dtype = np.dtype(NUMPY_DTYPES[tensor.dtype])
        count = int(np.prod(tensor.shape, dtype=np.int64))
        tensors[tensor.name] = np.frombuffer(payload, dtype, count, offset).reshape(tuple(tensor.shape))
        offset += count * dtype.itemsize
    return header, tensors


def reply_tensors(contract: pb.ReplyContract, received: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """What a client that took no step holds, shaped exactly as the contract says."""
    tensors = []
    for spec in contract.tensors:
        dtype = np.dtype(NUMPY_DTYPES[spec.dtype])
        shape = tuple(0 if size < 0 else size for size in spec.shape)
        same = received.get(spec.name)
        keeps_received = contract.values in (pb.ReplyContract.TRAINED, pb.ReplyContract.OTHER)
        if keeps_received and same is not None and same.shape == shape and same.dtype == dtype:
            value = same
        else:
            value = np.zeros(shape, dtype)
        tensors.append((spec.name, spec.dtype, value))
    return tensors


def update_stream(update: pb.ClientUpdate, tensors: list[tuple[str, str, np.ndarray]],
                  chunk_bytes: int) -> Iterator[pb.UpdateMessage]:
    update.tensors.extend(pb.Tensor(name=name, dtype=dtype, shape=value.shape) for name, dtype, value in tensors)
    yield pb.UpdateMessage(header=update)
    payload = b"".join(np.ascontiguousarray(value).tobytes() for _, _, value in tensors)
    for start in range(0, len(payload), chunk_bytes):
        yield pb.UpdateMessage(data=payload[start:start + chunk_bytes])
    yield pb.UpdateMessage(sha256=hashlib.sha256(payload).digest())


def run(server: str, token: str, ca: bytes, name: str) -> tuple[pb.RegisterReply, list[int]]:
    metadata = (("authorization", f"Bearer {token}"),)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(server, credentials, options=[("grpc.max_receive_message_length",
                                                             GRPC_DEFAULT_RECEIVE)]) as channel:
        registered = register(pb_grpc.FederationStub(channel), metadata, name)
    limits = registered.limits
    options = [("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.max_send_message_length", limits.max_message_bytes)]
    answered = []
    with grpc.secure_channel(server, credentials, options=options) as channel:
        stub = pb_grpc.FederationStub(channel)
        while True:
            stream = stub.PullInstruction(pb.PullRequest(wait_ms=registered.long_poll_ms), metadata=metadata)
            status = next(stream).status
            if status.kind == pb.PullStatus.DONE:
                return registered, answered
            if status.kind == pb.PullStatus.WAIT:
                time.sleep(status.retry_after_ms / 1000)
                continue
            header, received = receive_payload(stream)
            update = pb.ClientUpdate(client_id=registered.client_id, round=header.round, num_examples=1,
                                     metrics={"local_steps": 0.0})
            stub.PushUpdate(update_stream(update, reply_tensors(header.reply, received), limits.chunk_bytes),
                            metadata=metadata)
            answered.append(header.round)


def register(stub: pb_grpc.FederationStub, metadata: tuple[tuple[str, str], ...], name: str) -> pb.RegisterReply:
    """Register, waiting while the server starts (UNAVAILABLE), as the proto says to."""
    request = pb.RegisterRequest(protocol_version=1, name=name, profile=pb.DeviceProfile(codecs=["none"]))
    for _ in range(600):
        try:
            return stub.Register(request, metadata=metadata)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.1)
    raise TimeoutError(f"{name}: the server did not come up")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    with open(args.ca, "rb") as ca:
        registered, answered = run(args.server, args.token, ca.read(), args.name)
    print(json.dumps({"rounds": answered, "client_timeout_ms": registered.client_timeout_ms,
                      "modules": sorted(sys.modules)}))


if __name__ == "__main__":
    main()
