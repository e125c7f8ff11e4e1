"""The `[asynchronous]` mode: buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022).

Clients are handed the current global model whenever they are free and train at their own pace; an
update computed on the global model of round r that arrives while round R is being filled is s = R − r
rounds stale. The server buffers accepted updates and aggregates every `buffer_size` (K) of them, so a
slow device no longer holds a round back. Each stale update is rebased onto the current global model
before the wrapped strategy averages it (docs/algorithms.md §5.6):

    θ'_i = G_R + η · w(s_i) · (θ_i − G_{r_i})        w(s) = (1 + s)^(−a)   (or 1: "constant")

so the wrapped sample-weighted mean gives G_{R+1} = G_R + η Σ_i p_i w(s_i) Δ_i with Δ_i = θ_i − G_{r_i}:
FedBuff's buffered step with sample weights. With no staleness and η = 1, θ'_i = θ_i exactly, so K
fresh updates give exactly the synchronous FedAvg result. An update older than `max_staleness` is
refused (the transport says so with a STALE status); the server keeps the global model of the last
`max_staleness` + 1 rounds to rebase against, which is what the mode costs in memory.

Only strategies that declare they can (`StrategyDefinition.async_unsupported is None`) are wrapped;
the others say why at config time, naming this section. The client half is the strategy's own: a
client simply trains on the instruction it got.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedtune.strategies.api import (
    ClientUpdate,
    HoldsGlobalTensors,
    Instruction,
    InvalidUpdate,
    RunContext,
    ServerStrategy,
    StrategyDefinition,
    TensorMap,
)
from fedtune.strategies.wrappers import ServerWrapper


class Config(BaseModel):
    """The `[asynchronous]` section; its presence switches the run to buffered asynchronous rounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    buffer_size: int = Field(3, ge=1, description="K: accepted updates that make one aggregation (a 'round').")
    concurrency: int | None = Field(
        None, ge=1, description="Clients training at once; None = every available client.")
    max_staleness: int = Field(
        4, ge=0, description="Oldest accepted update, in aggregations; older ones are refused as STALE.")
    staleness_weight: Literal["polynomial", "constant"] = Field(
        "polynomial", description="w(s) = (1+s)^-staleness_exponent, or 1 for every s.")
    staleness_exponent: float = Field(0.5, ge=0, description="a in (1+s)^-a; 0.5 is FedBuff's 1/sqrt(1+s).")
    server_learning_rate: float = Field(1.0, gt=0, description="η, scaling the buffered step.")

    def weight(self, staleness: int) -> float:
        """w(s): how much an update s aggregations stale counts; w(0) = 1 for every rule."""
        if self.staleness_weight == "constant":
            return 1.0
        return float((1 + staleness) ** -self.staleness_exponent)


