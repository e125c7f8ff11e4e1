"""What operators watch on a running fedserver: gRPC health checking, a Prometheus endpoint, JSON logs.

Only `serve()` starts this module, and nothing in fedserver imports it otherwise, so the round loop
carries no monitoring code. The counters are read from metrics.jsonl, the per-round rows the
server writes anyway, so a scrape agrees with that file by construction; the live gauges (current
round, connected and selected clients) are read from the coordinator on the event loop's thread at
each scrape.

Health: the standard grpc.health.v1 service, for "" and "fedtune.v1.Federation", reports SERVING
while the run is live and NOT_SERVING once it has ended (while the server lingers to tell the
clients) or is stopping. It answers on the federation port and, with `server.health_port`, on a
plaintext port of its own: Kubernetes' gRPC probes and Docker's HEALTHCHECK cannot present TLS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio names (mypy cannot see it)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import start_wsgi_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from fedtune.fedserver.config import ServerConfig
    from fedtune.fedserver.coordinator import Coordinator

FEDERATION_SERVICE = "fedtune.v1.Federation"
HEALTH_SERVICES = ("", FEDERATION_SERVICE)
RUN_END_POLL_S = 0.2  # how soon health turns NOT_SERVING after the run ends
LIVE_READ_TIMEOUT_S = 2.0  # a scrape gives up on the live gauges if the event loop does not answer
# metrics.jsonl keys counted per reason in fedtune_upload_rejections_total
REJECTION_KEYS = {"invalid_update": "rejected", "stale": "stale_refused"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers that should not parse free text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


@dataclass(frozen=True)
class LiveValues:
    """The coordinator's state at one scrape."""

    current_round: int
    connected: int
    selected: int


class RunCollector(Collector):
    """Prometheus metrics of one run: counters from metrics.jsonl, gauges from the live coordinator."""

    def __init__(self, metrics_file: Path, coordinator: Coordinator | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.metrics_file = metrics_file
        self.coordinator = coordinator
        self.loop = loop
        self._rows: list[dict[str, Any]] = []
        self._read_at: tuple[int, int] | None = None  # (mtime, size) of the file the rows came from

    def collect(self) -> Iterator[Metric]:
        rounds = [row for row in self._read_rows() if row["round"] >= 1]  # round 0: the model before training
        yield counter("rounds_completed", "Rounds completed (rows of metrics.jsonl after round 0).", len(rounds))
        yield counter("bytes_up", "Bytes of accepted client updates.", sum(row["bytes_up"] for row in rounds))
        yield counter("bytes_down", "Bytes of instructions sent to clients.", sum(row["bytes_down"] for row in rounds))
        yield counter("stragglers", "Selected clients that sent no reply before their round closed.",
                      sum(row.get("stragglers", 0) for row in rounds))
        rejections = CounterMetricFamily("fedtune_upload_rejections", "Uploads refused, by reason.",
                                         labels=["reason"])
        for reason, key in REJECTION_KEYS.items():
            rejections.add_metric([reason], sum(row.get(key, 0) for row in rounds))
        yield rejections
        if rounds:
            yield gauge("last_round_duration_seconds", "Wall time of the last completed round.",
                        rounds[-1]["seconds"])
        epsilon = next((row["epsilon"] for row in reversed(rounds) if row.get("epsilon") is not None), None)
        if epsilon is not None:
            yield gauge("epsilon_spent", "Privacy budget spent so far (differential privacy runs).", epsilon)
        live = self._live()
        if live is not None:
            yield gauge("current_round", "The round clients are told about; 0 = none.", live.current_round)
            yield gauge("clients_connected", "Clients live now (heard from within client_timeout_s).", live.connected)
            yield gauge("clients_selected", "Clients selected for the open round.", live.selected)

    def _read_rows(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; the last complete read while the server is rewriting the file."""
        try:
            stat = self.metrics_file.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._read_at:
                text = self.metrics_file.read_text()
                self._rows = [json.loads(line) for line in text.splitlines() if line.strip()]
                self._read_at = (stat.st_mtime_ns, stat.st_size)
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        return self._rows

    def _live(self) -> LiveValues | None:
        """Read on the event loop's thread, where the coordinator's state changes; None once it has stopped."""
        if self.coordinator is None or self.loop is None:
            return None
        try:
            return asyncio.run_coroutine_threadsafe(live_values(self.coordinator), self.loop).result(
                LIVE_READ_TIMEOUT_S)
        except (RuntimeError, TimeoutError):  # the loop is closed, or busy beyond the timeout
            return None


async def live_values(coordinator: Coordinator) -> LiveValues:
    open_round = coordinator.open_round
    return LiveValues(coordinator.current_round, len(coordinator.live_clients()),
                      len(open_round.state.selected) if open_round else 0)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"fedtune_{name}", documentation, value=value)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"fedtune_{name}", documentation, value=value)


class Observability:
    """Health service and metrics endpoint of one served run: started before the server listens,
    stopped after the run (health turns NOT_SERVING first)."""

    def __init__(self, config: ServerConfig, coordinator: Coordinator):
        self.config = config
        self.coordinator = coordinator
        self.health = health_aio.HealthServicer()
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self.metrics_server: WSGIServer | None = None
        self.metrics_thread: threading.Thread | None = None
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: ServerConfig, coordinator: Coordinator, server: grpc.aio.Server) -> Observability:
        """Add the health service to `server` (not started yet); open the health and metrics ports configured."""
        self = cls(config, coordinator)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = config.server.host
        if config.server.health_port is not None:
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{host}:{config.server.health_port}")
            if self.health_port == 0:
                raise OSError(f"server.health_port: cannot listen on {host}:{config.server.health_port}")
            await self.health_server.start()
        if config.server.metrics_port is not None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(RunCollector(config.run_dir() / "metrics.jsonl", coordinator,
                                           asyncio.get_running_loop()))
            self.metrics_server, self.metrics_thread = start_wsgi_server(config.server.metrics_port, host, registry)
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._watcher = asyncio.create_task(self._not_serving_once_ended())
        return self

    def endpoint(self) -> dict[str, int]:
        """The ports opened, for <run_dir>/endpoint.json (a configured port 0 becomes the one chosen)."""
        ports = {"health_port": self.health_port,
                 "metrics_port": self.metrics_server.server_port if self.metrics_server else None}
        return {name: port for name, port in ports.items() if port is not None}

    async def _not_serving_once_ended(self) -> None:
        while self.coordinator.done_reason is None:
            await asyncio.sleep(RUN_END_POLL_S)
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        if self.metrics_server is not None:
            # off the loop's thread: a scrape in flight waits for the loop to read the live gauges
            await asyncio.to_thread(self.metrics_server.shutdown)
            self.metrics_server.server_close()
        if self.health_server is not None:
            await self.health_server.stop(grace=1.0)
