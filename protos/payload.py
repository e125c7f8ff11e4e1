"""Payload streams: an Instruction or ClientUpdate as header + raw data chunks + SHA-256.

The layout is specified in fedtune.proto ("Payload streams"). Both ends share this module: the
sender streams straight from tensor memory; the receiver writes chunks either straight into
preallocated tensors (the client) or into a sink (the server: the update's payload file, whose
tensors are then mapped back with `payload_tensors`), so neither side ever holds a second copy of
the payload.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, Protocol

import grpc
import numpy as np
import torch
from pydantic import ValidationError

from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.convert import DTYPE_NAMES, DTYPES, instruction_from_proto, instruction_to_proto
from fedtune.protos.limits import Limits
from fedtune.protos.wire import DataChunk
from fedtune.strategies.api import ClientUpdate, Instruction, TensorMap

PROTOCOL_VERSION = 1
AUTH_METADATA_KEY = "authorization"
ECHO_CHARS = 200  # most characters of one client-sent value that an error message repeats
ProgressCallback = Callable[[int, int], None]  # (bytes so far, total bytes)
NUMPY_DTYPES = {dtype: torch.empty(0, dtype=dtype).numpy().dtype for dtype in DTYPES.values()
                if dtype != torch.bfloat16}  # bfloat16 has no numpy type


class PayloadError(ValueError):
    """A payload stream that cannot be used; `code` is the gRPC status that says why."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """`value`'s repr for an error message, cut to `limit` characters plus its full length: a client's
    100 KB name repeated whole would push the status past gRPC's metadata limit, and the client would
    get an opaque INTERNAL instead of the documented code."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... (length {len(value) if isinstance(value, Sized) else len(text)})"


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("fedtune payload streams need a little-endian host (the wire format is little-endian)")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's wire bytes (C order, little-endian) as a view of its own memory, no copy."""
    _require_little_endian()
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def header_tensor(name: str, tensor: torch.Tensor) -> pb.Tensor:
    if tensor.dtype not in DTYPE_NAMES:
        raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor {name!r}: dtype {tensor.dtype} cannot travel")
    return pb.Tensor(name=name, dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape))


def payload_chunks(tensors: Iterable[torch.Tensor], chunk_bytes: int, hasher: Any,
                   progress: ProgressCallback | None = None) -> Iterator[bytes | memoryview]:
    """The tensors' bytes concatenated and cut into chunks of at most `chunk_bytes`; feeds `hasher`.
    A chunk that lies within one tensor is a view of its memory (no copy: the tensors must not change
    until the stream is sent); one that spans tensors is joined."""
    views = [tensor_bytes(tensor) for tensor in tensors]
    total = sum(view.nbytes for view in views)
    pending: list[memoryview] = []
    pending_bytes = sent = 0
    for view in views:
        start = 0
        while start < view.nbytes:
            piece = view[start : start + chunk_bytes - pending_bytes]
            pending.append(piece)
            pending_bytes += piece.nbytes
            start += piece.nbytes
            if pending_bytes == chunk_bytes:
                chunk = pending[0] if len(pending) == 1 else b"".join(pending)
                hasher.update(chunk)
                sent += len(chunk)
                yield chunk
                if progress:
                    progress(sent, total)
                pending, pending_bytes = [], 0
    if pending_bytes:
        chunk = pending[0] if len(pending) == 1 else b"".join(pending)
        hasher.update(chunk)
        yield chunk
        if progress:
            progress(total, total)


def update_messages(update: ClientUpdate, chunk_bytes: int,
                    progress: ProgressCallback | None = None) -> Iterator[pb.UpdateMessage | DataChunk]:
    """A ClientUpdate as the PushUpdate stream: header, data chunks, sha256 (send it with
    `wire.serializer`, which encodes a DataChunk)."""
    header = pb.ClientUpdate(
        client_id=update.client_id, round=update.round, num_examples=update.num_examples,
        tensors=[header_tensor(name, tensor) for name, tensor in update.tensors.items()],
        metrics=dict(update.metrics),
    )
    yield pb.UpdateMessage(header=header)
    hasher = hashlib.sha256()
    for chunk in payload_chunks(update.tensors.values(), chunk_bytes, hasher, progress):
        yield DataChunk(chunk)
    yield pb.UpdateMessage(sha256=hasher.digest())