class FedBuffServer(ServerWrapper):
    """Keeps the recent global models, rebases stale updates onto the current one, then lets the
    wrapped strategy aggregate them as if they were fresh."""

    def __init__(self, inner: ServerStrategy, config: Config):
        super().__init__(inner)
        self.asynchronous = config
        self.current_round = 1
        self.versions: dict[int, TensorMap] = {}  # round -> the global model that round's clients start from
        self.last_staleness: list[int] = []  # of the updates in the latest aggregation

    def initialize(self, workspace: Any) -> None:
        super().initialize(workspace)
        if self.inner.shapes_differ():
            raise TypeError("[asynchronous] rebases every update on one global adapter, so it needs every client at "
                            "the full shape; this strategy's options.capacity gives clients different shapes")
        self._snapshot()

    @property
    def tensors_of(self) -> HoldsGlobalTensors:
        """The wrapped half's global tensors (a strategy that runs asynchronously promises them)."""
        if not isinstance(self.inner, HoldsGlobalTensors):
            raise TypeError(f"[asynchronous] needs a server half whose global state is tensors, not {type(self.inner)}")
        return self.inner

    def _snapshot(self) -> None:
        """Record the global model clients of `current_round` start from; forget what is too old to rebase."""
        self.versions[self.current_round] = {name: t.clone() for name, t in self.tensors_of.global_tensors.items()}
        oldest = self.current_round - self.asynchronous.max_staleness
        self.versions = {round: tensors for round, tensors in self.versions.items() if round >= oldest}

    def instruction(self, round: int, client_id: str) -> Instruction:
        """The wrapped instruction, on the global model of `round` (an earlier one when re-derived for
        an update that is still in flight, e.g. by the compression wrapper after a restart)."""
        instruction = self.inner.instruction(round, client_id)
        if round == self.current_round:
            return instruction
        return instruction.model_copy(update={"tensors": self._version(round, f"instruction for {client_id!r}")})

    def _version(self, round: int, origin: str) -> TensorMap:
        if round not in self.versions:
            raise InvalidUpdate(
                f"{origin}: round {round} is more than asynchronous.max_staleness="
                f"{self.asynchronous.max_staleness} aggregations older than the current round {self.current_round}")
        return self.versions[round]

    def staleness(self, update: ClientUpdate) -> int:
        return self.current_round - update.round

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        origin = f"update from {update.client_id!r}"
        if update.round > self.current_round:
            raise InvalidUpdate(f"{origin}: round {update.round} has not started (current round {self.current_round})")
        self._version(update.round, origin)
        self.inner.validate_update(update, update.round)

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        self.last_staleness = [self.staleness(update) for update in updates]
        self.inner.aggregate(round, [self.rebased(update) for update in updates])
        self.current_round = round + 1
        self._snapshot()

    def rebased(self, update: ClientUpdate) -> ClientUpdate:
        """θ' = G_now + η·w(s)·(θ − G_then) for each float tensor (see the module docstring)."""
        staleness = self.staleness(update)
        scale = self.asynchronous.server_learning_rate * self.asynchronous.weight(staleness)
        if staleness == 0 and scale == 1.0:
            return update  # θ' = θ: kept bit for bit, so fresh buffers equal synchronous FedAvg
        now, then = self.tensors_of.global_tensors, self._version(update.round, f"update from {update.client_id!r}")
        tensors = {}
        for name, tensor in update.tensors.items():
            if not tensor.is_floating_point():
                tensors[name] = tensor
                continue
            step = (tensor.to(torch.float64) - then[name].to(torch.float64)) * scale
            tensors[name] = (now[name].to(torch.float64) + step).to(tensor.dtype)
        return update.model_copy(update={"tensors": tensors})

    def round_metrics(self) -> dict[str, float]:
        staleness = self.last_staleness or [0]
        return {**super().round_metrics(), "staleness_mean": sum(staleness) / len(staleness),
                "staleness_max": float(max(staleness))}

    def state_dict(self) -> dict[str, Any]:
        versions = {round: {name: t.clone() for name, t in tensors.items()} for round, tensors in self.versions.items()}
        return {**super().state_dict(), "current_round": self.current_round, "versions": versions}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.current_round = state["current_round"]
        self.versions = {round: dict(tensors) for round, tensors in state["versions"].items()}


def wrap(definition: StrategyDefinition, config: Config) -> StrategyDefinition:
    """`definition` run asynchronously; a ValueError naming the section when the strategy cannot be."""
    if definition.async_unsupported is not None:
        raise ValueError(f"asynchronous: strategy {definition.name!r} cannot run asynchronously: "
                         f"{definition.async_unsupported}; remove the [asynchronous] section")

    def server(strategy_config: Any, context: RunContext) -> FedBuffServer:
        return FedBuffServer(definition.server(strategy_config, context), config)

    return replace(definition, server=server, asynchronous=True,
                   summary=f"{definition.summary} Asynchronous: every {config.buffer_size} updates aggregated "
                           f"(FedBuff).")
