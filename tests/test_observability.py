"""fedserver's health service, Prometheus endpoint and JSON logs (fedserver.observability)."""

from __future__ import annotations

import json
import logging
import sys
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from fedtune.fedserver.observability import HEALTH_SERVICES, JsonLogFormatter, RunCollector
from tests.test_transport import (
    Server,
    in_process_client,
    init_run,
    no_leftover_processes,  # noqa: F401  (autouse: no server or client outlives its test)
    run_config,
    start_client,
    start_server,
    wait_until,
    write_partitions,
)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def samples(text: str) -> dict[str, float]:
    """Prometheus exposition text as {name{labels}: value}."""
    return {sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def collected(collector: RunCollector) -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return {sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items())): sample.value
            for family in registry.collect() for sample in family.samples}


def expected_counters(rows: list[dict[str, Any]]) -> dict[str, float]:
    """What the counters must say: sums over metrics.jsonl's rows after round 0."""
    rounds = [row for row in rows if row["round"] >= 1]
    return {
        "fedtune_rounds_completed_total": len(rounds),
        "fedtune_bytes_up_total": sum(row["bytes_up"] for row in rounds),
        "fedtune_bytes_down_total": sum(row["bytes_down"] for row in rounds),
        "fedtune_stragglers_total": sum(row.get("stragglers", 0) for row in rounds),
        "fedtune_upload_rejections_total{reason=invalid_update}": sum(row.get("rejected", 0) for row in rounds),
        "fedtune_upload_rejections_total{reason=stale}": sum(row.get("stale_refused", 0) for row in rounds),
    }


def test_counters_are_the_sums_of_metrics_jsonl_and_epsilon_the_latest(tmp_path: Path):
    rows = [
        {"round": 0, "clients": 0, "bytes_up": 0, "bytes_down": 0, "rejected": 0, "seconds": 0.0},
        {"round": 1, "clients": 2, "bytes_up": 100, "bytes_down": 40, "rejected": 1, "seconds": 1.5,
         "stragglers": 1, "epsilon": 0.5},
        {"round": 2, "clients": 3, "bytes_up": 150, "bytes_down": 60, "rejected": 2, "stale_refused": 1,
         "seconds": 2.25, "stragglers": 0, "epsilon": 0.75},
    ]
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    got = collected(RunCollector(metrics_file))
    assert {key: got[key] for key in expected_counters(rows)} == expected_counters(rows) == {
        "fedtune_rounds_completed_total": 2, "fedtune_bytes_up_total": 250, "fedtune_bytes_down_total": 100,
        "fedtune_stragglers_total": 1, "fedtune_upload_rejections_total{reason=invalid_update}": 3,
        "fedtune_upload_rejections_total{reason=stale}": 1}
    assert got["fedtune_last_round_duration_seconds"] == 2.25 and got["fedtune_epsilon_spent"] == 0.75
    assert "fedtune_current_round" not in got  # no coordinator: no live gauges


def test_a_half_written_metrics_file_keeps_the_last_complete_read(tmp_path: Path):
    metrics_file = tmp_path / "metrics.jsonl"
    collector = RunCollector(metrics_file)
    assert collected(collector)["fedtune_rounds_completed_total"] == 0  # no file yet: nothing done
    metrics_file.write_text(json.dumps({"round": 1, "bytes_up": 7, "bytes_down": 3, "seconds": 1.0}) + "\n")
    assert collected(collector)["fedtune_bytes_up_total"] == 7
    metrics_file.write_text(metrics_file.read_text() + '{"round": 2, "bytes_u')  # the server is rewriting it
    assert collected(collector)["fedtune_bytes_up_total"] == 7
    assert "fedtune_epsilon_spent" not in collected(collector)  # not a DP run


def test_json_log_lines_carry_time_level_logger_and_message():
    formatter = JsonLogFormatter()
    record = logging.LogRecord("fedtune.fedserver.coordinator", logging.WARNING, __file__, 1, "round %d: %s",
                               (3, 'a "quoted"\nline'), None)
    entry = json.loads(formatter.format(record))
    assert entry.pop("time").endswith("+00:00")
    assert entry == {"level": "WARNING", "logger": "fedtune.fedserver.coordinator",
                     "message": 'round 3: a "quoted"\nline'}
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(formatter.format(record))["exception"]


def health_status(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return samples(response.read().decode())


def endpoint(server: Server) -> dict[str, Any]:
    path = server.run_dir / "endpoint.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.e2e
def test_a_live_run_is_healthy_and_its_scraped_counters_match_metrics_jsonl(tmp_path: Path):
    """Two clients train two rounds. A third registers during round 1 and never pulls: round 2 selects
    it and closes on quorum without it (a straggler), and the ended run lingers until it hears DONE,
    which the test tells it only after scraping the ended run."""
    config = run_config("fedavg_lora")
    tokens = init_run(tmp_path / "run", 3)
    files = write_partitions(config, tmp_path)
    server = start_server(tmp_path, config, {"min_clients": 2, "insecure": True, "health_port": 0,
                                             "metrics_port": 0, "log_format": "json", "linger_s": 120.0,
                                             "quorum": 0.5, "round_deadline_s": 5.0})
    clients = [start_client(server, tmp_path, cid, files[cid], token)
               for cid, token in zip(["client-000", "client-001"], tokens, strict=False)]
    wait_until(lambda: "metrics_port" in endpoint(server), 120, "the server to listen", server)
    ports = endpoint(server)
    assert [health_status(ports[name], service) for name in ("health_port", "port") for service in HEALTH_SERVICES
            ] == [SERVING] * 4  # on its own plaintext port and on the federation port

    wait_until(lambda: scrape(ports["metrics_port"]).get("fedtune_current_round") == 1, 300, "round 1", server)
    late = in_process_client(server, tmp_path, "client-002", files["client-002"], tokens[2])
    late.register()
    during = scrape(ports["metrics_port"])
    assert during["fedtune_clients_connected"] == 3

    wait_until(lambda: health_status(ports["health_port"], "") == NOT_SERVING, 300, "the run's end", server)
    assert health_status(ports["port"], "fedtune.v1.Federation") == NOT_SERVING
    after = scrape(ports["metrics_port"])  # the run has ended; the server lingers for client-002
    rows = server.metrics()
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert {key: after[key] for key in expected_counters(rows)} == expected_counters(rows)
    assert after["fedtune_bytes_up_total"] > 0 and after["fedtune_last_round_duration_seconds"] == rows[-1]["seconds"]
    assert after["fedtune_current_round"] == 0 and after["fedtune_clients_selected"] == 0

    status, _ = late.pull()
    late.close()
    assert status.kind == status.DONE
    assert server.wait(60) == 0, server.output()[-3000:]
    assert [process.wait(60) for process in clients] == [0, 0]
    logged = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    assert {"time", "level", "logger", "message"} <= set(logged[0])
    assert any(entry["message"].startswith("run finished") for entry in logged)