def instruction_messages(instruction: Instruction, chunk_bytes: int) -> Iterator[pb.InstructionMessage | DataChunk]:
    """An Instruction as the payload part of a PullInstruction stream: header, data chunks, sha256 (send
    it with `wire.serializer`)."""
    header = instruction_to_proto(Instruction(round=instruction.round, settings=instruction.settings,
                                              reply=instruction.reply))
    header.tensors.extend(header_tensor(name, tensor) for name, tensor in instruction.tensors.items())
    yield pb.InstructionMessage(header=header)
    hasher = hashlib.sha256()
    for chunk in payload_chunks(instruction.tensors.values(), chunk_bytes, hasher):
        yield DataChunk(chunk)
    yield pb.InstructionMessage(sha256=hasher.digest())


def _check_name(name: str, field: str, limits: Limits) -> None:
    if not name:
        raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: empty name")
    if len(name.encode()) > limits.max_name_bytes:
        raise PayloadError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{field} {echo(name, 40)}: name is {len(name.encode())} bytes, over the limit "
                           f"max_name_bytes={limits.max_name_bytes}")


class PayloadSink(Protocol):
    """Where a reader puts the payload's bytes instead of tensors (e.g. a file)."""

    def write(self, chunk: bytes | memoryview) -> None: ...


