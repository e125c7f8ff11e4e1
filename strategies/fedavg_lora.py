"""FedAvg over peft LoRA adapters (FedIT, arXiv:2305.05644): sample-weighted mean of A and B.

Server: broadcast the global adapter; new global = sum_i p_i theta_i with p_i = n_i / sum_j n_j,
each tensor separately (docs/algorithms.md §1.2). Note the mean of B and of A is not the mean of the
clients' B·A products (§1.3); FFA-LoRA removes that discordance.
fedtune's option `step_normalization = "fednova"` (FedNova, Wang et al., NeurIPS 2020,
arXiv:2007.07481) is for unequal local work (local epochs over unequal data, time budgets): new global
= global + tau_eff sum_i p_i (theta_i - global) / tau_i with tau_eff = sum_i p_i tau_i, tau_i the
client's reported `local_steps`; the weights p_i stay sample counts, and equal tau_i give plain FedAvg.
Client: load the global adapter, run the round's local work (`train.local_steps` or `local_epochs`,
cut short by `max_local_seconds`) with a fresh optimizer (moments reset every round, as the reference
frameworks do), upload every adapter (+ head) tensor and report the steps taken. The local loop is a
declared seam (`TrainsLocally`): sample-level DP puts opacus DP-SGD there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from fedtune.strategies.api import (
    ClientStrategy,
    ClientUpdate,
    Instruction,
    InvalidUpdate,
    LocalTrainer,
    ReplyValues,
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
from fedtune.tasks.training import LOCAL_STEPS, RunPosition, local_batches, train_steps


class FedAvgLoraConfig(LoraOptions):
    """FedAvg over LoRA: the LoRA hyperparameters, client sampling and how unequal local work is combined."""

    step_normalization: Literal["none", "fednova"] = Field(
        "none", description="fednova: normalise each client's change by its reported local steps (FedNova)."
    )


def fednova_mean(
    current: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], steps: Sequence[float]
) -> torch.Tensor:
    """FedNova's step-normalised average (Wang et al. 2020): current + tau_eff sum_i p_i (theta_i - current) / tau_i.

    p_i = w_i / sum_j w_j and tau_eff = sum_i p_i tau_i, so a client that ran more steps does not pull the
    model further just for that, while the step size stays that of the average client. Accumulated in
    float64 in the given order, like `weighted_mean`, and returned in the current tensor's dtype.
    """
    total = float(sum(weights))
    shares = [weight / total for weight in weights]
    effective_steps = sum(share * tau for share, tau in zip(shares, steps, strict=True))
    base = current.to(torch.float64)
    accumulator = torch.zeros(current.shape, dtype=torch.float64)
    for tensor, share, tau in zip(tensors, shares, steps, strict=True):
        accumulator += (tensor.to(torch.float64) - base) * (share / tau)
    return (base + effective_steps * accumulator).to(current.dtype)


class FedAvgLoraServer(ServerStrategy[FedAvgLoraConfig, LoraWorkspace]):
    """Holds the global adapter; aggregation is the sample-weighted mean in client-id order (or, with
    `step_normalization = "fednova"`, FedNova's step-normalised one, still weighted by sample counts)."""

    global_tensors: TensorMap
    REPLY_VALUES = ReplyValues.TRAINED
    REPLY_DOC = ("the adapter (LoRA A and B matrices, and a classifier head if any) after local training from the "
                 "received one; metric local_steps: the optimizer steps taken")

    def wire_names(self, workspace: LoraWorkspace) -> list[str]:
        return workspace.wire_names

    def initialize(self, workspace: LoraWorkspace) -> None:
        self.global_tensors = workspace.get_tensors(self.wire_names(workspace))

    def instruction(self, round: int, client_id: str) -> Instruction:
        return Instruction(round=round, tensors=self.global_tensors)

    def update_specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec.like(tensor) for name, tensor in self.global_tensors.items()}

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        super().validate_update(update, round)
        steps = update.metrics.get(LOCAL_STEPS)
        if self.config.step_normalization == "fednova" and (steps is None or steps < 1 or steps != int(steps)):
            raise InvalidUpdate(
                f"update from {update.client_id!r}: metric {LOCAL_STEPS!r} must be a positive whole number under "
                f"options.step_normalization = 'fednova', got {steps}"
            )

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        ordered = sorted(updates, key=lambda update: update.client_id)
        weights = [update.num_examples for update in ordered]
        fednova = self.config.step_normalization == "fednova"
        steps = [update.metrics[LOCAL_STEPS] for update in ordered] if fednova else []
        self.global_tensors = {
            name: fednova_mean(current, [update.tensors[name] for update in ordered], weights, steps)
            if fednova
            else weighted_mean([update.tensors[name] for update in ordered], weights)
            for name, current in self.global_tensors.items()
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
    """Replaces the plain local loop when set, through `use_local_trainer`; it returns only the loss, so
    the wrapper that installs it reports the `local_steps` metric (sample-level DP does)."""

    def use_local_trainer(self, trainer: LocalTrainer) -> None:
        self.local_trainer = trainer

    def receive(self, workspace: LoraWorkspace, instruction: Instruction) -> None:
        workspace.set_tensors(instruction.tensors)

    def fit(self, workspace: LoraWorkspace, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        self.receive(workspace, instruction)
        names = list(instruction.tensors)
        train, round = self.context.train, instruction.round
        params = workspace.parameters_for(names)
        with self.seeded(round):
            if self.local_trainer is not None:
                metrics = {"train_loss": self.local_trainer(workspace.model, params, data, round)}
            else:
                batches = local_batches(data, train, self.batch_generator(round))
                position = RunPosition.of(round, self.context.rounds, len(data), train)
                metrics = train_steps(workspace.model, params, batches, train, position=position).metrics()
        return ClientUpdate(
            client_id=self.client_id,
            round=instruction.round,
            num_examples=len(data),
            tensors=workspace.get_tensors(names),
            metrics=metrics,
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
        async_unsupported=None,  # a weighted mean of client adapters: stale ones can be rebased (strategies.fedbuff)
    )
)
