"""Test helpers: tiny seeded configs that run in seconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedtune.fedclient.client import ClientSettings, FederatedClient
from fedtune.fedclient.connection import ConnectionSettings
from fedtune.simulations.config import SimulationConfig


def tiny_config(**overrides: Any) -> SimulationConfig:
    """The built-in task on the tiny model, cut down to a few steps; override any top-level field."""
    base: dict[str, Any] = {
        "strategy": "fedavg_lora",
        "rounds": 2,
        "seed": 0,
        "model": {"path": "builtin:tiny-llama", "kind": "causal_lm", "max_length": 32},
        "data": {"train": "builtin:ops", "max_train_examples": 400, "max_eval_examples": 64},
        "train": {"local_steps": 3, "batch_size": 8, "learning_rate": 3e-3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return SimulationConfig.model_validate(base)


def unconnected_client(tmp_path: Path, data: Path, device: str | None = None) -> FederatedClient:
    """A fedclient for a server that is never called: enough to build its workspace from a run spec."""
    connection = ConnectionSettings(server="127.0.0.1:9", token=None, ca=None, insecure=True,
                                    max_message_bytes=1 << 20, give_up_after_s=1.0, max_backoff_s=1.0)
    return FederatedClient(ClientSettings(connection=connection, data=data, state_file=tmp_path / "state.pt",
                                          device=device))


def run_outputs(out: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """A finished fedsim run's global adapter and metric rows, wall time left out (the one value that differs)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return load_file(out / "global" / "adapter_model.safetensors"), rows


def assert_same_outputs(got: Path, want: Path) -> None:
    """Two run directories hold the same global adapter, bit for bit, and the same metrics."""
    (got_tensors, got_rows), (want_tensors, want_rows) = run_outputs(got), run_outputs(want)
    assert got_tensors.keys() == want_tensors.keys() and got_tensors
    for name in want_tensors:
        assert torch.equal(got_tensors[name], want_tensors[name]), name
    assert got_rows == want_rows
