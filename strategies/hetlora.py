"""HetLoRA (Cho et al., EMNLP 2024, arXiv:2401.06432): LoRA of a different rank on each device.

Server: client k gets the global rank-r adapter truncated to its rank r_k (the first r_k rows of A and
columns of B; its shape comes from `options.capacity`, strategies/lora_shapes.py). Its reply is
zero-padded back to r, which leaves B·A unchanged, and the padded factors are averaged
(docs/algorithms.md §5.3):
- `aggregation = "zero_pad"`: HetLoRA's mean over every client that holds the tensor; the components
  above a client's rank count as zeros, so only high-rank clients pull the tail (and dilute it).
- `aggregation = "rank_sliced"`: each rank component is averaged only over the clients that train it
  (rank-partitioned averaging), so the tail is not shrunk towards zero by the low-rank clients.
- `weighting = "norm"`: HetLoRA's sparsity-weighted aggregation, each module's factors weighted by the
  Frobenius norm of that client's B_k·A_k (the classification head keeps sample weights); "samples":
  by local example counts, as FedAvg.
Layers outside a client's depth are averaged over the clients that train them (LEGEND's per-layer rule).
Client (`self_prune`): after local training, a client whose trailing components carry less than
`prune_threshold` of its adapter's norm (the components above floor(decay · r_k), summed over modules)
reports a smaller rank in the metric `lora_rank`, and trains that rank from the next round on. This is
fedtune's reading of HetLoRA's rank self-pruning (decay factor, magnitude test); the paper's exact test
is not reproduced here.
With every client at the full rank, `zero_pad` with sample weights is fedavg_lora, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from fedtune.strategies.api import (
    ClientUpdate,
    Instruction,
    InvalidUpdate,
    ReplyValues,
    RunContext,
    StrategyDefinition,
)
from fedtune.strategies.lora_shapes import (
    HeterogeneousLoraClient,
    HeterogeneousLoraConfig,
    HeterogeneousLoraServer,
)
from fedtune.strategies.peft_lora import AdapterShape, LoraWorkspace, is_lora_a, is_lora_b
from fedtune.strategies.registry import register
from fedtune.tasks.data import TokenDataset
from fedtune.tasks.models import ModelBundle

PRUNED_RANK = "lora_rank"
"""Update metric under self-pruning: the rank this client trains from the next round on."""


class HetLoraConfig(HeterogeneousLoraConfig):
    """LoRA options, the capacity policy, and how replies of different ranks are combined."""

    step_normalization: Literal["none"] = Field("none", description="FedNova is not defined for HetLoRA here.")

    aggregation: Literal["zero_pad", "rank_sliced"] = Field(
        "zero_pad", description="zero_pad: HetLoRA's padded mean; rank_sliced: each component over its holders.")
    weighting: Literal["samples", "norm"] = Field(
        "samples", description="samples: by example counts; norm: by each client's ||B_k A_k||_F (HetLoRA).")
    self_prune: bool = Field(False, description="Clients shrink their rank when the tail components are small.")
    prune_decay: float = Field(0.5, gt=0, lt=1, description="A pruned rank is floor(decay · rank), at least 1.")
    prune_threshold: float = Field(0.1, gt=0, lt=1, description="Prune when the tail holds less than this share "
                                                                 "of the adapter's Frobenius norm.")


def module_of(name: str) -> str:
    return name.rsplit(".lora_", 1)[0]


def module_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """||B·A||_F of every LoRA module in `tensors` (float64)."""
    norms = {}
    for name, a in tensors.items():
        if is_lora_a(name):
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            norms[module_of(name)] = float(torch.linalg.matrix_norm(b.double() @ a.double()))
    return norms


def tail_share(tensors: dict[str, torch.Tensor], keep: int) -> float:
    """The share of the adapter's squared Frobenius norm, summed over modules, that its components from
    `keep` on carry: ||B·A − B[:, :keep]·A[:keep]||² / ||B·A||² (0 for an all-zero adapter)."""
    whole = tail = 0.0
    for name, a in tensors.items():
        if is_lora_a(name):
            b = tensors[name.replace(".lora_A.", ".lora_B.")].double()
            product = b @ a.double()
            whole += float(product.square().sum())
            tail += float((product - b[:, :keep] @ a[:keep].double()).square().sum())
    return tail / whole if whole > 0 else 0.0


class HetLoraServer(HeterogeneousLoraServer):
    """Truncates the global adapter to each client's rank and combines padded replies (module docstring)."""

    config: HetLoraConfig
    REPLY_VALUES = ReplyValues.TRAINED
    REPLY_DOC = ("the adapter truncated to this client's shape (settings lora.rank, lora.depth) after local training "
                 "from the received one; metrics local_steps, and under self-pruning lora_rank: the rank to train "
                 "from the next round on (at most lora.rank)")

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        super().validate_update(update, round)
        pruned = update.metrics.get(PRUNED_RANK)
        rank = self.shape(update.client_id).rank
        if pruned is not None and not (pruned == int(pruned) and 1 <= pruned <= rank):
            raise InvalidUpdate(f"update from {update.client_id!r}: metric {PRUNED_RANK!r} must be a whole number "
                                f"from 1 to its rank {rank}, got {pruned}")

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        norms = {update.client_id: module_norms(update.tensors) for update in updates} \
            if self.config.weighting == "norm" else {}
        module_totals: dict[str, float] = {}
        for by_module in norms.values():
            for module, norm in by_module.items():
                module_totals[module] = module_totals.get(module, 0.0) + norm

        def weight(name: str, update: ClientUpdate) -> float:
            """The module's norm under `weighting = "norm"`; the sample count for the head, and for a module
            whose every reply is all zero (no norm to weight by)."""
            module = module_of(name)
            if not norms or not (is_lora_a(name) or is_lora_b(name)) or module_totals.get(module, 0.0) == 0:
                return update.num_examples
            return norms[update.client_id][module]

        self.combine(updates, per_slice=self.config.aggregation == "rank_sliced", weight=weight)
        for update in updates:
            pruned = update.metrics.get(PRUNED_RANK)
            shape = self.shape(update.client_id)
            if pruned is not None and pruned < shape.rank:
                self.shapes[update.client_id] = AdapterShape(rank=int(pruned), depth=shape.depth)

    def shapes_differ(self) -> bool:
        return super().shapes_differ() or self.config.self_prune


class HetLoraClient(HeterogeneousLoraClient):
    """Trains the instruction's shape; under self-pruning, reports a smaller rank when its tail is small."""

    config: HetLoraConfig

    def fit(self, workspace: LoraWorkspace, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        update = super().fit(workspace, instruction, data)
        rank = workspace.active_shape.rank
        keep = max(1, math.floor(self.config.prune_decay * rank))
        if not self.config.self_prune or keep >= rank:
            return update
        if tail_share(update.tensors, keep) >= self.config.prune_threshold:
            return update
        return update.model_copy(update={"metrics": {**update.metrics, PRUNED_RANK: float(keep)}})


def build_workspace(bundle: ModelBundle, config: HetLoraConfig, context: RunContext) -> LoraWorkspace:
    return LoraWorkspace(bundle, config, context, freeze_a=False)


DEFINITION = register(
    StrategyDefinition(
        name="hetlora",
        config=HetLoraConfig,
        server=HetLoraServer,
        client=HetLoraClient,
        build_workspace=build_workspace,
        summary="HetLoRA: a LoRA rank per device (options.capacity), zero-padded or rank-sliced averaging.",
        async_unsupported="clients train adapters of different shapes, which FedBuff cannot rebase on one global "
                          "adapter",
    )
)
