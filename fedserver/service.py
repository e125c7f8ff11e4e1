"""The gRPC face of the coordinator (grpc.aio): authentication, parsing, payload streams, and mapping.

Requests are parsed here rather than by gRPC, so a message that is not valid protobuf gets
INVALID_ARGUMENT naming the message type instead of gRPC's generic INTERNAL. The coordinator
decides everything else and answers in transport-neutral terms; this module only maps them: a
`Refused` reason to the status the .proto documents (`STATUS_CODES`), a `PollAnswer` to a
`PullStatus`, a `HeartbeatAnswer` to a `HeartbeatReply`. A broken payload stream is refused with
`PayloadError`, which carries its own status (the payload format is gRPC's alone). Anything
unexpected is logged and answered with INTERNAL, and the server keeps serving.

An enrolled client may still be hostile, so each one gets at most max_uploads_per_client open
upload streams, a stream silent for upload_idle_ms is cancelled and its payload file removed, and a
status message is capped (`limits.MAX_DETAILS_BYTES`) so that echoed client input cannot push it past
gRPC's metadata limit, which would turn the documented code into INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import math
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError, Message

from fedtune.fedserver.config import ServerConfig
from fedtune.fedserver.coordinator import Coordinator, HeartbeatAnswer, PollAnswer, PollKind
from fedtune.fedserver.security import TlsFiles, hash_token
from fedtune.fedserver.store import InlinePayload, PayloadFile, RunStore
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.convert import profile_from_proto
from fedtune.protos.limits import status_details
from fedtune.protos.payload import (
    AUTH_METADATA_KEY,
    PROTOCOL_VERSION,
    PayloadError,
    PayloadReader,
    echo,
    instruction_messages,
    payload_tensors,
    update_from_stream,
)
from fedtune.protos.wire import parser, serializer
from fedtune.strategies.api import Instruction, Refusal, Refused, ReplyContract
from fedtune.strategies.mapped import release

log = logging.getLogger(__name__)
SERVICE = "fedtune.v1.Federation"
PAYLOAD_THREADS = 4
OFFLOAD_BYTES = 256 << 10  # a data chunk at least this large is hashed and written off the event loop
INSTRUCTION_BYTES = serializer(pb.InstructionMessage)
CACHED_INSTRUCTION_BYTES = 1 << 20  # an instruction payload up to this size is encoded once, for every client
CACHED_INSTRUCTIONS = 16
# Arrived RPCs that gRPC core holds until grpc.aio takes them. Its defaults (1000, then random drops up to 3000,
# then all) are too small here: grpc.aio takes one call per event-loop turn (one call request outstanding for all
# generic handlers), so when thousands of clients call at once (e.g. all pulling as one group commit acknowledges
# their updates) core drops the excess as CANCELLED without details, before any handler runs or anything is logged.
MAX_PENDING_RPCS = 1 << 16
STATUS_CODES: dict[Refusal, grpc.StatusCode] = {
    Refusal.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Refusal.NOT_REGISTERED: grpc.StatusCode.NOT_FOUND,
    Refusal.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.NAME_TAKEN: grpc.StatusCode.ALREADY_EXISTS,
    Refusal.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.INVALID_UPDATE: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.UNSUPPORTED: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.RUN_OVER: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.NO_ROUND: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.WRONG_ROUND: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.NOT_SELECTED: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.STALE: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.BUFFER_FULL: grpc.StatusCode.ABORTED,
    Refusal.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    Refusal.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.DEVICE_TOO_SMALL: grpc.StatusCode.FAILED_PRECONDITION,
}
PULL_KINDS = {PollKind.INSTRUCTION: pb.PullStatus.INSTRUCTION, PollKind.WAIT: pb.PullStatus.WAIT,
              PollKind.DONE: pb.PullStatus.DONE}


class Malformed:
    """Stands in for a request that did not parse, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, message_type: type[Message], error: Exception):
        self.message_type = message_type
        self.error = error

    def refusal(self) -> Refused:
        return Refused(Refusal.MALFORMED, f"{self.message_type.__name__}: not a valid protobuf message ({self.error})")


def _lenient(message_type: type[Message], from_string: Callable[[bytes], Any] | None = None
             ) -> Callable[[bytes], Any]:
    from_string = from_string or message_type.FromString

    def parse(raw: bytes) -> Any:
        try:
            return from_string(raw)
        except DecodeError as error:
            return Malformed(message_type, error)
    return parse


