"""fedserver and fedclient over real gRPC on loopback, as separate processes.

The server is always the `fedserver` console script in its own process; devices are `fedclient`
processes, except where a test must act at an exact protocol step (kill the server between two
uploads, send a crafted bad message): there the test drives the same FederatedClient / raw stub
itself. Tiny model, built-in data, 2 rounds. Subprocesses run with one torch thread, as does the
in-process fedsim reference, so results can be compared bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedtune.fedclient.client import ClientSettings, FederatedClient
from fedtune.fedclient.connection import ConnectionSettings, FatalError, FederationStub
from fedtune.fedserver.cli import main as fedserver_main
from fedtune.fedserver.store import RunStore
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.payload import header_tensor, update_messages
from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.runner import run_simulation
from fedtune.strategies.api import ClientUpdate
from fedtune.strategies.dp import epsilon_of
from fedtune.tasks.data import load_records, partition, split_holdout

pytestmark = pytest.mark.e2e  # real server and client processes on loopback sockets
BIN = Path(sys.executable).parent
# Each case is a run config's differences from run_config(): every built-in strategy, and each
# wrapper (DP at both levels, a codec) around a LoRA strategy. Noise is seeded so that fedsim's
# result is the reference bit for bit.
E2E_CASES: dict[str, dict[str, Any]] = {
    "fedavg_lora": {"strategy": "fedavg_lora"},
    "ffa_lora": {"strategy": "ffa_lora"},
    "fedkseed": {"strategy": "fedkseed", "options": {"seed_pool_size": 64}},
    "admm": {"strategy": "admm"},
    "fedavg_lora+client_dp": {"strategy": "fedavg_lora", "dp": {
        "level": "client", "clipping_norm": 0.05, "noise_multiplier": 0.5, "noise_seed": 7}},
    "ffa_lora+sample_dp": {"strategy": "ffa_lora", "dp": {
        "level": "sample", "clipping_norm": 1.0, "noise_multiplier": 1.0, "noise_seed": 7}},
    "fedavg_lora+int4": {"strategy": "fedavg_lora", "compression": {"codec": "int4", "downlink": "fp16"}},
}
CLIENTS = ["client-000", "client-001", "client-002"]
MiB = 1 << 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
_started: list[subprocess.Popen] = []  # every process a test started, so none outlives its test


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    first = len(_started)
    yield
    for process in _started[first:]:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_config(strategy: str, **overrides: Any) -> dict[str, Any]:
    """The shared run part (fedsim's and fedserver's): 3 iid clients, 2 rounds, a few steps."""
    config: dict[str, Any] = {
        "strategy": strategy, "rounds": 2, "seed": 0,
        "options": {"rank": 4},
        "model": {"path": "builtin:tiny-llama", "kind": "causal_lm", "max_length": 32},
        "data": {"train": "builtin:ops", "max_train_examples": 240, "max_eval_examples": 32},
        "partition": {"scheme": "iid", "num_clients": 3},
        "train": {"local_steps": 2, "batch_size": 8, "learning_rate": 3e-3, "eval_batch_size": 32},
    }
    config.update(overrides)
    return config


def toml_value(value: Any) -> str:
    """A scalar or list as JSON (which TOML reads alike), a table as an inline table."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + " }"
    return json.dumps(value)


def toml(config: dict[str, Any]) -> str:
    """Enough TOML for these configs: scalars and lists at the top, then one table per section."""
    scalars = [f"{key} = {toml_value(value)}" for key, value in config.items() if not isinstance(value, dict)]
    tables = [f"[{key}]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None)
              for key, value in config.items() if isinstance(value, dict)]
    return "\n".join(scalars + tables) + "\n"


