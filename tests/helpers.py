"""Test helpers: tiny seeded configs that run in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
