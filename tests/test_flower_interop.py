"""fedtune strategies on Flower's engines end with fedsim's global model (issue 17).

The simulation cases run Flower's own simulation engine (Ray, two one-CPU actors for three SuperNodes, so
actors serve different clients from round to round); the deployment case runs a SuperLink and three
SuperNodes as separate processes on loopback, kills one mid-run and starts it again.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedtune.fedserver.metrics import RoundMetrics
from fedtune.fedserver.security import CaFiles, TlsFiles, create_tls
from fedtune.simulations.config import ConfigError, load_config
from fedtune.simulations.flower import (
    FlowerError,
    FlowerSettings,
    NodeReply,
    NodeRequest,
    from_record,
    make_client_app,
    run_flower_simulation,
    to_record,
)
from fedtune.simulations.runner import run_simulation
from tests.helpers import tiny_config

THREE_CLIENTS = {"scheme": "iid", "num_clients": 3}
APP = Path(__file__).resolve().parent.parent / "examples" / "flower"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this environment


def same_run(fedsim_dir: Path, flower_dir: Path) -> None:
    """Byte-identical global model files; in adapter_config.json, peft writes `target_modules` from a set, in
    the order of the writing process's string hashes, so that list is compared as a set."""
    files = sorted(path.name for path in (fedsim_dir / "global").iterdir())
    assert files == sorted(path.name for path in (flower_dir / "global").iterdir())
    for name in files:
        expected, got = (fedsim_dir / "global" / name).read_bytes(), (flower_dir / "global" / name).read_bytes()
        if name == "adapter_config.json":
            expected, got = (json.loads(text) for text in (expected, got))
            expected["target_modules"], got["target_modules"] = sorted(expected["target_modules"]), sorted(
                got["target_modules"])
        assert expected == got, name


def rows_without_time(history: list) -> list[dict]:
    return [row.model_dump(exclude={"seconds"}) for row in history]


@pytest.mark.parametrize("overrides", [
    pytest.param({"strategy": "ffa_lora"}, id="ffa_lora"),
    pytest.param({"strategy": "fedkseed"}, id="fedkseed"),
    # a wrapper with client state: int8 uplink with error feedback keeps each client's residual across rounds
    pytest.param({"strategy": "fedavg_lora", "compression": {"codec": "int8"}}, id="fedavg_lora-int8"),
    # DP-SGD's noise and Poisson sampling drawn from generators seeded per (client, round); its accountant is
    # client state. Without noise_seed they are OS-seeded and no two runs agree, in fedsim either.
    pytest.param({"strategy": "ffa_lora", "dp": {"level": "sample", "clipping_norm": 1.0, "noise_multiplier": 1.0,
                                                 "noise_seed": 7}}, id="ffa_lora-dp-sample"),
])
def test_flower_simulation_ends_with_fedsims_global_model(tmp_path, overrides):
    config = tiny_config(partition=THREE_CLIENTS, **overrides)
    fedsim = run_simulation(config, tmp_path / "fedsim", show_progress=False)
    flower = run_flower_simulation(config, tmp_path / "flower", num_cpus=2)
    same_run(tmp_path / "fedsim", tmp_path / "flower")
    assert rows_without_time(flower) == rows_without_time(fedsim)
    assert [row.clients for row in flower] == [0, 3, 3]
    assert flower[-1].eval_loss != flower[0].eval_loss  # the rounds did change the model


def fail_partition_1(marker: Path | None):
    """A Flower mod (the injected fault): the ClientApp of partition 1 raises on a train message, once (leaving
    `marker`) or, with no marker, every time; Flower turns the exception into an error reply."""

    def mod(message, context, call_next):
        if message.metadata.message_type == "train" and context.node_config["partition-id"] == 1 and (
                marker is None or not marker.exists()):
            if marker is not None:
                marker.write_text("failed")
            raise RuntimeError("injected fault")
        return call_next(message, context)

    return mod


def test_flower_client_failing_mid_round_is_asked_again_and_the_run_ends_as_fedsims(tmp_path):
    config = tiny_config(strategy="ffa_lora", partition=THREE_CLIENTS)
    fedsim = run_simulation(config, tmp_path / "fedsim", show_progress=False)
    marker = tmp_path / "fault"
    flower = run_flower_simulation(config, tmp_path / "flower", app=make_client_app([fail_partition_1(marker)]))
    assert marker.read_text() == "failed"
    same_run(tmp_path / "fedsim", tmp_path / "flower")
    assert rows_without_time(flower) == rows_without_time(fedsim)


def test_flower_client_failing_every_attempt_stops_the_run_naming_it(tmp_path):
    config = tiny_config(strategy="ffa_lora", partition=THREE_CLIENTS, rounds=1)
    with pytest.raises(FlowerError, match=r"(?s)client 'client-001': 2 attempts failed: .*injected fault"):
        run_flower_simulation(config, tmp_path, settings=FlowerSettings(attempts=2),
                              app=make_client_app([fail_partition_1(None)]))


