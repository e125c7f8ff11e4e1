"""fedserver and fedclients on separate hosts (network namespaces, tests/multihost.py), with faults.

Each host has its own network stack and /etc/hosts, so clients reach `server:50051` by name over
TLS with a certificate issued for `server`, as in deploy/docker-compose.yml, whose services' own
commands run the first test. The faults are the network's: a cable cut and restored, a 1 Mbit/s
uplink, a host that vanishes without a goodbye, and the server host's process killed and resumed.
Needs root (CI runs as root); tiny model, 1-2 rounds of a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedtune.fedserver.cli import main as fedserver_main
from fedtune.fedserver.store import RunStore
from tests.multihost import Network, compose_services
from tests.test_transport import (
    assert_same_tensors,
    fedsim_run,
    finish,
    load_global,
    run_config,
    stored,
    toml,
    write_partitions,
)

pytestmark = pytest.mark.e2e
COMPOSE = Path(__file__).resolve().parent.parent / "deploy" / "docker-compose.yml"
CLIENTS = ["client-000", "client-001"]
PORT = 50051  # every host has its own ports, so the compose file's port is free on the server host


@pytest.fixture(autouse=True)
def root() -> None:
    """Fail, not skip: a skipped fault test would pass CI unnoticed wherever root went missing."""
    if os.geteuid() != 0:
        pytest.fail("tests/test_multihost.py needs root (network namespaces, tc); CI runs it as root")


@pytest.fixture
def network() -> Iterator[Network]:
    """The server host and two client hosts, removed after the test whatever happened."""
    with Network(["server", *CLIENTS]) as hosts:
        yield hosts


def two_client_config(**overrides: Any) -> dict[str, Any]:
    return run_config("fedavg_lora", partition={"scheme": "iid", "num_clients": len(CLIENTS)}, **overrides)


def server_toml(config: dict[str, Any], run_dir: Path, **server: Any) -> str:
    """The run config with a [server] section for the server host (fast heartbeats: faults show up soon)."""
    section = {"run_dir": str(run_dir), "port": PORT, "host": "0.0.0.0", "heartbeat_interval_s": 1.0,
               "client_timeout_s": 5.0, "long_poll_s": 2.0, "linger_s": 10.0, **server}
    return toml({**{key: value for key, value in config.items() if key != "partition"}, "server": section})


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@dataclass
class Federation:
    """One run on `network`: fedserver on host `server`, a fedclient on each client host; files in `directory`."""

    network: Network
    directory: Path

    @classmethod
    def prepare(cls, network: Network, directory: Path, config: dict[str, Any], **server: Any) -> Federation:
        """CA, a certificate for host `server`, one token file and one data file per client, server.toml."""
        federation = cls(network, directory)
        assert fedserver_main(["init", "--run-dir", str(federation.run_dir), "--clients", str(len(CLIENTS)),
                               "--host", "server"]) == 0
        tokens = (federation.run_dir / "enrollment-tokens.txt").read_text().splitlines()
        for name, line in zip(CLIENTS, tokens, strict=True):
            (directory / f"{name}.token").write_text(line.split("\t")[1])
        write_partitions(config, directory)
        (directory / "server.toml").write_text(server_toml(config, federation.run_dir, **server))
        return federation

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"

    def start_server(self, resume: bool = False) -> subprocess.Popen:
        command = ["fedserver", "start", "--config", str(self.directory / "server.toml"), *(["--resume"] * resume)]
        return self.network.run("server", command, self.directory / "server.log")

    def start_client(self, name: str) -> subprocess.Popen:
        return self.network.run(name, [
            "fedclient", "join", "--server", f"server:{PORT}", "--ca", str(self.run_dir / "tls" / "ca.pem"),
            "--name", name, "--token-file", str(self.directory / f"{name}.token"),
            "--data", str(self.directory / f"{name}.jsonl"), "--state", str(self.directory / f"{name}.state"),
            "--give-up-after", "120", "--max-backoff", "1", "--quiet"], self.directory / f"{name}.log")

    def start_clients_last_one_last(self) -> list[subprocess.Popen]:
        """The last client registers after the others, so round 1 opens while it still builds its model:
        a fault injected as soon as the round is open comes before its update."""
        first = [self.start_client(name) for name in CLIENTS[:-1]]
        self.wait_until(lambda: len(self.clients()) == len(first), "the first clients to register")
        return [*first, self.start_client(CLIENTS[-1])]

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        """Poll `condition` often (a fault must land at a protocol step); on timeout, fail with every log."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(
                    f"== {log.name}\n{log.read_text()[-3000:]}" for log in sorted(self.directory.glob("*.log"))))
            time.sleep(0.05)

    def clients(self) -> dict[str, int]:
        """Each registered client's rounds done, as the server stored them."""
        return {c.client_id: c.rounds_done for c in stored(self.run_dir, RunStore.clients)}

    def round_status(self, round: int) -> str | None:
        return next((r.status for r in stored(self.run_dir, RunStore.rounds) if r.round == round), None)

    def client_log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text()

    def rows(self) -> list[tuple[int, int, int]]:
        """(round, clients, stragglers) of each metrics row."""
        return [(row["round"], row["clients"], row.get("stragglers", 0)) for row in metrics(self.run_dir)]


