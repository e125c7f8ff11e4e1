"""The run spec a server sends every client at registration (RegisterReply.run_spec_json).

It holds exactly what a client needs to build the same workspace and strategy half as the server:
the strategy and its wrapper sections, the model, the data field names, local training and seed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fedtune.strategies.api import RunContext, StrategyConfig, StrategyDefinition
from fedtune.strategies.registry import resolve, validate_run_options
from fedtune.tasks.config import DataConfig, ModelConfig, TrainConfig


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    strategy: str
    options: dict[str, Any] = Field(default_factory=dict)
    wrappers: dict[str, dict[str, Any] | None] = Field(default_factory=dict)
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    rounds: int = Field(ge=1)
    seed: int = Field(ge=0)

    def context(self) -> RunContext:
        return RunContext(seed=self.seed, rounds=self.rounds, train=self.train, model_kind=self.model.kind)

    def definition(self) -> StrategyDefinition:
        return resolve(self.strategy, self.wrappers)

    def strategy_config(self) -> StrategyConfig:
        return validate_run_options(self.strategy, self.options, self.wrappers)
