"""The local optimisation loop shared by the gradient-based strategies, and how much work a round is.

Every strategy takes its round's batches from `local_batches` and its planned step count from
`planned_steps`, so none of them branches on `train.local_steps` against `train.local_epochs`; the
wall-clock budget (`train.max_local_seconds`) is enforced in the loop itself (`train_steps`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from fedtune.tasks.config import TrainConfig
from fedtune.tasks.data import TokenDataset

LOCAL_STEPS = "local_steps"
"""Update metric: the steps a client actually took this round (fewer than planned when its time budget ran out)."""

Clock = Callable[[], float]


def planned_steps(num_examples: int, train: TrainConfig) -> int:
    """The steps a round's work takes for a client holding `num_examples` examples, before any time budget:
    `local_steps`, or `local_epochs` × ⌈n / batch_size⌉ (the last partial batch is a step)."""
    if train.local_epochs is not None:
        return train.local_epochs * math.ceil(num_examples / train.batch_size)
    assert train.local_steps is not None, "TrainConfig sets local_steps whenever local_epochs is unset"
    return train.local_steps


def planned_work(num_examples: int, train: TrainConfig) -> str:
    """`planned_steps` in the user's terms, for error messages."""
    if train.local_epochs is not None:
        return (f"the {planned_steps(num_examples, train)} steps of train.local_epochs={train.local_epochs} over "
                f"{num_examples} examples at train.batch_size={train.batch_size}")
    return f"train.local_steps={train.local_steps}"


def local_batches(
    data: TokenDataset, train: TrainConfig, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """The round's batches as the config states the work: seeded epochs, or a number of steps."""
    if train.local_epochs is not None:
        return data.epoch_batches(train.local_epochs, train.batch_size, generator)
    return data.train_batches(planned_steps(len(data), train), train.batch_size, generator)


class TimeBudget:
    """A round's wall-clock budget on the device, counted from when it is made; None never runs out."""

    def __init__(self, seconds: float | None, clock: Clock = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.start = clock()

    def spent(self) -> bool:
        return self.seconds is not None and self.clock() - self.start >= self.seconds


class LocalWork(NamedTuple):
    """What a round's local loop did: the mean task loss and the steps it actually took."""

    loss: float
    steps: int

    def metrics(self) -> dict[str, float]:
        return {"train_loss": self.loss, LOCAL_STEPS: float(self.steps)}


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
    clock: Clock = time.monotonic,
) -> LocalWork:
    """Run one optimizer step per batch until the batches or `config.max_local_seconds` run out.

    The budget is checked after each step, i.e. before every step but the first, so an update always
    holds at least one step. `extra_loss` adds a regulariser (e.g. ADMM's proximal term) to each step's
    objective; `optimizer` lets a caller pass a wrapped one (opacus DP-SGD); `clock` lets a test drive time.
    """
    optimizer = optimizer or make_optimizer(params, config)
    budget = TimeBudget(config.max_local_seconds, clock)
    model.train()
    losses: list[float] = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        objective = loss + extra_loss() if extra_loss is not None else loss
        objective.backward()
        optimizer.step()
        losses.append(loss.item())
        if budget.spent():
            break
    model.eval()
    return LocalWork(loss=sum(losses) / max(len(losses), 1), steps=len(losses))