class PayloadReader:
    """Reassembles one payload stream, checking order, sizes, limits and the digest.

    Feed it the stream's messages in order; `header` is available as soon as the first one is in,
    so the caller can refuse an update (wrong round, duplicate) before any data arrives. The bytes
    go into tensors preallocated from the header, or, given `sink` (called with the header and the
    payload's size once they passed the limits), into the sink it returns; `tensors()` is then the
    caller's to map back.
    """

    def __init__(self, what: str, limits: Limits, max_payload_bytes: int,
                 sink: Callable[[Any, int], PayloadSink] | None = None):
        self.what = what  # "ClientUpdate" or "Instruction", for error messages
        self.limits = limits
        self.max_payload_bytes = max_payload_bytes
        self._open_sink = sink
        self.sink: PayloadSink | None = None
        self.header: Any = None
        self.total = 0
        self.received = 0
        self.digest: bytes | None = None
        self._hasher = hashlib.sha256()
        self._tensors: dict[str, torch.Tensor] = {}
        self._slots: list[tuple[str, np.ndarray]] = []  # (tensor name, its writable uint8 view)

    def feed(self, message: Any) -> None:
        part = message.WhichOneof("part")
        if self.digest is not None:
            raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{self.what} stream: message after the sha256 trailer")
        if part == "header" and self.header is None:
            self._open(message.header)
        elif self.header is None:
            raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{self.what} stream: the first message must be `header`, got `{part}`")
        elif part == "data":
            self._add(message.data)
        elif part == "sha256":
            self._close(message.sha256)
        else:
            raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{self.what} stream: unexpected `{part}` after the header")

    @property
    def complete(self) -> bool:
        return self.digest is not None

    def check_complete(self) -> None:
        """DATA_LOSS if the stream ended before its sha256 trailer."""
        if not self.complete:
            raise PayloadError(
                grpc.StatusCode.DATA_LOSS,
                f"{self.what} stream truncated: it ended after {self.received} of {self.total} payload bytes "
                "without the sha256 trailer" if self.header is not None else f"{self.what} stream: empty",
            )

    def tensors(self) -> TensorMap:
        """The reassembled tensors (none when a sink took the bytes); DATA_LOSS if the stream ended
        before its sha256 trailer."""
        self.check_complete()
        return self._tensors

    def _open(self, header: Any) -> None:
        limits = self.limits
        tensors = list(header.tensors)
        if len(tensors) > limits.max_tensors:
            raise PayloadError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.what}.tensors: {len(tensors)} tensors, over the limit "
                               f"max_tensors={limits.max_tensors}")
        metrics = getattr(header, "metrics", {})
        if len(metrics) > limits.max_metrics:
            raise PayloadError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.what}.metrics: {len(metrics)} entries, over the limit "
                               f"max_metrics={limits.max_metrics}")
        for name in metrics:
            _check_name(name, f"{self.what}.metrics", limits)
        total = 0
        seen: set[str] = set()
        for tensor in tensors:
            name = tensor.name
            _check_name(name, f"{self.what}.tensors", limits)
            if name in seen:
                raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT, f"{self._where(name)}: name appears twice")
            if tensor.data:
                raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT, f"{self._where(name)}.data: must be empty in a "
                                   "stream header (bytes follow as chunks)")
            dtype = DTYPES.get(tensor.dtype)
            if dtype is None:
                raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT, f"{self._where(name)}.dtype: unknown dtype "
                                   f"{echo(tensor.dtype)}; known: {sorted(DTYPES)}")
            total += self._checked_size(name, tensor.shape, dtype.itemsize)
            if total > self.max_payload_bytes:
                raise PayloadError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{self._where(name)}: payload of at least {total} bytes is over the limit "
                                   f"max_update_bytes={self.max_payload_bytes}")
            seen.add(name)
        if self._open_sink is not None:
            self.sink = self._open_sink(header, total)
        else:
            for tensor in tensors:
                allocated = torch.empty(tuple(tensor.shape), dtype=DTYPES[tensor.dtype])
                self._tensors[tensor.name] = allocated
                self._slots.append((tensor.name, allocated.reshape(-1).view(torch.uint8).numpy()))
        self.header = header
        self.total = total
        self._slot = 0
        self._offset = 0

    def _where(self, name: str) -> str:
        """The header field an error is about; built only for an error (a header has dozens of tensors)."""
        return f"{self.what}.tensors[{echo(name)}]"

    def _checked_size(self, name: str, shape: Sequence[int], itemsize: int) -> int:
        """The tensor's byte size, bounded by the payload limit before anything is allocated.

        The product of the nonzero dimensions is bounded too, since torch multiplies them in int64
        even for an empty tensor ([2**62, 2**62, 0] would overflow inside the allocation and
        surface as INTERNAL); the product stops at the limit, so a huge shape costs no big-int work.
        """
        span = itemsize
        for dim in shape:
            if dim < 0:
                raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"{self._where(name)}.shape: negative dimension in {echo(list(shape))}")
            span *= dim or 1
            if span > self.max_payload_bytes:
                raise PayloadError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{self._where(name)}.shape: {echo(list(shape))} of {itemsize}-byte elements: at "
                                   f"least {span} bytes "
                                   f"is over the limit max_update_bytes={self.max_payload_bytes}")
        return 0 if 0 in shape else span

    def _add(self, chunk: bytes) -> None:
        if len(chunk) > self.limits.chunk_bytes:
            raise PayloadError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.what} stream data: chunk of {len(chunk)} bytes is over the limit "
                               f"chunk_bytes={self.limits.chunk_bytes}")
        if self.received + len(chunk) > self.total:
            raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{self.what} stream data: {self.received + len(chunk)} bytes, more than the "
                               f"{self.total} the header's tensors hold")
        self._hasher.update(chunk)
        self.received += len(chunk)
        if self.sink is not None:
            self.sink.write(chunk)
            return
        source = np.frombuffer(chunk, dtype=np.uint8)
        while source.size:
            _, target = self._slots[self._slot]
            room = target.size - self._offset
            if room == 0:
                self._slot, self._offset = self._slot + 1, 0
                continue
            take = min(room, source.size)
            target[self._offset : self._offset + take] = source[:take]
            self._offset += take
            source = source[take:]

    def _close(self, digest: bytes) -> None:
        if self.received != self.total:
            raise PayloadError(grpc.StatusCode.DATA_LOSS,
                               f"{self.what} stream truncated: {self.received} of {self.total} payload bytes "
                               "before the sha256 trailer")
        if digest != self._hasher.digest():
            raise PayloadError(grpc.StatusCode.DATA_LOSS,
                               f"{self.what} stream sha256: the payload's digest {self._hasher.hexdigest()} does "
                               f"not match the trailer's {digest.hex() or '(empty)'}")
        _check_bools(self.what, self._tensors)
        self.digest = digest


