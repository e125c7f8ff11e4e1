"""The client's channel to the server: TLS (with a client certificate for mutual TLS) or plaintext, the
bearer token, and retries with backoff.

Kept free of torch so a client that is refused (bad token, wrong CA) fails in a second.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos import fedtune_pb2_grpc as rpc
from fedtune.protos.wire import parser, serializer

log = logging.getLogger(__name__)
T = TypeVar("T")

# Statuses worth retrying: the server is restarting or unreachable, or the call broke on the way.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
TLS_FAILURE_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "Ssl handshake failed",
                       "WRONG_VERSION_NUMBER", "tls handshake", "SSL_ERROR")
PUSH_UPDATE = "/fedtune.v1.Federation/PushUpdate"
PULL_INSTRUCTION = "/fedtune.v1.Federation/PullInstruction"
HANGUP_MARKER = "Socket closed"  # all gRPC says when a server hangs up, e.g. on a client certificate it refuses


class FatalError(Exception):
    """The client cannot go on (refused, misconfigured, or the server stayed away too long)."""


@dataclass(frozen=True)
class ConnectionSettings:
    server: str
    token: str | None
    ca: Path | None
    insecure: bool
    max_message_bytes: int
    give_up_after_s: float  # the command line's default: fedclient.cli.GIVE_UP_AFTER_S
    max_backoff_s: float
    cert: Path | None = None  # this client's certificate (PEM), for a server that requires one (server.mtls)
    key: Path | None = None  # its private key (PEM)


def describe(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


def _read(option: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise FatalError(f"{option}: cannot read {path}: {error}") from error


class FederationStub(rpc.FederationStub):
    """The generated stub, with the payload streams' data chunks encoded by `wire.serializer` (one copy,
    rather than upb's encoder at ~3 ms per 2 MiB chunk) and decoded by `wire.parser` (no copy)."""

    def __init__(self, channel: grpc.Channel):
        super().__init__(channel)
        self.PullInstruction = channel.unary_stream(
            PULL_INSTRUCTION, request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=parser(pb.InstructionMessage))
        self.PushUpdate = channel.stream_unary(PUSH_UPDATE, request_serializer=serializer(pb.UpdateMessage),
                                               response_deserializer=pb.PushReply.FromString)


class Connection:
    def __init__(self, settings: ConnectionSettings):
        if not settings.insecure and settings.ca is None:
            raise FatalError("TLS needs the run's CA certificate: pass --ca CA.pem (from the server's "
                             "`fedserver init`), or --insecure for a plaintext local server")
        if (settings.cert is None) != (settings.key is None):
            raise FatalError("a client certificate needs its key: pass both --cert and --key")
        if settings.insecure and settings.cert is not None:
            raise FatalError("--cert and --key are for TLS; a plaintext (--insecure) server cannot check them")
        self.settings = settings
        self.metadata = (("authorization", f"Bearer {settings.token}"),) if settings.token else ()
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # gRPC's own reconnect backoff (default up to 120 s) would outlast ours; keep it below.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", int(settings.max_backoff_s * 1000)),
        ]
        if settings.insecure:
            self.channel = grpc.insecure_channel(settings.server, options=options)
        else:
            assert settings.ca is not None
            root = _read("--ca", settings.ca)
            key = _read("--key", settings.key) if settings.key else None
            chain = _read("--cert", settings.cert) if settings.cert else None
            self.channel = grpc.secure_channel(settings.server, grpc.ssl_channel_credentials(root, key, chain),
                                               options=options)
        self.stub = FederationStub(self.channel)
        self.outages = 0  # how many times calls had to wait for the server; the client re-registers after one

    def close(self) -> None:
        self.channel.close()

    def call(self, what: str, function: Callable[[], T]) -> T:
        """Run `function` (one RPC), retrying retryable failures with capped exponential backoff and
        full jitter; other statuses are raised for the caller to handle."""
        first_failure: float | None = None
        attempt = 0
        while True:
            try:
                return function()
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:
                    raise
                details = error.details() or ""
                if any(marker.lower() in details.lower() for marker in TLS_FAILURE_MARKERS):
                    raise FatalError(f"{what}: TLS handshake with {self.settings.server} failed (is --ca the run's "
                                     f"CA, and does the server speak TLS?): {details}") from error
                if HANGUP_MARKER.lower() in details.lower() and self._refused_after_handshake():
                    raise FatalError(f"{what}: {self._client_certificate_refusal()}: {details}") from error
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self.settings.give_up_after_s:
                    raise FatalError(f"{what}: server {self.settings.server} unreachable for "
                                     f"{now - first_failure:.0f} s, giving up (is it running, and is that its "
                                     f"address? --give-up-after sets the wait): {describe(error)}") from error
                delay = random.uniform(0, min(self.settings.max_backoff_s, 0.5 * 2 ** attempt))
                if attempt == 0 or attempt % 5 == 0:
                    log.warning("%s: %s; retrying (backoff up to %.1f s)", what, describe(error),
                                min(self.settings.max_backoff_s, 0.5 * 2 ** attempt))
                attempt += 1
                self.outages += 1
                time.sleep(delay)

    def _refused_after_handshake(self) -> bool:
        """Whether the server completes a TLS handshake with us and hangs up without sending a byte.

        That is how a gRPC server requiring client certificates (server.mtls) turns away a client without
        one, or with one from another CA: under TLS 1.3 it checks the certificate after the client's side
        of the handshake is done and sends no alert, so gRPC reports only "Socket closed", as it would for
        a server going down. A gRPC server that accepts the client sends its HTTP/2 settings at once.
        """
        if self.settings.insecure:
            return False
        host, _, port = self.settings.server.rpartition(":")
        host = host.strip("[]")
        try:
            context = ssl.create_default_context(cafile=self.settings.ca)
            context.set_alpn_protocols(["h2"])
            if self.settings.cert is not None:
                context.load_cert_chain(self.settings.cert, self.settings.key, password=b"")
            with socket.create_connection((host, int(port)), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=host) as tls:
                return tls.recv(1) == b""
        except (OSError, ValueError):  # ssl.SSLError is an OSError: whatever went wrong, it was not that
            return False

    def _client_certificate_refusal(self) -> str:
        server, cert = self.settings.server, self.settings.cert
        if cert is None:
            return (f"{server} requires a client certificate (mutual TLS): pass --cert and --key, the pair the "
                    "operator's `fedserver init --mtls` issued with your token")
        return (f"{server} refused the client certificate {cert}: it takes only certificates its run's CA signed "
                "(`fedserver init --mtls` on the server's run)")
