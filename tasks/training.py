"""The local optimisation loop shared by the gradient-based strategies."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from fedtune.tasks.config import TrainConfig


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimizer, as the reference frameworks build every round (moments reset)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def train_steps(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterable[dict[str, torch.Tensor]],
    config: TrainConfig,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """Run one optimizer step per batch and return the mean task loss.

    `extra_loss` adds a regulariser (e.g. ADMM's proximal term) to each step's objective;
    `optimizer` lets a caller pass a wrapped one (opacus DP-SGD).
    """
    optimizer = optimizer or make_optimizer(params, config)
    model.train()
    losses: list[float] = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        objective = loss + extra_loss() if extra_loss is not None else loss
        objective.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses) / max(len(losses), 1)