def _update_message_sized() -> Callable[[bytes], tuple[Any, int]]:
    """PushUpdate's messages parsed leniently, a data chunk as a view of the received bytes
    (`wire.parser`), with each one's size on the wire: measured here, because upb's ByteSize()
    re-encodes the message (~0.7 ms for a 2 MiB chunk, on the event loop)."""
    parse = _lenient(pb.UpdateMessage, parser(pb.UpdateMessage))
    return lambda raw: (parse(raw), len(raw))


def stored_header(header: pb.ClientUpdate) -> bytes:
    """The update's header as the store keeps it: as received, less fields this server does not know
    (dropped from `header` itself)."""
    header.DiscardUnknownFields()  # type: ignore[attr-defined]  # (missing from types-protobuf's stubs)
    return header.SerializeToString()


def _parsed(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise request.refusal()
    return request


def pull_status(answer: PollAnswer) -> pb.PullStatus:
    return pb.PullStatus(kind=PULL_KINDS[answer.kind], rounds=answer.rounds, round=answer.round, reason=answer.reason,
                         deadline_unix_ms=int(answer.deadline * 1000),
                         retry_after_ms=int(answer.retry_after_s * 1000), sits_out=answer.sits_out)


def heartbeat_reply(answer: HeartbeatAnswer) -> pb.HeartbeatReply:
    return pb.HeartbeatReply(current_round=answer.round, done=answer.done)


def heartbeat_activity(request: pb.HeartbeatRequest) -> str:
    """What `fedserver status` shows for a client: its activity, with the round and progress it reported
    (e.g. "training round 3 40%"); only a bounded, printable part of what the client sent."""
    activity = "".join(char for char in request.activity[:64] if char.isprintable())
    if activity and request.round > 0:
        activity += f" round {request.round}"
    if activity and math.isfinite(request.progress) and 0 < request.progress <= 1:
        activity += f" {request.progress:.0%}"
    return activity


def refusal_status(error: Exception) -> grpc.StatusCode | None:
    """The status a refusal is answered with; None for an unexpected error."""
    if isinstance(error, Refused):
        return STATUS_CODES[error.reason]
    if isinstance(error, PayloadError):
        return error.code
    return None


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    code = refusal_status(error)
    if code is not None:
        details = status_details(str(error))
        log.info("refused %s: %s", code.name, details)
        await context.abort(code, details)
    log.exception("internal error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL,
                        status_details(f"internal error (see the server log): {type(error).__name__}: {error}"))


def _unary(handler):
    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            return await handler(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes a status; the server goes on
            await _abort(context, error)
    return wrapped


def _streaming(handler):
    @functools.wraps(handler)
    async def wrapped(self, request, context):
        try:
            async for message in handler(self, request, context):
                yield message
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001
            await _abort(context, error)
    return wrapped


@dataclass(frozen=True)
class _Encoded:
    """One instruction's encoded stream, and what it was encoded from."""

    reply: ReplyContract | None
    tensors: tuple[torch.Tensor, ...]  # held, so that no other tensor can take one's id while cached
    versions: tuple[int, ...]
    messages: tuple[bytes, ...]

    def encodes(self, instruction: Instruction) -> bool:
        """The same reply and the very same tensors, none written since (torch bumps a tensor's version
        on every in-place write). Round, settings and tensor names are the cache key."""
        tensors = instruction.tensors.values()
        return len(tensors) == len(self.tensors) and all(
            tensor is cached and tensor._version == version
            for tensor, cached, version in zip(tensors, self.tensors, self.versions, strict=True)
        ) and self.reply == instruction.reply


class InstructionCache:
    """Encoded instruction streams, shared by the clients whose instructions have the same content: the
    same round, settings, reply and tensor names, and the very same tensor objects, unchanged. A light
    round sends one global model to thousands of clients, and encoding and hashing it again for each
    was 15 % of the server's CPU. A per-client instruction (its own adapter shape, its own FedKSeed
    log) differs in its settings, reply or tensors and is not shared. A payload over
    CACHED_INSTRUCTION_BYTES is streamed from tensor memory each time, so no copy of a large model is
    kept. At most CACHED_INSTRUCTIONS entries, the oldest evicted first."""

    def __init__(self, chunk_bytes: int):
        self.chunk_bytes = chunk_bytes
        self._entries: dict[tuple[Any, ...], _Encoded] = {}

    def messages(self, instruction: Instruction) -> Iterable[bytes]:
        """The instruction's payload stream (header, data chunks, sha256), each message encoded."""
        tensors = tuple(instruction.tensors.values())
        if sum(tensor.nbytes for tensor in tensors) > CACHED_INSTRUCTION_BYTES:
            return map(INSTRUCTION_BYTES, instruction_messages(instruction, self.chunk_bytes))
        # repr: True, 1 and 1.0 (or 0.0 and -0.0) are equal in Python but travel as different settings
        key = (instruction.round, tuple((name, repr(value)) for name, value in instruction.settings.items()),
               tuple(instruction.tensors))
        entry = self._entries.get(key)
        if entry is None or not entry.encodes(instruction):
            self._entries.pop(key, None)
            if len(self._entries) >= CACHED_INSTRUCTIONS:
                del self._entries[next(iter(self._entries))]
            messages = tuple(map(INSTRUCTION_BYTES, instruction_messages(instruction, self.chunk_bytes)))
            entry = self._entries[key] = _Encoded(instruction.reply, tensors,
                                                  tuple(tensor._version for tensor in tensors), messages)
        return entry.messages


class FederationService:
    def __init__(self, coordinator: Coordinator, config: ServerConfig):
        self.coordinator = coordinator
        self.config = config
        self.limits = config.limits
        self._open_uploads: Counter[str] = Counter()  # client id -> its PushUpdate streams now open
        self._run_spec_json = config.run_spec().model_dump_json()  # resolved once: every Register sends it
        self._instructions = InstructionCache(self.limits.chunk_bytes)
        # Hashing and writing a large chunk releases the GIL: on these threads it overlaps the event
        # loop receiving the next chunk (and other clients' calls).
        self._payload_threads = ThreadPoolExecutor(max_workers=PAYLOAD_THREADS, thread_name_prefix="payload")

    def close(self) -> None:
        self._payload_threads.shutdown(wait=True)

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(function, request_type, reply_type):
            return grpc.unary_unary_rpc_method_handler(
                function, request_deserializer=_lenient(request_type), response_serializer=reply_type.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Register": unary(self.register, pb.RegisterRequest, pb.RegisterReply),
            "Heartbeat": unary(self.heartbeat, pb.HeartbeatRequest, pb.HeartbeatReply),
            "Leave": unary(self.leave, pb.LeaveRequest, pb.LeaveReply),
            "PullInstruction": grpc.unary_stream_rpc_method_handler(
                self.pull_instruction, request_deserializer=_lenient(pb.PullRequest)),  # it yields bytes
            "PushUpdate": grpc.stream_unary_rpc_method_handler(
                self.push_update, request_deserializer=_update_message_sized(),
                response_serializer=pb.PushReply.SerializeToString),
        })

    @staticmethod
    def _token_hash(context: grpc.aio.ServicerContext) -> str:
        value = dict(context.invocation_metadata() or ()).get(AUTH_METADATA_KEY, "")
        if not value.startswith("Bearer ") or not value[7:].strip():
            raise Refused(Refusal.UNAUTHENTICATED, f"missing metadata `{AUTH_METADATA_KEY}: Bearer <enrollment token>`")
        return hash_token(value[7:].strip())

    async def _client(self, context: grpc.aio.ServicerContext) -> str:
        return await self.coordinator.registered_client(self._token_hash(context))

    @_unary
    async def register(self, request, context) -> pb.RegisterReply:
        token_hash = self._token_hash(context)
        request = _parsed(request)
        if request.protocol_version != PROTOCOL_VERSION:
            raise Refused(Refusal.UNSUPPORTED,
                          f"RegisterRequest.protocol_version: {request.protocol_version} is not supported; this "
                          f"server speaks {PROTOCOL_VERSION}")
        try:
            profile = profile_from_proto(request.profile)
        except ValueError as error:
            raise Refused(Refusal.MALFORMED, f"RegisterRequest.profile: {error}") from error
        client_id = await self.coordinator.register(token_hash, request.name, profile)
        server = self.config.server
        return pb.RegisterReply(
            client_id=client_id, run_id=self.coordinator.run_id,
            run_spec_json=self._run_spec_json, limits=self.limits.to_proto(),
            heartbeat_interval_ms=int(server.heartbeat_interval_s * 1000), long_poll_ms=int(server.long_poll_s * 1000),
            current_round=self.coordinator.current_round, client_timeout_ms=int(server.client_timeout_s * 1000),
        )

    @_unary
    async def heartbeat(self, request, context) -> pb.HeartbeatReply:
        client_id = await self._client(context)
        request = _parsed(request)
        return heartbeat_reply(self.coordinator.heartbeat(client_id, heartbeat_activity(request)))

    @_unary
    async def leave(self, request, context) -> pb.LeaveReply:
        client_id = await self._client(context)
        await self.coordinator.leave(client_id, _parsed(request).reason[:200])
        return pb.LeaveReply()

    @_streaming
    async def pull_instruction(self, request, context) -> AsyncIterator[bytes]:
        """The poll's answer, then the instruction's payload stream; each message is yielded encoded
        (by `INSTRUCTION_BYTES`), so its wire size is counted without encoding it twice."""
        client_id = await self._client(context)
        request = _parsed(request)
        wait_s = max(request.wait_ms, 0) / 1000
        answer = await self.coordinator.pull(client_id, wait_s)
        yield INSTRUCTION_BYTES(pb.InstructionMessage(status=pull_status(answer)))
        if answer.instruction is None:
            return
        wire_bytes = 0
        for encoded in self._instructions.messages(answer.instruction):
            wire_bytes += len(encoded)
            yield encoded
        self.coordinator.instruction_sent(client_id, answer.instruction, wire_bytes)

    @_unary
    async def push_update(self, request_iterator, context) -> pb.PushReply:
        client_id = await self._client(context)
        store = self.coordinator.store
        with self._upload_slot(client_id):
            reader = PayloadReader("ClientUpdate", self.limits, self.limits.max_update_bytes,
                                   sink=lambda header, size: store.new_payload(header.round, client_id, size,
                                                                               stored_header(header)))
            try:
                return await self._receive_update(client_id, aiter(request_iterator), reader)
            finally:
                if isinstance(reader.sink, (PayloadFile, InlinePayload)) and not reader.sink.handed_over:
                    store.discard_payload(reader.sink)

    async def _receive_update(self, client_id: str, messages: AsyncIterator[Any],
                              reader: PayloadReader) -> pb.PushReply:
        """Receive the stream into the update's payload file (a large chunk is hashed and written on a
        payload thread while the next one arrives), sync the file, then have the coordinator decide."""
        started = time.perf_counter()
        wire_bytes = 0
        loop = asyncio.get_running_loop()
        feeding: asyncio.Future[None] | None = None  # the previous chunk, still being hashed and written
        try:
            while (received := await self._next_message(messages)) is not None:
                message, size = received
                message = _parsed(message)
                wire_bytes += size
                part = message.WhichOneof("part")
                if reader.header is None and part == "header":
                    self._check_header(client_id, message.header)  # before the reader opens the payload file
                if feeding is not None:
                    await feeding
                    feeding = None
                if part == "data" and size >= OFFLOAD_BYTES:
                    feeding = loop.run_in_executor(self._payload_threads, reader.feed, message)
                else:
                    reader.feed(message)
            if feeding is not None:
                await feeding
                feeding = None
        finally:
            if feeding is not None:  # the stream failed: let the chunk in flight finish before the file goes
                await asyncio.wait([feeding])
        if reader.header is None:
            raise Refused(Refusal.MALFORMED, "PushUpdate: empty stream (no header)")
        reader.check_complete()
        payload = reader.sink
        assert isinstance(payload, (PayloadFile, InlinePayload)) and reader.digest is not None
        if isinstance(payload, PayloadFile):
            await loop.run_in_executor(self._payload_threads, payload.sync, reader.digest)
        else:
            payload.sync(reader.digest)  # in memory: durable with its row
        data = payload.map()
        update = update_from_stream(reader, payload_tensors("ClientUpdate", reader.header.tensors, data))
        payload.handed_over = True  # from here on the coordinator keeps or removes it
        await self.coordinator.submit(client_id, update, wire_bytes, received_s=time.perf_counter() - started,
                                      payload=payload)
        release(data)  # checked and stored: its pages can go until aggregation reads them again
        return pb.PushReply(round=update.round, payload_bytes=reader.received)

    async def _next_message(self, messages: AsyncIterator[Any]) -> Any | None:
        """The stream's next message, or None at its end; DEADLINE_EXCEEDED when the client sends nothing
        for upload_idle_ms, so a stalled upload cannot hold its payload file (and its slot) forever. A
        timeout scope rather than asyncio.wait_for, which starts a task per message (~20 µs against ~6)."""
        idle_ms = self.limits.upload_idle_ms
        try:
            async with asyncio.timeout(idle_ms / 1000):
                return await anext(messages, None)
        except TimeoutError:
            raise PayloadError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"PushUpdate stream: no message for {idle_ms} ms, the limit upload_idle_ms={idle_ms}; "
                               "the upload is cancelled") from None

    @contextlib.contextmanager
    def _upload_slot(self, client_id: str) -> Iterator[None]:
        """Hold one of the client's max_uploads_per_client upload slots for a PushUpdate stream: each
        open stream may fill up to max_update_bytes of disk until it ends. Released however it ends."""
        limit = self.limits.max_uploads_per_client
        if self._open_uploads[client_id] >= limit:
            raise PayloadError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"PushUpdate: client {client_id!r} already has {self._open_uploads[client_id]} "
                               f"upload streams open, the limit max_uploads_per_client={limit}")
        self._open_uploads[client_id] += 1
        try:
            yield
        finally:
            self._open_uploads[client_id] -= 1
            if not self._open_uploads[client_id]:
                del self._open_uploads[client_id]

    def _check_header(self, client_id: str, header: pb.ClientUpdate) -> None:
        if header.client_id != client_id:
            raise Refused(Refusal.FORBIDDEN,
                          f"ClientUpdate.client_id: {echo(header.client_id)} is not this client's id {client_id!r}")
        if header.num_examples < 1:
            raise Refused(Refusal.MALFORMED, f"ClientUpdate.num_examples: {header.num_examples}, must be at least 1")
        if header.num_examples > self.limits.max_num_examples:
            raise Refused(Refusal.MALFORMED,
                          f"ClientUpdate.num_examples: {header.num_examples}, over the limit "
                          f"max_num_examples={self.limits.max_num_examples}")
        self.coordinator.check_upload(client_id, header.round)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    return config.limits.channel_options() + [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.server.max_pending_requests", MAX_PENDING_RPCS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_RPCS),
    ]