def write_partitions(config: dict[str, Any], directory: Path) -> dict[str, Path]:
    """Each virtual client's rows exactly as fedsim splits them, one jsonl file per device."""
    simulation = SimulationConfig.model_validate(config)
    rows = load_records(simulation.data.train, simulation.seed, simulation.data.max_train_examples)
    train_rows, _ = split_holdout(rows, simulation.data.eval_fraction, simulation.seed)
    files = {}
    for client_id, part in partition(train_rows, simulation.partition, simulation.seed).items():
        files[client_id] = directory / f"{client_id}.jsonl"
        files[client_id].write_text("".join(json.dumps(row) + "\n" for row in part))
    return files


def load_global(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor a run saved as its global model (an adapter, or a full model for fedkseed)."""
    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors file in {directory}"
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


@dataclass
class FedsimResult:
    global_model: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]]


_fedsim_cache: dict[str, FedsimResult] = {}


def fedsim_run(config: dict[str, Any], out_dir: Path) -> FedsimResult:
    """What fedsim computes for `config`, on one torch thread like the devices (cached per config)."""
    key = json.dumps(config, sort_keys=True)
    if key not in _fedsim_cache:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_simulation(SimulationConfig.model_validate(config), out_dir, show_progress=False)
        finally:
            torch.set_num_threads(threads)
        metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        _fedsim_cache[key] = FedsimResult(load_global(out_dir / "global"), metrics)
    return _fedsim_cache[key]


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@dataclass
class Server:
    process: subprocess.Popen
    run_dir: Path
    log: Path
    port: int
    tls: bool

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"fedserver did not finish in {timeout} s:\n{self.output()[-4000:]}") from None

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def global_model(self) -> dict[str, torch.Tensor]:
        return load_global(self.run_dir / "global")


def init_run(run_dir: Path, clients: int) -> list[str]:
    """`fedserver init` (in-process: same code as the console script, without a second torch import)."""
    assert fedserver_main(["init", "--run-dir", str(run_dir), "--clients", str(clients)]) == 0
    return [line.split("\t")[1] for line in (run_dir / "enrollment-tokens.txt").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(tmp: Path, config: dict[str, Any], server: dict[str, Any], resume: bool = False,
                 port: int | None = None, limits: dict[str, int] | None = None) -> Server:
    """Start `fedserver start` and return at once (clients retry until it listens, which overlaps the
    two processes' start-up)."""
    run_dir = tmp / "run"
    section = {"run_dir": str(run_dir), "port": port or free_port(), "host": "127.0.0.1", "insecure": False,
               "heartbeat_interval_s": 1.0, "client_timeout_s": 5.0, "long_poll_s": 2.0, "linger_s": 30.0, **server}
    path = tmp / "server.toml"
    path.write_text(toml({**{k: v for k, v in config.items() if k != "partition"}, "server": section,
                          "limits": limits or {}}))
    log = tmp / f"server-{time.monotonic_ns()}.log"
    command = [str(BIN / "fedserver"), "start", "--config", str(path), *(["--resume"] if resume else [])]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV)
    _started.append(process)
    return Server(process, run_dir, log, section["port"], tls=not section["insecure"])


def start_client(server: Server, tmp: Path, name: str, data: Path, token: str | None,
                 extra: Sequence[str] = ()) -> subprocess.Popen:
    security = ["--ca", str(server.run_dir / "tls" / "ca.pem")] if server.tls else ["--insecure"]
    command = [str(BIN / "fedclient"), "join", "--server", server.address, "--data", str(data), "--name", name,
               "--state", str(tmp / f"{name}.state"), "--give-up-after", "120", "--max-backoff", "2", "--quiet",
               *security, *(["--token", token] if token else []), *extra]
    process = subprocess.Popen(command, stdout=(tmp / f"{name}.log").open("a"), stderr=subprocess.STDOUT, env=ENV)
    _started.append(process)
    return process


def finish(processes: list[subprocess.Popen], tmp: Path, timeout: float = 120) -> None:
    """Wait for every process to exit 0; fail as soon as one exits otherwise."""
    deadline = time.monotonic() + timeout
    while any(process.poll() is None for process in processes) and time.monotonic() < deadline:
        if any(process.poll() not in (None, 0) for process in processes):
            break
        time.sleep(0.2)
    codes = [process.poll() for process in processes]
    for process in processes:
        if process.poll() is None:
            process.kill()
    assert codes == [0] * len(processes), f"exit codes {codes}:\n" + "\n".join(
        f"== {f.name}\n{f.read_text()[-3000:]}" for f in sorted(tmp.glob("*.log")))


def in_process_client(server: Server, tmp: Path, name: str, data: Path, token: str | None,
                      **connection: Any) -> FederatedClient:
    settings = {"server": server.address, "token": token, "insecure": not server.tls,
                "ca": server.run_dir / "tls" / "ca.pem" if server.tls else None,
                "max_message_bytes": 256 * MiB, "give_up_after_s": 120.0, "max_backoff_s": 2.0, **connection}
    return FederatedClient(ClientSettings(connection=ConnectionSettings(**settings), data=data, name=name,
                                          state_file=tmp / f"{name}.state"))


def wait_until(condition, timeout: float, what: str, server: Server | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f":\n{server.output()[-3000:]}" if server else ""))
        time.sleep(0.1)