def test_only_the_flower_module_imports_flwr():
    """fedtune works without the `flower` extra: no other module of the package imports flwr."""
    root = APP.parent.parent
    importing = []
    for path in sorted(root.glob("*/*.py")):
        if path.parts[-2] in {"strategies", "tasks", "protos", "fedserver", "fedclient", "simulations"}:
            tree = ast.parse(path.read_text())
            names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            if any(name == "flwr" or name.startswith("flwr.") for name in names):
                importing.append(path.relative_to(root).as_posix())
    assert importing == ["simulations/flower.py"]


def test_flower_messages_map_to_a_config_record_and_back():
    request = NodeRequest(kind="train", config="{}", round=2, instruction=b"\x00\x01")
    content = to_record(request)
    assert isinstance(content.config_records["fedtune"], ConfigRecord)
    assert from_record(NodeRequest, content) == request
    reply = NodeReply(client_id="client-001", update=b"\x02")
    assert from_record(NodeReply, to_record(reply)) == reply


def test_flower_message_without_fedtunes_record_is_named():
    with pytest.raises(FlowerError, match="no 'fedtune' ConfigRecord"):
        from_record(NodeRequest, RecordDict({"other": ConfigRecord({"x": 1})}))
    with pytest.raises(ValueError, match="kind"):
        from_record(NodeRequest, RecordDict({"fedtune": ConfigRecord({"kind": "dance", "config": "{}"})}))


@pytest.mark.parametrize("overrides, named", [
    ({}, "partition.scheme"),  # natural: the number of SuperNodes is unknown before the data is read
    ({"partition": THREE_CLIENTS, "asynchronous": {"buffer_size": 2}}, "asynchronous"),
])
def test_flower_refuses_what_it_cannot_run_before_starting_ray(tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named):
        run_flower_simulation(tiny_config(**overrides), tmp_path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def served_certificate(port: int, ca: Path) -> dict:
    """The certificate a TLS handshake with 127.0.0.1:`port` presents, verified against `ca`."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as secured:
            return secured.getpeercert()


class Processes:
    """Flower's processes, each in its own session so that killing one takes its children (SuperExec,
    the apps it started) with it; every one still running is killed at the end."""

    def __init__(self, directory: Path, env: dict[str, str]):
        self.directory, self.env = directory, env
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *command: str) -> None:
        with (self.directory / f"{name}.log").open("a") as log:
            self.running[name] = subprocess.Popen([str(BIN / command[0]), *command[1:]], cwd=self.directory,
                                                  env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True)

    def kill(self, name: str) -> None:
        process = self.running.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text()

    def close(self) -> None:
        for name in list(self.running):
            if self.running[name].poll() is None:
                self.kill(name)


@pytest.fixture
def processes(tmp_path) -> Iterator[Processes]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    running = Processes(tmp_path, env)
    try:
        yield running
    finally:
        running.close()


@pytest.mark.e2e
def test_flower_deployment_with_a_supernode_killed_and_restarted_ends_with_fedsims_model(tmp_path, processes):
    """A SuperLink and three SuperNodes (loopback, TLS: a CA and a server certificate from fedserver's own
    `create_tls`, given to Flower as its flags name them); SuperNode 1 is killed as round 2 starts and started
    again: the ServerApp asks its client's new node again and the run ends as fedsim's does."""
    config_path = APP / "ffa_lora.toml"
    fedsim = run_simulation(load_config(config_path), tmp_path / "fedsim", show_progress=False)
    link = free_port()
    tls = TlsFiles(tmp_path / "tls")
    create_tls(tls, CaFiles(tmp_path / "ca"), ["127.0.0.1", "localhost"], "flower test")
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\n'
        f'root-certificates = "{tls.ca_cert}"\n')
    processes.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile",
                    str(tls.server_cert), "--ssl-keyfile", str(tls.server_key), "--host", "127.0.0.1", "--port",
                    str(link), "--disable-runtime-dependency-installation")

    def supernode(partition: int, name: str) -> None:
        processes.start(name, "flower-supernode", "--root-certificates", str(tls.ca_cert), "--superlink",
                        f"127.0.0.1:{link}", "--port", str(free_port()), "--node-config", f"partition-id={partition}")

    for partition in range(3):
        supernode(partition, f"supernode-{partition}")
    out = tmp_path / "flower"
    wait_for(lambda: "Uvicorn running" in processes.log("superlink"), 60, "the SuperLink")
    assert served_certificate(link, tls.ca_cert)["subject"] == ((("commonName", "127.0.0.1"),),)  # TLS is on
    started = subprocess.run(
        [str(BIN / "flwr"), "run", str(APP), "loopback", "--run-config",
         f"config='{config_path}' out-dir='{out}' reply-timeout-s=90.0 node-wait-s=240.0"],
        env=processes.env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr

    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 400, "round 1")
    processes.kill("supernode-1")  # round 2's instructions are out, or about to be
    supernode(1, "supernode-1-again")
    wait_for(lambda: (out / "metrics.png").exists(), 600, "the end of the run (round 2 and the global model)")

    assert "Receiving: train message" in processes.log("supernode-1-again")  # the new node did client-001's round
    same_run(tmp_path / "fedsim", out)
    flower = [RoundMetrics.model_validate_json(line) for line in metrics.read_text().splitlines()]
    assert rows_without_time(flower) == rows_without_time(fedsim)
