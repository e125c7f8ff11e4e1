"""A fedtune strategy that lives outside the fedtune repo: FedAvg-LoRA's client half, with the
server aggregating each adapter coordinate by its median across clients (Yin et al. 2018) instead
of the weighted mean, which bounds the influence of a few outlier or faulty clients.

It is found through the `fedtune.strategies` entry point declared in this package's pyproject.toml.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.strategies.api import ClientUpdate, StrategyDefinition
from fedtune.strategies.fedavg_lora import FedAvgLoraClient, FedAvgLoraConfig, FedAvgLoraServer, build_workspace


class MedianLoraServer(FedAvgLoraServer):
    """Coordinate-wise median of the client adapters; sample counts are ignored by design."""

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        ordered = sorted(updates, key=lambda update: update.client_id)
        self.global_tensors = {
            name: torch.stack([update.tensors[name] for update in ordered]).median(dim=0).values
            for name in self.global_tensors
        }


DEFINITION = StrategyDefinition(
    name="fedmedian_lora",
    config=FedAvgLoraConfig,
    server=MedianLoraServer,
    client=FedAvgLoraClient,
    build_workspace=build_workspace,
    summary="LoRA with coordinate-wise median aggregation (example plug-in).",
)