def stored(run_dir: Path, query) -> Any:
    store = RunStore(run_dir / "state.sqlite", readonly=True)
    try:
        return query(store)
    finally:
        store.close()


# -- the same result as fedsim --------------------------------------------------------------


@pytest.mark.parametrize("case", E2E_CASES)
def test_server_and_three_clients_give_fedsims_global_model(case: str, tmp_path: Path):
    config = run_config(**E2E_CASES[case])
    tokens = init_run(tmp_path / "run", len(CLIENTS))
    files = write_partitions(config, tmp_path)
    server = start_server(tmp_path, config, {"min_clients": 3})
    clients = [start_client(server, tmp_path, cid, files[cid], token)
               for cid, token in zip(CLIENTS, tokens, strict=False)]
    want = fedsim_run(config, tmp_path / "fedsim")  # computed while the devices train
    finish(clients, tmp_path)
    assert server.wait(60) == 0, server.output()[-3000:]
    rows = server.metrics()
    assert [(row["round"], row["clients"], row.get("stragglers", 0)) for row in rows] == [
        (0, 0, 0), (1, 3, 0), (2, 3, 0)]
    fedsim_rows = want.metrics
    assert [row.get("epsilon") for row in rows] == [row.get("epsilon") for row in fedsim_rows]
    assert ("dp" in config) == (rows[-1].get("epsilon", 0) > 0)  # a DP run is accounted for, over gRPC too
    for key in ("bytes_up", "bytes_down"):  # fedsim's accounting predicts the real messages, whose
        for row, reference in zip(rows[1:], fedsim_rows[1:], strict=False):  # ids and framing add < 100 B a client
            assert row[key] > 0 and abs(row[key] - reference[key]) < 0.01 * reference[key] + 100 * len(CLIENTS), (
                key, row[key], reference[key])
    assert_same_tensors(server.global_model(), want.global_model)


