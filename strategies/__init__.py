"""Aggregation strategies: each module holds both halves of one algorithm. See `fedtune.strategies.api`.

The names below load on first use (PEP 562), so that importing a light module of this package
(`fedtune.strategies.catalog`, which the command-line tools' `--help` reads) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.strategies.api import (
        ClientStrategy,
        ClientUpdate,
        Instruction,
        InvalidUpdate,
        RunContext,
        ServerStrategy,
        StrategyConfig,
        StrategyDefinition,
        TensorSpec,
        Workspace,
    )
    from fedtune.strategies.registry import available_strategies, get_strategy, register

__all__ = [
    "ClientStrategy", "ClientUpdate", "Instruction", "InvalidUpdate", "RunContext", "ServerStrategy",
    "StrategyConfig", "StrategyDefinition", "TensorSpec", "Workspace", "available_strategies",
    "get_strategy", "register",
]


def __getattr__(name: str) -> Any:
    """An exported name, from the module that defines it (api, else registry), on first use."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    api = importlib.import_module("fedtune.strategies.api")
    return getattr(api if hasattr(api, name) else importlib.import_module("fedtune.strategies.registry"), name)
