"""The `fedserver start --config server.toml` config: a fedsim run config plus [server] and [limits].

The run part is fedsim's (`strategies.runconfig.RunConfig`: same fields, validation and file
loading), so one experiment moves from simulation to real devices by adding a [server] section.
`partition` is ignored here: every device brings its own data.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from fedtune.protos.limits import Limits
from fedtune.protos.runspec import RunSpec
from fedtune.strategies.runconfig import RunConfig
from fedtune.tasks.config import StrictModel, resolve_path


class ServerSection(StrictModel):
    """Where the server listens and how rounds are scheduled."""

    host: str = Field("0.0.0.0", description="Interface to listen on: 0.0.0.0 every one, 127.0.0.1 this machine "
                                             "only. A plaintext (insecure) server must use a loopback address "
                                             "unless allow_insecure_remote.")
    port: int = Field(50051, ge=0, le=65535, description="0 = any free port (written to <run_dir>/endpoint.json).")
    run_dir: str = Field("runs/fedserver", description="SQLite state, metrics, checkpoints, TLS files.")
    insecure: bool = Field(False, description="Plaintext gRPC instead of TLS (local runs only).")
    allow_insecure_remote: bool = Field(False, description="Let a plaintext (insecure) server listen on an address "
                                                           "other machines reach: tokens and model updates then "
                                                           "cross the network unencrypted.")
    mtls: bool = Field(False, description="Mutual TLS: accept only clients that present a certificate signed by "
                                          "the run's CA (`fedserver init --mtls` issues one per token).")
    tls_ca: str | None = Field(None, description="CA certificate (PEM) client certificates must chain to under mtls; "
                                                 "default <run_dir>/tls/ca.pem.")
    tls_cert: str | None = Field(None, description="Server certificate (PEM); default <run_dir>/tls/server.pem.")
    tls_key: str | None = Field(None, description="Server private key (PEM); default <run_dir>/tls/server.key.")
    min_clients: int = Field(1, ge=1, description="Live clients needed before a round starts.")
    quorum: float = Field(1.0, gt=0, le=1, description="Share of the selected clients whose accepted updates "
                                                        "close a round once its deadline has passed.")
    round_deadline_s: float = Field(600.0, gt=0, description="Seconds a round waits for every selected client.")
    client_timeout_s: float = Field(30.0, gt=0, description="A client silent this long is not scheduled.")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often clients are asked to heartbeat.")
    long_poll_s: float = Field(10.0, gt=0, description="Longest a PullInstruction call is held open.")
    linger_s: float = Field(30.0, ge=0, description="After the run, keep answering DONE until every client has "
                                                     "heard it, at most this long.")
    health_port: int | None = Field(None, ge=0, le=65535, description="Also answer the gRPC health service "
                                    "(grpc.health.v1) on this port, in plaintext: Kubernetes' gRPC probes and Docker's "
                                    "HEALTHCHECK cannot use TLS. None = only on `port`; 0 = any free port (in "
                                    "<run_dir>/endpoint.json).")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Serve Prometheus metrics (HTTP, /metrics) on "
                                     "this port. None = off; 0 = any free port (in <run_dir>/endpoint.json).")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text, or one JSON object each "
                                                                   "(time, level, logger, message).")
    threads: int | None = Field(None, ge=1, le=1024, description="torch threads for aggregation and evaluation; "
                                                                  "default: OMP_NUM_THREADS when set, else the cores.")

    @model_validator(mode="after")
    def _timeouts(self) -> ServerSection:
        if self.client_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("server.client_timeout_s must exceed server.heartbeat_interval_s")
        if self.mtls and self.insecure:
            raise ValueError("server.mtls needs TLS: it cannot be combined with server.insecure (--insecure)")
        return self

    def exposes_plaintext(self) -> bool:
        """Plaintext on an address other machines can reach, without the explicit opt-in."""
        return self.insecure and not self.allow_insecure_remote and not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """Only this machine can connect to a server listening on `host` (no name lookup: `localhost` by name only)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerConfig(RunConfig):
    """A run config plus where the server listens and what it accepts."""

    # Command-line overrides are deployment settings; the run fields stay as the clients were told.
    OVERRIDES_SECTION: ClassVar[str | None] = "server"

    server: ServerSection = ServerSection()
    limits: Limits = Limits()

    def run_spec(self) -> RunSpec:
        return RunSpec.of(self)

    def run_dir(self) -> Path:
        return Path(self.server.run_dir)

    def differing_run_fields(self, other: ServerConfig) -> list[str]:
        """Fields the clients were sent where `other` differs: a resumed run must not change them."""
        mine, theirs = self.model_dump(mode="json"), other.model_dump(mode="json")
        return [name for name in self.spec_fields() if mine[name] != theirs[name]]

    def with_resolved_paths(self, base_dir: Path | None) -> Self:
        """The run dir and TLS files too are relative to the config file."""
        config = super().with_resolved_paths(base_dir)
        server = config.server
        paths = {"run_dir": server.run_dir, "tls_cert": server.tls_cert, "tls_key": server.tls_key,
                 "tls_ca": server.tls_ca}
        return config.model_copy(update={"server": server.model_copy(update={
            key: resolve_path(value, base_dir) for key, value in paths.items() if value})})
