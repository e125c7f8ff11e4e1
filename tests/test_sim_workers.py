"""fedsim `workers = N`: forked workers give the same run as the in-process loop, and fail loudly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.simulations.config import ConfigError, load_config
from fedtune.simulations.runner import build_federation, run_simulation
from fedtune.simulations.workers import WorkerError, WorkerPool
from fedtune.strategies.fedavg_lora import FedAvgLoraClient
from tests.helpers import tiny_config


def run_outputs(tmp_path, workers: int, **overrides) -> tuple[dict[str, torch.Tensor], list[dict]]:
    out = tmp_path / f"workers-{workers}"
    run_simulation(tiny_config(workers=workers, **overrides), out, show_progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds", None)  # wall time is the only thing allowed to differ
    return load_file(out / "global" / "adapter_model.safetensors"), rows


def assert_same_run(first, second) -> None:
    (tensors_a, rows_a), (tensors_b, rows_b) = first, second
    assert tensors_a.keys() == tensors_b.keys() and tensors_a
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
    assert rows_a == rows_b


def test_two_workers_give_the_same_global_adapter_and_metrics(tmp_path):
    overrides = {"partition": {"scheme": "iid", "num_clients": 5}}
    in_process = run_outputs(tmp_path, 1, **overrides)
    forked = run_outputs(tmp_path, 2, **overrides)
    assert_same_run(in_process, forked)
    assert [row["clients"] for row in forked[1]] == [0, 5, 5]


def test_per_client_state_stays_with_its_worker(tmp_path):
    """Noise-robust ADMM keeps per-client local models and duals across rounds, and with
    continual updates even unsampled clients change theirs in `idle`: any client whose state
    went to a different process, or was lost, would change the global adapter."""
    overrides = {
        "strategy": "admm", "rounds": 3,
        "options": {"clients_per_round": 2, "continual": True},
        "partition": {"scheme": "iid", "num_clients": 4},
    }
    assert_same_run(run_outputs(tmp_path, 1, **overrides), run_outputs(tmp_path, 3, **overrides))


def test_clients_are_pinned_round_robin():
    federation = build_federation(tiny_config(partition={"scheme": "iid", "num_clients": 5}))
    with WorkerPool(federation.clients, federation.workspace, federation.data.clients, 2) as pool:
        assert pool.owner == {"client-000": 0, "client-001": 1, "client-002": 0, "client-003": 1, "client-004": 0}


def test_a_failing_client_stops_the_run_with_the_workers_traceback(monkeypatch):
    def broken_fit(self, workspace, instruction, data):
        raise RuntimeError(f"injected fault in {self.client_id}")

    monkeypatch.setattr(FedAvgLoraClient, "fit", broken_fit)
    federation = build_federation(tiny_config())
    instructions = {cid: federation.server.instruction(1, cid) for cid in federation.clients}
    pool = WorkerPool(federation.clients, federation.workspace, federation.data.clients, 2)
    with pool, pytest.raises(WorkerError, match=r"worker 0 failed in round 1:(.|\n)*injected fault in client-000"):
        pool.run(1, instructions)
    assert not any(process.is_alive() for process in pool._processes)


def test_workers_must_be_positive(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("workers = 0\n")
    with pytest.raises(ConfigError, match="workers"):
        load_config(path)
