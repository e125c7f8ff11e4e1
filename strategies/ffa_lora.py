"""FFA-LoRA (Sun et al., ICLR 2024, arXiv:2403.12313): LoRA with A frozen and shared, only B trained.

A is drawn once from the run seed with a device-independent CPU generator (see
`LoraWorkspace._seed_lora_a`), identical on the server and every client and never updated; only B
(+ the head) is trained, sent and averaged. Because A is shared, the mean of the clients' B gives
exactly the mean of their s·B·A (docs/algorithms.md §2.2), and the traffic is half of LoRA's for square
modules. Every instruction carries the SHA-256 of A so a client with a different A refuses to train.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedtune.strategies.api import (
    Instruction,
    InvalidInstruction,
    RunContext,
    StrategyDefinition,
)
from fedtune.strategies.fedavg_lora import FedAvgLoraClient, FedAvgLoraConfig, FedAvgLoraServer
from fedtune.strategies.peft_lora import LoraWorkspace, is_lora_a
from fedtune.strategies.registry import register
from fedtune.tasks.models import ModelBundle

A_DIGEST = "lora_A_sha256"


class FfaLoraConfig(FedAvgLoraConfig):
    """Same knobs as LoRA; alpha only rescales the learning rate here (docs/algorithms.md §2.2)."""


def frozen_names(workspace: LoraWorkspace) -> list[str]:
    return [name for name in workspace.wire_names if is_lora_a(name)]


class FfaLoraServer(FedAvgLoraServer):
    """FedAvg over B (+ head); A never travels after the shared seed."""

    a_digest: str
    REPLY_DOC = ("the LoRA B matrices (and a classifier head if any) after local training with every A frozen at its "
                 "seeded initialisation; A never travels")

    def wire_names(self, workspace: LoraWorkspace) -> list[str]:
        return [name for name in workspace.wire_names if not is_lora_a(name)]

    def initialize(self, workspace: LoraWorkspace) -> None:
        super().initialize(workspace)
        self.a_digest = workspace.digest(frozen_names(workspace))

    def instruction(self, round: int, client_id: str) -> Instruction:
        return Instruction(round=round, tensors=self.global_tensors, settings={A_DIGEST: self.a_digest})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), A_DIGEST: self.a_digest}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.a_digest = state[A_DIGEST]


class FfaLoraClient(FedAvgLoraClient):
    """Checks its frozen A against the server's digest, then trains B exactly as FedAvg-LoRA."""

    def receive(self, workspace: LoraWorkspace, instruction: Instruction) -> None:
        """Refuse a global B meant for another A: B·A would be meaningless."""
        local = workspace.digest(frozen_names(workspace))
        if instruction.settings.get(A_DIGEST) != local:
            raise InvalidInstruction(
                f"instruction {A_DIGEST}: the server's frozen A differs from this client's "
                "(different run seed, model or fedtune version)"
            )
        super().receive(workspace, instruction)


def build_workspace(bundle: ModelBundle, config: FfaLoraConfig, context: RunContext) -> LoraWorkspace:
    return LoraWorkspace(bundle, config, context, freeze_a=True)


DEFINITION = register(
    StrategyDefinition(
        name="ffa_lora",
        config=FfaLoraConfig,
        server=FfaLoraServer,
        client=FfaLoraClient,
        build_workspace=build_workspace,
        summary="FFA-LoRA: A frozen and shared from the run seed; only B is trained and sent.",
        async_unsupported=None,  # FedAvg over B: stale B's rebase like any tensor (A never changes)
    )
)
