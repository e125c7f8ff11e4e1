"""FFA-LoRA (Sun et al., ICLR 2024, arXiv:2403.12313): LoRA with A frozen and shared, only B trained.

A is drawn once from the run seed with a device-independent CPU generator (see
`LoraWorkspace._seed_lora_a`), identical on the server and every client and never updated; only B
(+ the head) is trained, sent and averaged. Because A is shared, the mean of the clients' B gives
exactly the mean of their s·B·A (docs/algorithms.md §2.2), and the traffic is half of LoRA's for square
modules. Every instruction carries the SHA-256 of A so a client with a different A refuses to train.

Devices of different capacity (`options.capacity`, strategies/lora_shapes.py): client k trains B's first
r_k columns against the first r_k rows of the same frozen A (and only the layers within its depth).
Its B zero-padded to r gives exactly its s·B_k·A_{:r_k}, so the padded mean is still the exact mean of
the clients' updates; the digest it is sent covers the A of its own shape.
"""

from __future__ import annotations

from fedtune.strategies.api import (
    Instruction,
    InvalidInstruction,
    RunContext,
    StrategyDefinition,
    TensorMap,
)
from fedtune.strategies.lora_shapes import (
    HeterogeneousLoraClient,
    HeterogeneousLoraConfig,
    HeterogeneousLoraServer,
    shape_of,
)
from fedtune.strategies.peft_lora import AdapterShape, LoraWorkspace, is_lora_a, tensor_digest, truncate
from fedtune.strategies.registry import register
from fedtune.tasks.models import ModelBundle

A_DIGEST = "lora_A_sha256"


class FfaLoraConfig(HeterogeneousLoraConfig):
    """Same knobs as LoRA, and the capacity policy; alpha only rescales the learning rate here (§2.2)."""


def frozen_names(workspace: LoraWorkspace) -> list[str]:
    return [name for name in workspace.wire_names if is_lora_a(name)]


class FfaLoraServer(HeterogeneousLoraServer):
    """FedAvg over B (+ head), zero-padded across ranks; A never travels after the shared seed."""

    frozen_a: TensorMap
    REPLY_DOC = ("the LoRA B matrices (and a classifier head if any) after local training with every A frozen at its "
                 "seeded initialisation; A never travels")

    def wire_names(self, workspace: LoraWorkspace) -> list[str]:
        return [name for name in workspace.wire_names if not is_lora_a(name)]

    def initialize(self, workspace: LoraWorkspace) -> None:
        super().initialize(workspace)
        self.frozen_a = workspace.get_tensors(frozen_names(workspace))
        self._digests: dict[AdapterShape, str] = {}

    def a_digest(self, shape: AdapterShape) -> str:
        """The digest of the frozen A an adapter of `shape` holds (the full A's first rows, its layers), made once."""
        if shape not in self._digests:
            names = [name for name in self.workspace.names_at(shape) if is_lora_a(name)]
            self._digests[shape] = tensor_digest({name: truncate(name, self.frozen_a[name], shape.rank)
                                                  for name in names})
        return self._digests[shape]

    def instruction(self, round: int, client_id: str) -> Instruction:
        instruction = super().instruction(round, client_id)
        digest = self.a_digest(self.shape(client_id))
        return instruction.model_copy(update={"settings": {**instruction.settings, A_DIGEST: digest}})


class FfaLoraClient(HeterogeneousLoraClient):
    """Checks its frozen A against the server's digest, then trains B exactly as FedAvg-LoRA."""

    def receive(self, workspace: LoraWorkspace, instruction: Instruction) -> None:
        """Refuse a global B meant for another A: B·A would be meaningless."""
        workspace.use_shape(shape_of(instruction))
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
