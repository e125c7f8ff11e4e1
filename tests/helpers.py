"""Test helpers: tiny seeded configs that run in seconds on a CPU."""

from __future__ import annotations

from typing import Any

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