def test_the_compose_files_services_on_three_hosts_reach_fedsims_global_model(tmp_path: Path):
    """deploy/docker-compose.yml's own commands (init, then the server, then the clients), each on the host of
    its service's name; only server.toml is this test's (a tiny run in place of the example's)."""
    services = compose_services(COMPOSE)
    compose_dir = tmp_path / "compose"
    config = two_client_config()
    clients = sorted(name for name in services if name.startswith("client-"))
    assert clients == CLIENTS, services
    (compose_dir / "data").mkdir(parents=True)
    write_partitions(config, compose_dir / "data")
    run_dir = services["server"].mounts(compose_dir)["/run-dir"]
    (compose_dir / "server.toml").write_text(server_toml(config, run_dir, min_clients=len(clients)))
    with Network(list(services)) as network:
        assert network.exec("client-000", ["getent", "hosts", "server"]).split()[0] == network.hosts["server"].address
        started = network.up(services, compose_dir, tmp_path)
        want = fedsim_run(config, tmp_path / "fedsim")  # computed while the devices train
        finish([started[name] for name in ["server", *clients]], tmp_path)
    assert [(row["round"], row["clients"]) for row in metrics(run_dir)] == [(0, 0), (1, 2), (2, 2)]
    assert_same_tensors(load_global(run_dir / "global"), want.global_model)


def test_a_client_whose_cable_is_cut_after_its_instruction_resumes_when_it_is_back(network: Network, tmp_path: Path):
    """Cut while it trains (60 local steps, about a second), so its upload meets a dead link; quorum 1: the round
    waits for it. TCP carries the stalled upload on once the cable is back."""
    config = two_client_config(train={**run_config("fedavg_lora")["train"], "local_steps": 60})
    federation = Federation.prepare(network, tmp_path, config, min_clients=2)
    server = federation.start_server()
    clients = federation.start_clients_last_one_last()
    victim = CLIENTS[-1]
    federation.wait_until(lambda: "round 1/2: training" in federation.client_log(victim), "the victim's instruction")
    network.cut(victim)
    time.sleep(6)  # longer than client_timeout_s: the server stops counting it as live
    assert federation.round_status(1) == "running" and victim not in stored(
        federation.run_dir, lambda store: [update.client_id for update, _ in store.load_updates(1)])
    network.restore(victim)
    finish([server, *clients], tmp_path)
    assert federation.rows() == [(0, 0, 0), (1, 2, 0), (2, 2, 0)]


def test_a_client_behind_a_1_mbit_uplink_is_a_straggler_when_the_deadline_is_shorter_than_its_upload(
        network: Network, tmp_path: Path):
    """Rank 128: a 1.1 MB update, about 9 s at 1 Mbit/s, against a 2 s deadline; quorum 0.5 closes the round
    on the other client's update. The slow client registers last, so the other one never waits for a model."""
    config, deadline_s = two_client_config(rounds=1, options={"rank": 128}), 2.0
    federation = Federation.prepare(network, tmp_path, config, min_clients=2, quorum=0.5, round_deadline_s=deadline_s,
                                    linger_s=30.0)
    slow = CLIENTS[-1]
    network.shape(slow, "1mbit")
    server = federation.start_server()
    finish([server, *federation.start_clients_last_one_last()], tmp_path)
    [_, round_one] = metrics(federation.run_dir)
    assert (round_one["clients"], round_one["stragglers"]) == (1, 1)
    assert round_one["bytes_up"] * 8 / 1e6 > 2 * deadline_s  # the update takes well over the deadline at 1 Mbit/s
    assert federation.clients() == {CLIENTS[0]: 1, slow: 0}


def test_a_killed_server_resumed_on_its_host_ends_with_an_unbroken_runs_model(network: Network, tmp_path: Path):
    """SIGKILL while both clients train on round 2's instructions (60 local steps, about a second), then
    `fedserver start --resume`; the clients' uploads retry until it listens and the resumed round takes them."""
    config = two_client_config(train={**run_config("fedavg_lora")["train"], "local_steps": 60})
    federation = Federation.prepare(network, tmp_path, config, min_clients=2)
    federation.start_server()
    clients = [federation.start_client(name) for name in CLIENTS]
    federation.wait_until(lambda: all("round 2/2: training" in federation.client_log(name) for name in CLIENTS),
                          "both clients' round-2 instructions")
    network.kill("server")
    assert not any("round 2/2: uploading" in federation.client_log(name) for name in CLIENTS)  # killed mid-round
    server = federation.start_server(resume=True)
    want = fedsim_run(config, tmp_path / "fedsim")
    finish([server, *clients], tmp_path)
    assert "resume: round 2 continues with 0 of 2 updates" in (tmp_path / "server.log").read_text()
    assert [row[:2] for row in federation.rows()] == [(0, 0), (1, 2), (2, 2)]
    assert_same_tensors(load_global(federation.run_dir / "global"), want.global_model)


def test_a_client_host_that_vanishes_mid_round_is_a_straggler_and_quorum_closes_the_round(
        network: Network, tmp_path: Path):
    """Its cable is cut, its process killed and its namespace deleted as soon as round 1 opens: no goodbye,
    no connection reset, ever."""
    config = two_client_config(rounds=1)
    federation = Federation.prepare(network, tmp_path, config, min_clients=2, quorum=0.5, round_deadline_s=3.0,
                                    linger_s=2.0)
    server = federation.start_server()
    [survivor, _] = federation.start_clients_last_one_last()
    federation.wait_until(lambda: federation.round_status(1) is not None, "round 1")
    network.remove(CLIENTS[-1])
    finish([server, survivor], tmp_path)
    assert federation.rows() == [(0, 0, 0), (1, 1, 1)]
    assert federation.clients() == {CLIENTS[0]: 1, CLIENTS[-1]: 0}
