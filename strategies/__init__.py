"""Aggregation strategies: each module holds both halves of one algorithm. See `fedtune.strategies.api`."""

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