def _check_bools(what: str, tensors: TensorMap) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype == torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
            raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}.tensors[{name!r}]: bool bytes must be 0 or 1")


def payload_tensors(what: str, specs: Iterable[pb.Tensor], data: torch.Tensor) -> TensorMap:
    """The tensors a payload's bytes `data` (1-D uint8, e.g. a mapped payload file) hold back to back in
    header order: views of `data` where a tensor's offset suits its dtype, else copies. A size that
    does not add up is DATA_LOSS; bool bytes other than 0/1 are INVALID_ARGUMENT, as on the wire."""
    layout = [(spec.name, DTYPES[spec.dtype], shape := tuple(spec.shape), math.prod(shape)) for spec in specs]
    total = sum(dtype.itemsize * numel for _, dtype, _, numel in layout)
    if total != data.numel():
        raise PayloadError(grpc.StatusCode.DATA_LOSS,
                           f"{what}: {data.numel()} payload bytes, but the header's tensors take {total}")
    tensors: TensorMap = {}
    raw = data.numpy()  # numpy slices and views cost ~1 µs, torch's ~5: a light update has dozens of tensors
    offset = 0
    for name, dtype, shape, numel in layout:
        size = dtype.itemsize * numel
        piece = raw[offset : offset + size]
        if offset % dtype.itemsize:
            piece = piece.copy()  # torch views a dtype only at an offset that is a multiple of its size
        if dtype in NUMPY_DTYPES:
            tensors[name] = torch.from_numpy(piece.view(NUMPY_DTYPES[dtype]).reshape(shape))
        else:
            tensors[name] = torch.from_numpy(piece).view(dtype).reshape(shape)
        offset += size
    _check_bools(what, tensors)
    return tensors


def update_from_stream(reader: PayloadReader, tensors: TensorMap | None = None) -> ClientUpdate:
    """The ClientUpdate a completed reader holds, with `tensors` if its sink took the bytes;
    INVALID_ARGUMENT naming the field if it is not valid."""
    header = reader.header
    tensors = reader.tensors() if tensors is None else tensors
    try:
        return ClientUpdate(client_id=header.client_id, round=header.round, num_examples=header.num_examples,
                            tensors=tensors, metrics=dict(header.metrics))
    except ValidationError as error:
        fields = "; ".join(f"ClientUpdate.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise PayloadError(grpc.StatusCode.INVALID_ARGUMENT, fields) from error


def instruction_from_stream(reader: PayloadReader) -> Instruction:
    header = pb.Instruction()
    header.CopyFrom(reader.header)
    del header.tensors[:]
    plain = instruction_from_proto(header)
    return Instruction(round=plain.round, settings=plain.settings, tensors=reader.tensors())


def tensors_digest(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> str:
    """SHA-256 of tensors' wire bytes in order (what a payload stream's trailer holds), hex."""
    hasher = hashlib.sha256()
    for tensor in (tensors.values() if isinstance(tensors, Mapping) else tensors):
        hasher.update(tensor_bytes(tensor))
    return hasher.hexdigest()