def _credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """The server's certificate; under server.mtls also the CA every client's certificate must chain to."""
    tls = TlsFiles(config.run_dir() / "tls")
    cert = Path(config.server.tls_cert) if config.server.tls_cert else tls.server_cert
    key = Path(config.server.tls_key) if config.server.tls_key else tls.server_key
    client_ca = Path(config.server.tls_ca) if config.server.tls_ca else tls.ca_cert
    needed = [(cert, "server.tls_cert"), (key, "server.tls_key")]
    if config.server.mtls:
        needed.append((client_ca, "server.tls_ca"))
    for path, what in needed:
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path} does not exist; run `fedserver init` or pass --insecure")
    pair = [(key.read_bytes(), cert.read_bytes())]
    if not config.server.mtls:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=client_ca.read_bytes(), require_client_auth=True)


async def serve(config: ServerConfig, store: RunStore, resume: bool, announce: Callable[[str], None]) -> str:
    """Build the run, listen, run every round, linger, stop. Returns why the run ended."""
    coordinator = Coordinator(config, store)
    await coordinator.prepare(resume)
    # What exists now (torch, transformers, the model: ~420,000 objects) lives as long as the server.
    # Frozen, the collector no longer walks it at every full collection: garbage collection took
    # 1.05 s of CPU in a round of 1,000 light clients, 0.35 s after this.
    gc.freeze()
    server = grpc.aio.server(options=server_options(config))
    service = FederationService(coordinator, config)
    server.add_generic_rpc_handlers((service.handler(),))
    address = f"{config.server.host}:{config.server.port}"
    if config.server.insecure:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, _credentials(config))
    if port == 0:
        raise OSError(f"server.port: cannot listen on {address}")
    from fedtune.fedserver.observability import Observability  # here: `fedserver --help` stays light

    observability = await Observability.start(config, coordinator, server)
    endpoint = config.run_dir() / "endpoint.json"
    endpoint.write_text(json.dumps({"host": config.server.host, "port": port, "pid": os.getpid(),
                                    "tls": not config.server.insecure, "run_id": coordinator.run_id,
                                    **observability.endpoint()}))
    await server.start()
    progress = (f"round {coordinator.next_round} of {config.rounds}" if coordinator.next_round <= config.rounds
                else f"all {config.rounds} rounds already done")  # a resumed finished run: clients hear DONE
    security = "plaintext, --insecure" if config.server.insecure else "TLS"
    announce(f"listening on {config.server.host}:{port} ({security}), run {coordinator.run_id[:8]}, {config.strategy}, "
             f"{progress}")
    run = asyncio.ensure_future(coordinator.run())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, run.cancel)
    try:
        return await run
    except asyncio.CancelledError:
        return "stopped by signal; continue with `fedserver start --resume`"
    finally:
        await observability.stop()
        await server.stop(grace=1.0)
        service.close()