def test_a_server_without_data_gets_the_clients_evaluation_as_fedsim_computes_it(tmp_path: Path):
    """Federated evaluation only: the server's data.train does not exist and is never read; every row,
    the final model's included, holds the clients' example-weighted evaluation, equal to fedsim's."""
    config = run_config("fedavg_lora", evaluation={"federated": True, "central": False})
    tokens = init_run(tmp_path / "run", len(CLIENTS))
    files = write_partitions(config, tmp_path)
    no_data = {**config, "data": {**config["data"], "train": str(tmp_path / "not-on-the-server.jsonl")}}
    server = start_server(tmp_path, no_data, {"min_clients": 3})
    clients = [start_client(server, tmp_path, cid, files[cid], token)
               for cid, token in zip(CLIENTS, tokens, strict=False)]
    want = fedsim_run(config, tmp_path / "fedsim")
    finish(clients, tmp_path)
    assert server.wait(60) == 0, server.output()[-3000:]
    rows = server.metrics()
    assert [row["round"] for row in rows] == [0, 1, 2] and all(row["eval_loss"] is None for row in rows)
    keys = ("fed_eval_loss", "fed_eval_accuracy", "fed_eval_examples", "fed_eval_clients")
    assert [[row[key] for key in keys] for row in rows] == [[row[key] for key in keys] for row in want.metrics]
    assert_same_tensors(server.global_model(), want.global_model)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """In-process training uses one thread, like the subprocesses and the fedsim reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pull_instruction(client: FederatedClient, round: int):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, instruction = client.pull()
        if status.kind == pb.PullStatus.INSTRUCTION and status.round == round:
            return instruction
        assert status.kind == pb.PullStatus.WAIT, status
    raise AssertionError(f"no instruction for round {round}")


# -- faults: a client dies, the server dies ---------------------------------------------------


def test_killed_client_round_closes_on_quorum_and_the_client_is_scheduled_again(tmp_path: Path):
    config = run_config("fedavg_lora")
    tokens = init_run(tmp_path / "run", 3)
    files = write_partitions(config, tmp_path)
    server = start_server(tmp_path, config, {"min_clients": 3, "quorum": 0.6, "round_deadline_s": 6.0,
                                             "client_timeout_s": 4.0})
    survivors = [start_client(server, tmp_path, cid, files[cid], token)
                 for cid, token in zip(CLIENTS[:2], tokens, strict=False)]
    wait_until(lambda: len(stored(server.run_dir, RunStore.clients)) == 2, 120, "two clients", server)
    # The victim registers last, so round 1 starts selecting it while it is still building its model.
    victim = start_client(server, tmp_path, "client-002", files["client-002"], tokens[2])
    wait_until(lambda: any(r.round == 1 for r in stored(server.run_dir, RunStore.rounds)), 120, "round 1", server)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait_until(lambda: any(r.round == 1 and r.status == "done" for r in stored(server.run_dir, RunStore.rounds)),
               60, "round 1 to close on quorum", server)
    restarted = start_client(server, tmp_path, "client-002", files["client-002"], tokens[2])  # the same command again
    finish([*survivors, restarted], tmp_path)
    assert server.wait(60) == 0
    rounds = {r.round: r for r in stored(server.run_dir, RunStore.rounds)}
    assert rounds[1].selected == CLIENTS and rounds[2].selected == CLIENTS
    rows = server.metrics()
    assert [(row["round"], row["clients"], row.get("stragglers")) for row in rows[1:]] == [(1, 2, 1), (2, 3, 0)]
    clients = {c.client_id: c for c in stored(server.run_dir, RunStore.clients)}
    assert sorted(clients) == CLIENTS and clients["client-002"].rounds_done == 1


@pytest.mark.parametrize("case", ["fedavg_lora", "fedavg_lora+client_dp"])
def test_killed_server_resumes_and_ends_with_an_unbroken_runs_model(case: str, tmp_path: Path, one_torch_thread):
    """A DP run must also resume its accountant (and its noise stream) from the checkpoint."""
    config = run_config(**E2E_CASES[case])
    tokens = init_run(tmp_path / "run", 3)
    files = write_partitions(config, tmp_path)
    port = free_port()
    server = start_server(tmp_path, config, {"min_clients": 3}, port=port)
    others = [start_client(server, tmp_path, cid, files[cid], token)
              for cid, token in zip(CLIENTS[:2], tokens, strict=False)]
    me = in_process_client(server, tmp_path, "client-002", files["client-002"], tokens[2])
    me.register()
    assert me.push(me.train(pull_instruction(me, 1)))
    update = me.train(pull_instruction(me, 2))
    wait_until(lambda: stored(server.run_dir, lambda s: s.accepted_count(2)) == 2, 60, "two round-2 updates", server)
    server.process.send_signal(signal.SIGKILL)  # mid-round: two updates accepted, one outstanding
    server.process.wait()
    server = start_server(tmp_path, config, {"min_clients": 3}, resume=True, port=port)
    assert me.push(update)  # retries until the resumed server listens; the other two are not re-sent
    assert me.run() == "all 2 rounds completed"
    finish(others, tmp_path)
    assert server.wait(60) == 0, server.output()[-3000:]
    assert "round 2 continues with 2 of 3 updates already accepted" in server.output()
    assert [(row["round"], row["clients"]) for row in server.metrics()] == [(0, 0), (1, 3), (2, 3)]
    want = fedsim_run(config, tmp_path / "fedsim")
    assert [row.get("epsilon") for row in server.metrics()] == [row.get("epsilon") for row in want.metrics]
    assert_same_tensors(server.global_model(), want.global_model)
    rows = server.metrics()
    again = start_server(tmp_path, config, {"min_clients": 3, "linger_s": 0}, resume=True, port=port)
    assert again.wait(60) == 0, again.output()[-3000:]
    assert "already finished (all 2 rounds completed)" in again.output() and again.metrics() == rows


@pytest.mark.parametrize("max_staleness", [2, 0])
def test_asynchronous_rounds_go_on_without_a_slow_client_whose_stale_update_is_weighted_or_refused(
        max_staleness: int, tmp_path: Path, one_torch_thread, caplog):
    """FedBuff over gRPC, K = 2: the slow device (driven here) takes its round-1 work and holds the update
    while the two fast devices close round 1 without it; sent then, the update is one or two rounds stale:
    taken and down-weighted with max_staleness = 2, refused as STALE with max_staleness = 0."""
    config = run_config("fedavg_lora", rounds=3, asynchronous={"buffer_size": 2, "max_staleness": max_staleness})
    tokens = init_run(tmp_path / "run", 3)
    files = write_partitions(config, tmp_path)
    server = start_server(tmp_path, config, {"min_clients": 1})
    slow = in_process_client(server, tmp_path, "client-002", files["client-002"], tokens[2])
    slow.register()
    update = slow.train(pull_instruction(slow, 1))
    fast = [start_client(server, tmp_path, cid, files[cid], token)
            for cid, token in zip(CLIENTS[:2], tokens, strict=False)]
    wait_until(lambda: any(r.round == 1 and r.status == "done" for r in stored(server.run_dir, RunStore.rounds)),
               120, "round 1 to close without the slow client", server)
    assert slow.push(update) == (max_staleness > 0)
    assert slow.run() == "all 3 rounds completed"
    finish(fast, tmp_path)
    assert server.wait(60) == 0, server.output()[-3000:]
    rows = server.metrics()[1:]
    assert [row["clients"] for row in rows] == [2, 2, 2] and rows[0]["staleness_max"] == 0
    if max_staleness:
        assert max(row["staleness_max"] for row in rows) >= 1 and sum(row["stale_refused"] for row in rows) == 0
    else:
        assert all(row["staleness_max"] == 0 for row in rows) and sum(row["stale_refused"] for row in rows) >= 1
        assert "asynchronous.max_staleness is 0" in caplog.text  # the STALE status reached the device


def test_a_killed_asynchronous_server_keeps_its_buffered_stale_update_and_the_work_it_handed_out(
        tmp_path: Path, one_torch_thread):
    """Round 2's buffer holds client-002's update from round 1 (one round stale) and client-000 holds round-2
    work when the server is killed; the resumed server replays the stale update and takes client-000's."""
    config = run_config("fedavg_lora", rounds=3, asynchronous={"buffer_size": 2, "max_staleness": 2})
    tokens = init_run(tmp_path / "run", 3)
    files = write_partitions(config, tmp_path)
    port = free_port()
    server = start_server(tmp_path, config, {"min_clients": 1}, port=port)
    clients = [in_process_client(server, tmp_path, cid, files[cid], token)
               for cid, token in zip(CLIENTS, tokens, strict=False)]
    for client in clients:
        client.register()
    first, second, late = (client.train(pull_instruction(client, 1)) for client in clients)
    assert clients[0].push(first) and clients[1].push(second)  # round 1 closes
    assert clients[2].push(late)  # into round 2's buffer, one round stale
    held = clients[0].train(pull_instruction(clients[0], 2))
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    server = start_server(tmp_path, config, {"min_clients": 1}, resume=True, port=port)
    assert clients[0].push(held)  # handed out before the crash, taken after it; round 2 closes
    threads = [threading.Thread(target=client.run) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert server.wait(60) == 0, server.output()[-3000:]
    assert "round 2 continues with 1 buffered update(s)" in server.output()
    rows = server.metrics()
    assert [(row["round"], row["clients"]) for row in rows] == [(0, 0), (1, 2), (2, 2), (3, 2)]
    assert rows[2]["staleness_max"] == 1.0  # the replayed stale update was aggregated, with its weight


def test_clients_that_spend_their_privacy_budget_retire_and_the_server_ends_the_run(tmp_path: Path):
    """Sample-level DP over gRPC: with a budget worth one round, every device retires when round 2
    arrives, and the server ends the run once every enrolled client has left, as fedsim does."""
    config = run_config("ffa_lora", rounds=4)
    files = write_partitions(config, tmp_path)
    steps, batch, z, delta = config["train"]["local_steps"], config["train"]["batch_size"], 1.0, 1e-5
    rates = [batch / len(path.read_text().splitlines()) for path in files.values()]
    one_round = max(epsilon_of([(z, rate, steps)], delta) for rate in rates)
    two_rounds = min(epsilon_of([(z, rate, 2 * steps)], delta) for rate in rates)
    assert one_round < two_rounds
    config["dp"] = {"level": "sample", "clipping_norm": 1.0, "noise_multiplier": z, "delta": delta,
                    "epsilon": (one_round + two_rounds) / 2, "noise_seed": 7}
    tokens = init_run(tmp_path / "run", len(CLIENTS))
    server = start_server(tmp_path, config, {"min_clients": 3, "linger_s": 0})
    clients = [start_client(server, tmp_path, cid, files[cid], token)
               for cid, token in zip(CLIENTS, tokens, strict=False)]
    finish(clients, tmp_path)
    assert server.wait(60) == 0, server.output()[-3000:]
    assert "every enrolled client has left (e.g. retired: " in server.output()
    assert [(row["round"], row["clients"]) for row in server.metrics()] == [(0, 0), (1, 3), (2, 0)]
    assert server.metrics()[1]["epsilon"] <= config["dp"]["epsilon"]
    assert all("retired" in (tmp_path / f"{cid}.log").read_text() for cid in CLIENTS)


# -- security and bad input -------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory) -> Iterator[tuple[Server, list[str], dict[str, Path], Path]]:
    """A TLS server with small limits for one round between a good CLI client and a test-driven one."""
    tmp = tmp_path_factory.mktemp("guarded")
    config = run_config("fedavg_lora", rounds=1)
    tokens = init_run(tmp / "run", 4)
    files = write_partitions(config, tmp)
    server = start_server(tmp, config, {"min_clients": 2, "linger_s": 60.0}, limits={
        "chunk_bytes": 16 * 1024, "max_message_bytes": 256 * 1024, "max_update_bytes": MiB})
    yield server, tokens, files, tmp
    if server.process.poll() is None:
        server.process.kill()


def test_tls_needs_the_runs_ca_and_a_valid_token(guarded_server, tmp_path: Path):
    server, tokens, files, _ = guarded_server
    other_ca = tmp_path / "other"
    init_run(other_ca, 0)
    wrong_ca = in_process_client(server, tmp_path, "x", files["client-000"], tokens[3],
                                 ca=other_ca / "tls" / "ca.pem")
    with pytest.raises(FatalError, match="TLS handshake .* failed"):
        wrong_ca.register()
    for token, refusal in ((None, "UNAUTHENTICATED: missing metadata `authorization: Bearer"),
                           ("not-a-token", "UNAUTHENTICATED: unknown enrollment token")):
        client = in_process_client(server, tmp_path, "x", files["client-000"], token)
        with pytest.raises(FatalError, match=refusal):
            client.register()
    plaintext = in_process_client(server, tmp_path, "x", files["client-000"], tokens[3], insecure=True, ca=None,
                                  give_up_after_s=2.0)
    with pytest.raises(FatalError):
        plaintext.register()
    assert stored(server.run_dir, RunStore.clients) == []  # none of them got in


def test_each_bad_input_gets_its_status_and_the_round_goes_on(guarded_server):
    server, tokens, files, tmp = guarded_server
    good = start_client(server, tmp, "client-good", files["client-000"], tokens[0])
    mallory = in_process_client(server, tmp, "mallory", files["client-001"], tokens[1])
    mallory.register()
    instruction = pull_instruction(mallory, 1)
    channel = grpc.secure_channel(server.address, grpc.ssl_channel_credentials(
        (server.run_dir / "tls" / "ca.pem").read_bytes()))
    stub = FederationStub(channel)
    auth = (("authorization", f"Bearer {tokens[1]}"),)
    valid = ClientUpdate(client_id="mallory", round=1, num_examples=10, tensors=instruction.tensors)
    first = next(iter(valid.tensors))

    def push(update: ClientUpdate | None = None, messages: list | None = None, token_auth=auth):
        stream = messages if messages is not None else list(update_messages(update, 16 * 1024))
        return stub.PushUpdate(iter(stream), metadata=token_auth, timeout=30)

    def refused(code: grpc.StatusCode, pattern: str, call) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == code, caught.value.details()
        assert __import__("re").search(pattern, caught.value.details()), caught.value.details()

    def changed(**tensors) -> ClientUpdate:
        return valid.model_copy(update={"tensors": {**valid.tensors, **tensors}})

    whole = list(update_messages(valid, 16 * 1024))
    damaged = [*whole]
    damaged[1] = pb.UpdateMessage(data=bytes([damaged[1].data[0] ^ 1]) + damaged[1].data[1:])
    raw_heartbeat = channel.unary_unary("/fedtune.v1.Federation/Heartbeat", request_serializer=None,
                                        response_deserializer=pb.HeartbeatReply.FromString)
    oversize = pb.ClientUpdate(client_id="mallory", round=1, num_examples=1,
                               tensors=[header_tensor("huge", torch.zeros(512 * 1024))])
    cases = [
        (grpc.StatusCode.INVALID_ARGUMENT, r"HeartbeatRequest: not a valid protobuf",
         lambda: raw_heartbeat(b"\xff\xff\xff", metadata=auth, timeout=10)),
        (grpc.StatusCode.UNAUTHENTICATED, "unknown enrollment token",
         lambda: push(valid, token_auth=(("authorization", "Bearer forged"),))),
        (grpc.StatusCode.NOT_FOUND, "no client is registered with this token",
         lambda: stub.Heartbeat(pb.HeartbeatRequest(), metadata=(("authorization", f"Bearer {tokens[2]}"),))),
        (grpc.StatusCode.FAILED_PRECONDITION, "RegisterRequest.protocol_version: 2 is not supported",
         lambda: stub.Register(pb.RegisterRequest(protocol_version=2), metadata=auth)),
        (grpc.StatusCode.FAILED_PRECONDITION, r"ClientUpdate.round: 2 is not the current round 1",
         lambda: push(valid.model_copy(update={"round": 2}))),
        (grpc.StatusCode.PERMISSION_DENIED, r"ClientUpdate.client_id: 'client-good' is not this client's id",
         lambda: push(valid.model_copy(update={"client_id": "client-good"}))),
        (grpc.StatusCode.INVALID_ARGUMENT, r"missing tensor\(s\) \['" + first.replace(".", r"\."),
         lambda: push(valid.model_copy(update={"tensors": {k: v for k, v in valid.tensors.items() if k != first}}))),
        (grpc.StatusCode.INVALID_ARGUMENT, r"unexpected tensor\(s\) \['bogus'\]",
         lambda: push(changed(bogus=torch.ones(1)))),
        (grpc.StatusCode.INVALID_ARGUMENT, rf"tensor '{first}' has shape \(5, 5\)",
         lambda: push(changed(**{first: torch.ones(5, 5)}))),
        (grpc.StatusCode.INVALID_ARGUMENT, rf"tensor '{first}' has dtype torch.float64",
         lambda: push(changed(**{first: valid.tensors[first].double()}))),
        (grpc.StatusCode.INVALID_ARGUMENT, rf"tensor '{first}' holds NaN or Inf",
         lambda: push(changed(**{first: torch.full_like(valid.tensors[first], math.nan)}))),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, r"over the limit max_update_bytes=1048576",
         lambda: push(messages=[pb.UpdateMessage(header=oversize)])),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, r"chunk of 32768 bytes is over the limit chunk_bytes=16384",
         lambda: push(messages=list(update_messages(valid, 32 * 1024)))),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, r"larger than max",
         lambda: push(messages=[whole[0], pb.UpdateMessage(data=b"\0" * 300 * 1024)])),
        (grpc.StatusCode.DATA_LOSS, r"truncated: it ended after \d+ of \d+ payload bytes",
         lambda: push(messages=whole[:-2])),
        (grpc.StatusCode.DATA_LOSS, r"sha256: the payload's digest .* does not match", lambda: push(messages=damaged)),
        (grpc.StatusCode.INVALID_ARGUMENT, r"first message must be `header`, got `data`",
         lambda: push(messages=whole[1:])),
    ]
    for code, pattern, call in cases:
        refused(code, pattern, call)
    assert push(valid).payload_bytes == sum(t.numel() * t.element_size() for t in valid.tensors.values())
    refused(grpc.StatusCode.ALREADY_EXISTS, "an update from 'mallory' for round 1 was already accepted",
            lambda: push(valid))
    assert mallory.run() == "all 1 rounds completed"
    finish([good], tmp)
    assert server.wait(90) == 0, server.output()[-3000:]
    [_, round_one] = server.metrics()
    # mallory's bad updates were refused, then its valid one accepted: it counts as a client, not as rejected
    assert (round_one["clients"], round_one["rejected"], round_one["stragglers"]) == (2, 0, 0)
    channel.close()


