"""The local optimisation loop shared by the gradient-based strategies, and how much work a round is.

Every strategy takes its round's batches from `local_batches` and its planned step count from
`planned_steps`, so none of them branches on `train.local_steps` against `train.local_epochs`; the
wall-clock budget (`train.max_local_seconds`), gradient accumulation, gradient clipping and the learning-rate
schedule are applied in the loop itself (`train_steps`). A step is an optimizer step: with
`train.gradient_accumulation_steps = k` it takes k batches.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from fedtune.tasks.config import TrainConfig
from fedtune.tasks.data import TokenDataset, to_model_device
from fedtune.tasks.progress import step_taken

LOCAL_STEPS = "local_steps"
"""Update metric: the steps a client actually took this round (fewer than planned when its time budget ran out)."""

Clock = Callable[[], float]


def planned_batches(num_examples: int, train: TrainConfig) -> int:
    """The batches a round's work draws for a client holding `num_examples` examples, before any time budget:
    `local_steps` × `gradient_accumulation_steps`, or `local_epochs` × ⌈n / batch_size⌉ (last partial batch kept)."""
    if train.local_epochs is not None:
        return train.local_epochs * math.ceil(num_examples / train.batch_size)
    assert train.local_steps is not None, "TrainConfig sets local_steps whenever local_epochs is unset"
    return train.local_steps * train.gradient_accumulation_steps


def planned_steps(num_examples: int, train: TrainConfig) -> int:
    """The optimizer steps a round's work takes, before any time budget: `local_steps`, or the epochs' batches in
    groups of `gradient_accumulation_steps` (a last, smaller group is a step too)."""
    if train.local_epochs is not None:
        return math.ceil(planned_batches(num_examples, train) / train.gradient_accumulation_steps)
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
    return data.train_batches(planned_batches(len(data), train), train.batch_size, generator)


def lr_factor(train: TrainConfig, step: int, total_steps: int) -> float:
    """The multiple of `train.learning_rate` that optimizer step `step` (0-based, counted over the whole run of
    `total_steps`) uses: transformers' get_{constant,linear,cosine}_schedule_with_warmup, warm-up from 0 included
    (so the run's first step has learning rate 0 when there is a warm-up)."""
    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * total_steps)
    if step < warmup:
        return step / max(1, warmup)
    if train.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if train.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def schedules_learning_rate(train: TrainConfig) -> bool:
    """Whether the learning rate changes over the run (a schedule or a warm-up), so the loop must know its position."""
    return train.lr_schedule != "constant" or bool(train.warmup_steps or train.warmup_ratio)


class RunPosition(NamedTuple):
    """Where one client's round sits in the run, so that the learning-rate schedule continues across rounds:
    round r starts at optimizer step (r − 1) · steps_per_round of a run of rounds · steps_per_round steps,
    whether or not earlier rounds ran all their steps (a time budget) or this client took part in them."""

    round: int
    rounds: int
    steps_per_round: int

    @classmethod
    def of(cls, round: int, rounds: int, num_examples: int, train: TrainConfig) -> RunPosition:
        """Round `round` of `rounds` for a client holding `num_examples` examples (its `planned_steps`)."""
        return cls(round, rounds, planned_steps(num_examples, train))

    def learning_rate(self, train: TrainConfig, local_step: int) -> float:
        """The learning rate of the round's `local_step`-th optimizer step (0-based)."""
        step = (self.round - 1) * self.steps_per_round + local_step
        return train.learning_rate * lr_factor(train, step, self.rounds * self.steps_per_round)


def accumulation_groups(
    batches: Iterable[dict[str, torch.Tensor]], size: int
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Consecutive groups of `size` batches, the last one possibly smaller; a batch is drawn only when its
    group starts, so a loop that stops early leaves the rest undrawn."""
    iterator = iter(batches)
    while group := list(itertools.islice(iterator, size)):
        yield group


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
    position: RunPosition | None = None,
) -> LocalWork:
    """Run one optimizer step per `config.gradient_accumulation_steps` batches until the batches or
    `config.max_local_seconds` run out.

    A step's gradient is that of its batches' mean loss, clipped to `config.max_grad_norm` when set, and
    its learning rate follows `config.lr_schedule` at `position` (needed only when the rate changes). The
    budget is checked after each step, i.e. before every step but the first, so an update always holds at
    least one step. `extra_loss` adds a regulariser (e.g. ADMM's proximal term) to each batch's objective;
    `optimizer` lets a caller pass a wrapped one (opacus DP-SGD); `clock` lets a test drive time. The
    reported loss is the mean over the batches, the steps are optimizer steps.
    """
    if position is None and schedules_learning_rate(config):
        raise ValueError(f"train.lr_schedule: a changing learning rate ({config.lr_schedule!r}, or a warm-up) needs "
                         "the round's position in the run: pass train_steps(position=RunPosition.of(...))")
    optimizer = optimizer or make_optimizer(params, config)
    budget = TimeBudget(config.max_local_seconds, clock)
    model.train()
    losses: list[float] = []
    steps = 0
    for group in accumulation_groups(batches, config.gradient_accumulation_steps):
        optimizer.zero_grad(set_to_none=True)
        for batch in group:
            loss = model(**to_model_device(batch, model)).loss
            objective = loss + extra_loss() if extra_loss is not None else loss
            (objective / len(group)).backward()
            losses.append(loss.item())
        if config.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if position is not None:
            for param_group in optimizer.param_groups:
                param_group["lr"] = position.learning_rate(config, steps)
        optimizer.step()
        steps += 1
        step_taken(steps)
        if budget.spent():
            break
    model.eval()
    return LocalWork(loss=sum(losses) / max(len(losses), 1), steps=steps)
