"""FedAvg over peft LoRA adapters (FedIT, arXiv:2305.05644): sample-weighted mean of A and B.

Server: broadcast the global adapter; new global = sum_i p_i theta_i with p_i = n_i / sum_j n_j,
each tensor separately (docs/algorithms.md §1.2). Note the mean of B and of A is not the mean of the
clients' B·A products (§1.3); FFA-LoRA removes that discordance.
Client: load the global adapter, run `train.local_steps` steps with a fresh optimizer (moments
reset every round, as the reference frameworks do), upload every adapter (+ head) tensor. The local
loop is a declared seam (`TrainsLocally`): sample-level DP puts opacus DP-SGD there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedtune.strategies.api import (
    ClientStrategy,
    ClientUpdate,
    Instruction,
    LocalTrainer,
    RunContext,
    ServerStrategy,
    StrategyDefinition,
    TensorMap,
    TensorSpec,
    weighted_mean,
)
from fedtune.strategies.peft_lora import LoraOptions, LoraWorkspace
from fedtune.strategies.registry import register
from fedtune.tasks.data import TokenDataset
from fedtune.tasks.models import ModelBundle
from fedtune.tasks.training import train_steps


class FedAvgLoraConfig(LoraOptions):
    """FedAvg over LoRA: only the LoRA hyperparameters and client sampling."""


class FedAvgLoraServer(ServerStrategy[FedAvgLoraConfig, LoraWorkspace]):
    """Holds the global adapter; aggregation is the sample-weighted mean in client-id order."""

    global_tensors: TensorMap

    def wire_names(self, workspace: LoraWorkspace) -> list[str]:
        return workspace.wire_names

    def initialize(self, workspace: LoraWorkspace) -> None:
        self.global_tensors = workspace.get_tensors(self.wire_names(workspace))

    def instruction(self, round: int, client_id: str) -> Instruction:
        return Instruction(round=round, tensors=self.global_tensors)

    def update_specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec.like(tensor) for name, tensor in self.global_tensors.items()}

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        ordered = sorted(updates, key=lambda update: update.client_id)
        weights = [update.num_examples for update in ordered]
        self.global_tensors = {
            name: weighted_mean([update.tensors[name] for update in ordered], weights)
            for name in self.global_tensors
        }

    def load_global_into(self, workspace: LoraWorkspace) -> None:
        workspace.set_tensors(self.global_tensors)

    def state_dict(self) -> dict[str, Any]:
        return {"global_tensors": {name: t.clone() for name, t in self.global_tensors.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_tensors = {name: t.clone() for name, t in state["global_tensors"].items()}


class FedAvgLoraClient(ClientStrategy[FedAvgLoraConfig, LoraWorkspace]):
    """Loads the instruction's tensors, trains exactly those, and sends them back (`TrainsLocally`)."""

    local_trainer: LocalTrainer | None = None
    """Replaces the plain local loop when set, through `use_local_trainer`."""

    def use_local_trainer(self, trainer: LocalTrainer) -> None:
        self.local_trainer = trainer

    def fit(self, workspace: LoraWorkspace, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        workspace.set_tensors(instruction.tensors)
        names = list(instruction.tensors)
        train, round = self.context.train, instruction.round
        params = workspace.parameters_for(names)
        with self.seeded(round):
            if self.local_trainer is not None:
                loss = self.local_trainer(workspace.model, params, data, round)
            else:
                batches = data.train_batches(train.local_steps, train.batch_size, self.batch_generator(round))
                loss = train_steps(workspace.model, params, batches, train)
        return ClientUpdate(
            client_id=self.client_id,
            round=instruction.round,
            num_examples=len(data),
            tensors=workspace.get_tensors(names),
            metrics={"train_loss": loss},
        )


def build_workspace(bundle: ModelBundle, config: FedAvgLoraConfig, context: RunContext) -> LoraWorkspace:
    return LoraWorkspace(bundle, config, context, freeze_a=False)


DEFINITION = register(
    StrategyDefinition(
        name="fedavg_lora",
        config=FedAvgLoraConfig,
        server=FedAvgLoraServer,
        client=FedAvgLoraClient,
        build_workspace=build_workspace,
        summary="FedAvg over peft LoRA adapters, sample-weighted.",
    )
)
