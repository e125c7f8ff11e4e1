"""The client's channel to the server: TLS or plaintext, the bearer token, and retries with backoff.

Kept free of torch so a client that is refused (bad token, wrong CA) fails in a second.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from fedtune.protos import fedtune_pb2_grpc as rpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# Statuses worth retrying: the server is restarting or unreachable, or the call broke on the way.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
TLS_FAILURE_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "Ssl handshake failed",
                       "WRONG_VERSION_NUMBER", "tls handshake", "SSL_ERROR")


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


def describe(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


class Connection:
    def __init__(self, settings: ConnectionSettings):
        if not settings.insecure and settings.ca is None:
            raise FatalError("TLS needs the run's CA certificate: pass --ca CA.pem (from the server's "
                             "`fedserver init`), or --insecure for a plaintext local server")
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
            try:
                root = settings.ca.read_bytes()
            except OSError as error:
                raise FatalError(f"--ca: cannot read {settings.ca}: {error}") from error
            self.channel = grpc.secure_channel(settings.server, grpc.ssl_channel_credentials(root), options=options)
        self.stub = rpc.FederationStub(self.channel)
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
