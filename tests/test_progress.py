"""Progress inside a round: fedsim hears of each client as its work ends, fedclient of each local step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedtune.fedclient.client import ClientSettings, FederatedClient, Reporter
from fedtune.fedclient.connection import ConnectionSettings
from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog
from fedtune.protos.runspec import RunSpec
from fedtune.simulations.runner import build_federation, run_round
from fedtune.simulations.workers import WorkerPool
from fedtune.tasks.progress import observe_steps
from tests.helpers import tiny_config

THREE_CLIENTS = {"partition": {"scheme": "iid", "num_clients": 3}}


@pytest.mark.parametrize("overrides", [
    {"strategy": "fedavg_lora"},
    {"strategy": "fedkseed", "options": {"seed_pool_size": 64}},  # its own zeroth-order loop
    {"strategy": "ffa_lora", "dp": {"level": "sample", "clipping_norm": 1.0, "noise_multiplier": 1.0}},  # opacus
], ids=lambda overrides: overrides["strategy"] + ("+dp" if "dp" in overrides else ""))
def test_each_local_loop_reports_every_step_it_takes(overrides: dict[str, Any]):
    federation = build_federation(tiny_config(**overrides))
    client_id = "client-000"
    steps: list[int] = []
    with observe_steps(steps.append):
        update = federation.clients[client_id].fit(federation.workspace, federation.server.instruction(1, client_id),
                                                   federation.data.clients[client_id])
    assert steps == [1, 2, 3] == list(range(1, int(update.metrics["local_steps"]) + 1))


class Recorder(Reporter):
    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int]] = []

    def training_step(self, round: int, steps: int, planned: int) -> None:
        self.steps.append((round, steps, planned))


def test_fedclient_reports_increasing_steps_ending_at_the_rounds_steps(tmp_path: Path):
    config = tiny_config(train={"local_epochs": 1, "local_steps": None, "batch_size": 32}, **THREE_CLIENTS)
    federation = build_federation(config)
    reporter = Recorder()
    connection = ConnectionSettings(server="localhost:1", token=None, ca=None, insecure=True,
                                    max_message_bytes=1 << 20, give_up_after_s=1.0, max_backoff_s=1.0)
    client = FederatedClient(ClientSettings(connection=connection, data=tmp_path / "unused.jsonl",
                                            state_file=tmp_path / "state.pt"), reporter)
    try:  # the client as _build leaves it, without a server
        client.spec, client.workspace = RunSpec.of(config), federation.workspace
        client.strategy, client.data = federation.clients["client-001"], federation.data.clients["client-001"]
        update = client.train(federation.server.instruction(2, "client-001"))
    finally:
        client.close()
    planned = -(-len(client.data) // 32)  # one epoch
    assert planned > 1 and update.metrics["local_steps"] == planned
    assert reporter.steps == [(2, step, planned) for step in range(1, planned + 1)]
    assert client._activity == ("training", 2, 1.0)  # what the next heartbeat tells the server


def test_fedsim_hears_of_each_client_once_as_its_work_ends(tmp_path: Path):
    federation = build_federation(tiny_config(**THREE_CLIENTS))
    engine = RoundEngine(federation.server, federation.workspace, None, 8, MetricsLog(tmp_path))
    heard: list[tuple[int, int, int]] = []
    run_round(federation, engine, 1, on_trained=lambda *progress: heard.append(progress))
    assert heard == [(1, 0, 3), (1, 1, 3), (1, 2, 3), (1, 3, 3)]


def test_forked_workers_report_each_client_as_its_work_ends():
    federation = build_federation(tiny_config(**THREE_CLIENTS))
    instructions = {cid: federation.server.instruction(1, cid) for cid in federation.clients}
    trained: list[str] = []
    with WorkerPool(federation.clients, federation.workspace, federation.data.clients, 2) as pool:
        outcomes = pool.run(1, instructions, trained.append)
    assert sorted(trained) == sorted(outcomes) == sorted(federation.clients)
