"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv:2402.11505): aggregate full updates, give each device its best rank.

Server, per LoRA module (docs/algorithms.md §5.3): ΔW = Σ_k p_k·B_k·A_k over the clients that train the
module (p_k: sample shares), then ΔW = UΣVᵀ and the global factors are B = U_{:r}Σ_{:r}, A = V_{:r}ᵀ at
the run's rank r. Client k, of rank r_k (`options.capacity`, strategies/lora_shapes.py), gets those
truncated to r_k: B_k = U_{:r_k}Σ_{:r_k}, A_k = V_{:r_k}ᵀ, the best rank-r_k approximation of ΔW
(Eckart–Young), which is exact when r_k ≥ rank(ΔW). Keeping only r components loses nothing a client can
receive, since every r_k ≤ r. All shapes share the scaling s = alpha / r, so s·B_k·A_k is the update the
client's adapter applies (the paper's code divides B by α/r_k instead). The classification head, if any,
is the sample-weighted mean.
The round metric `flexlora_residual` is ||ΔW − B·A||_F / ||ΔW||_F over all modules: what the rank-r
global adapter drops of the aggregated update (0 while Σ r_k ≤ r).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from fedtune.strategies.api import ClientUpdate, ReplyValues, RunContext, StrategyDefinition
from fedtune.strategies.lora_shapes import (
    HeterogeneousLoraClient,
    HeterogeneousLoraConfig,
    HeterogeneousLoraServer,
    rank_axis,
)
from fedtune.strategies.peft_lora import LoraWorkspace, is_lora_a
from fedtune.strategies.registry import register
from fedtune.tasks.models import ModelBundle


class FlexLoraConfig(HeterogeneousLoraConfig):
    """LoRA options and the capacity policy; aggregation is always FlexLoRA's."""

    step_normalization: Literal["none"] = Field("none", description="FedNova is not defined for FlexLoRA.")


def redistribute(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, A, singular values) with B·A the best rank-`rank` approximation of `delta`: B = U_{:r}Σ_{:r},
    A = V_{:r}ᵀ (float64 SVD; zero components when `delta` has fewer than `rank`)."""
    u, sigma, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    b, a = u[:, :rank] * sigma[:rank], vh[:rank]
    missing = rank - b.shape[1]
    if missing > 0:
        b = torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)
        a = torch.cat([a, a.new_zeros(missing, a.shape[1])])
    return b, a, sigma


class FlexLoraServer(HeterogeneousLoraServer):
    """Sums the clients' B_k·A_k per module and keeps the SVD's leading factors as the global adapter."""

    config: FlexLoraConfig
    REPLY_VALUES = ReplyValues.TRAINED
    REPLY_DOC = ("the adapter truncated to this client's shape (settings lora.rank, lora.depth) after local training "
                 "from the received one; metric local_steps")
    residual: float | None = None

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        ordered = sorted(updates, key=lambda update: update.client_id)
        self.combine(ordered, per_slice=False, include=lambda name: rank_axis(name) is None)  # the head: a mean
        dropped = total = 0.0
        for a_name in [name for name in self.global_tensors if is_lora_a(name)]:
            b_name = a_name.replace(".lora_A.", ".lora_B.")
            holders = [update for update in ordered if a_name in update.tensors]
            if not holders:
                continue
            samples = float(sum(update.num_examples for update in holders))
            delta = torch.zeros(self.global_tensors[b_name].shape[0], self.global_tensors[a_name].shape[1],
                                dtype=torch.float64)
            for update in holders:
                delta += (update.num_examples / samples) * (
                    update.tensors[b_name].to(torch.float64) @ update.tensors[a_name].to(torch.float64))
            b, a, sigma = redistribute(delta, self.config.rank)
            self.global_tensors[b_name] = b.to(self.global_tensors[b_name].dtype)
            self.global_tensors[a_name] = a.to(self.global_tensors[a_name].dtype)
            dropped += float(sigma[self.config.rank:].square().sum())
            total += float(sigma.square().sum())
        self.residual = (dropped / total) ** 0.5 if total > 0 else 0.0

    def round_metrics(self) -> dict[str, float]:
        residual = {} if self.residual is None else {"flexlora_residual": self.residual}
        return {**super().round_metrics(), **residual}


def build_workspace(bundle: ModelBundle, config: FlexLoraConfig, context: RunContext) -> LoraWorkspace:
    return LoraWorkspace(bundle, config, context, freeze_a=False)


DEFINITION = register(
    StrategyDefinition(
        name="flexlora",
        config=FlexLoraConfig,
        server=FlexLoraServer,
        client=HeterogeneousLoraClient,
        build_workspace=build_workspace,
        summary="FlexLoRA: per-device LoRA ranks (options.capacity); the clients' products are summed and each "
                "client gets the SVD's best factors of its rank.",
        async_unsupported="clients train adapters of different shapes, which FedBuff cannot rebase on one global "
                          "adapter",
    )
)