# -- large updates ----------------------------------------------------------------------------


def test_a_64_mib_update_streams_in_chunks_and_arrives_bit_identical(tmp_path: Path):
    config = run_config("fedavg_lora", rounds=1, options={"rank": 7711})  # 2176 floats per rank: 64.0 MiB
    tokens = init_run(tmp_path / "run", 1)
    files = write_partitions(config, tmp_path)
    server = start_server(tmp_path, config, {"min_clients": 1, "insecure": True})
    client = in_process_client(server, tmp_path, "client-000", files["client-000"], tokens[0])
    client.register()
    instruction = pull_instruction(client, 1)
    initial = client.workspace.get_tensors(client.workspace.wire_names)
    assert all(torch.equal(instruction.tensors[name], initial[name]) for name in initial)  # downlink intact too
    generator = torch.Generator().manual_seed(1)
    tensors = {name: torch.randn(t.shape, generator=generator) for name, t in instruction.tensors.items()}
    update = ClientUpdate(client_id=client.client_id, round=1, num_examples=3, tensors=tensors)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    chunks = list(update_messages(update, client.limits.chunk_bytes))
    assert payload >= 64 * MiB and len(chunks) - 2 == math.ceil(payload / client.limits.chunk_bytes) >= 32
    del chunks
    assert client.push(update)
    assert client.run() == "all 1 rounds completed"
    assert server.wait(120) == 0, server.output()[-3000:]
    saved = server.global_model()
    assert sorted(saved) == sorted(tensors)
    digest = lambda ts: hashlib.sha256(b"".join(ts[n].numpy().tobytes() for n in sorted(ts))).hexdigest()  # noqa: E731
    assert digest(saved) == digest(tensors)
    assert server.metrics()[1]["bytes_up"] > payload
