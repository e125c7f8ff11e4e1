"""Training controls users of the HF Trainer expect (issue 15): learning-rate schedules with warm-up continued
across rounds, gradient accumulation, gradient clipping, and the strategies that refuse them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.runner import build_federation
from fedtune.strategies.api import Instruction
from fedtune.strategies.runconfig import ConfigError, parse_run_config
from fedtune.tasks import training
from fedtune.tasks.config import TrainConfig
from fedtune.tasks.data import EncodedExample, TokenDataset
from fedtune.tasks.training import (
    RunPosition,
    local_batches,
    lr_factor,
    make_optimizer,
    planned_batches,
    planned_steps,
    train_steps,
)
from tests.helpers import tiny_config

HF_SCHEDULES = {"constant": get_constant_schedule_with_warmup, "linear": get_linear_schedule_with_warmup,
                "cosine": get_cosine_schedule_with_warmup}


def hf_rates(schedule: str, warmup: int, total: int) -> list[float]:
    """The learning rate of each of `total` optimizer steps under transformers' scheduler (base rate 1)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    arguments = (warmup,) if schedule == "constant" else (warmup, total)
    scheduler = HF_SCHEDULES[schedule](optimizer, *arguments)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_are_transformers_schedules_over_the_whole_run(schedule, warmup):
    train = TrainConfig(lr_schedule=schedule, warmup_steps=warmup)
    assert [lr_factor(train, step, 20) for step in range(20)] == pytest.approx(hf_rates(schedule, warmup, 20))


def test_a_warmup_ratio_is_rounded_up_to_steps_as_transformers_does():
    ratio = TrainConfig(lr_schedule="linear", warmup_ratio=0.1)
    steps = TrainConfig(lr_schedule="linear", warmup_steps=3)
    assert [lr_factor(ratio, s, 25) for s in range(25)] == [lr_factor(steps, s, 25) for s in range(25)]  # ⌈2.5⌉ = 3


def recording_optimizers(monkeypatch) -> list[list[float]]:
    """Every optimizer the loop makes records the learning rate of each of its steps."""
    seen: list[list[float]] = []

    def recording(params, config):
        optimizer = make_optimizer(params, config)
        rates: list[float] = []
        seen.append(rates)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(training, "make_optimizer", recording)
    return seen


@pytest.mark.parametrize("strategy", ["fedavg_lora", "admm"])
def test_a_round_continues_the_schedule_from_the_global_round(monkeypatch, strategy):
    """Round 2 of 3 at 4 steps a round runs steps 4..7 of the run's 12 (warm-up 2, then linear decay)."""
    config = tiny_config(strategy=strategy, rounds=3, train={"local_steps": 4, "lr_schedule": "linear",
                                                             "warmup_steps": 2})
    federation = build_federation(config)
    workspace, client = federation.workspace, federation.clients["client-000"]
    instruction = Instruction(round=2, tensors=workspace.get_tensors(workspace.wire_names))
    seen = recording_optimizers(monkeypatch)
    client.fit(workspace, instruction, federation.data.clients["client-000"])
    expected = [config.train.learning_rate * rate for rate in hf_rates("linear", 2, 12)[4:8]]
    assert seen[-1] == pytest.approx(expected)


def test_the_position_counts_each_clients_planned_steps():
    train = TrainConfig(local_epochs=1, batch_size=4, lr_schedule="cosine")
    position = RunPosition.of(round=3, rounds=5, num_examples=10, train=train)  # 3 steps per round
    assert position == RunPosition(3, 5, 3)
    assert position.learning_rate(train, 1) == pytest.approx(train.learning_rate * lr_factor(train, 7, 15))


def test_a_changing_rate_without_a_position_is_refused():
    model = Squares(target=1.0)
    with pytest.raises(ValueError, match="train.lr_schedule"):
        train_steps(model, [model.weight], batches_of([1.0]), TrainConfig(lr_schedule="linear"))


class Squares(nn.Module):
    """w·x fitted to `target` by squared error, averaged over the batch (the transformers call convention)."""

    def __init__(self, target: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.target = target

    def forward(self, input_ids, attention_mask, labels):
        return SimpleNamespace(loss=((self.weight * input_ids - self.target) ** 2).mean())


def batches_of(*rows: list[float]):
    for values in rows:
        column = torch.tensor(values)
        yield {"input_ids": column, "attention_mask": torch.ones_like(column), "labels": column}


def test_accumulated_batches_make_one_step_of_their_mean_loss():
    """Two batches of 2 accumulated = one step on their concatenation (equal sizes), reported as one step."""
    sgd = {"optimizer": "sgd", "learning_rate": 0.1}
    accumulated, whole = Squares(3.0), Squares(3.0)
    work = train_steps(accumulated, [accumulated.weight], batches_of([1.0, 2.0], [3.0, 4.0]),
                       TrainConfig(gradient_accumulation_steps=2, **sgd))
    train_steps(whole, [whole.weight], batches_of([1.0, 2.0, 3.0, 4.0]), TrainConfig(**sgd))
    assert work.steps == 1
    assert accumulated.weight.item() == pytest.approx(whole.weight.item())
    assert work.loss == 9.0  # the mean of the two batches' losses, (0 - 3)² each


def test_local_steps_count_optimizer_steps_and_a_last_short_group_is_a_step():
    data = TokenDataset([EncodedExample((1, 2), i) for i in range(10)], "seq_cls", pad_token_id=0)
    steps = TrainConfig(local_steps=3, batch_size=2, gradient_accumulation_steps=4)
    assert (planned_steps(10, steps), planned_batches(10, steps)) == (3, 12)
    assert len(list(local_batches(data, steps, torch.Generator().manual_seed(0)))) == 12
    epochs = TrainConfig(local_epochs=2, batch_size=4, gradient_accumulation_steps=4)  # 2 × 3 batches
    assert (planned_steps(10, epochs), planned_batches(10, epochs)) == (2, 6)
    model = Squares(1.0)
    work = train_steps(model, [model.weight], batches_of(*[[1.0]] * 6), epochs.model_copy(update={"optimizer": "sgd"}))
    assert work.steps == 2


def test_the_gradient_is_clipped_before_each_step():
    sgd = {"optimizer": "sgd", "learning_rate": 1.0}
    clipped, free = Squares(100.0), Squares(100.0)  # gradient -200 at w = 0
    train_steps(clipped, [clipped.weight], batches_of([1.0]), TrainConfig(max_grad_norm=0.5, **sgd))
    train_steps(free, [free.weight], batches_of([1.0]), TrainConfig(**sgd))
    assert (clipped.weight.item(), free.weight.item()) == (pytest.approx(0.5), pytest.approx(200.0))


def test_the_defaults_are_the_plain_loop_bit_for_bit():
    """One optimizer step per batch, the loss as it is, no clipping, the configured rate: today's loop."""
    train = tiny_config().train
    federation = build_federation(tiny_config())
    workspace, data = federation.workspace, federation.data.clients["client-000"]
    names = workspace.wire_names
    start = workspace.get_tensors(names)
    params = workspace.parameters_for(names)
    batches = list(local_batches(data, train, torch.Generator().manual_seed(7)))
    train_steps(workspace.model, params, batches, train, position=RunPosition.of(2, 2, len(data), train))
    looped = workspace.get_tensors(names)
    workspace.set_tensors(start)
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    workspace.model.train()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        workspace.model(**batch).loss.backward()
        optimizer.step()
    reference = workspace.get_tensors(names)
    assert all(torch.equal(looped[name], reference[name]) for name in names)


@pytest.mark.parametrize(("train", "field"), [
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "warmup_ratio"),
    ({"lr_schedule": "exponential"}, "train.lr_schedule"),
    ({"warmup_steps": -1}, "train.warmup_steps"),
    ({"warmup_ratio": 1.0}, "train.warmup_ratio"),
    ({"gradient_accumulation_steps": 0}, "train.gradient_accumulation_steps"),
    ({"max_grad_norm": 0}, "train.max_grad_norm"),
])
def test_bad_controls_are_errors_naming_the_field(train, field):
    with pytest.raises(ConfigError, match=field):
        parse_run_config(SimulationConfig, {"train": train}, "run.toml", None)


DP_SAMPLE = {"level": "sample", "clipping_norm": 1.0, "noise_multiplier": 1.0}


@pytest.mark.parametrize(("raw", "field"), [
    ({"dp": DP_SAMPLE, "train": {"max_grad_norm": 1.0}}, "train.max_grad_norm: sample-level DP-SGD already clips"),
    ({"dp": DP_SAMPLE, "train": {"gradient_accumulation_steps": 2}}, "train.gradient_accumulation_steps"),
    ({"dp": DP_SAMPLE, "model": {"device": "auto"}}, "model.device"),
    ({"strategy": "fedkseed", "train": {"lr_schedule": "cosine"}}, "train.lr_schedule"),
    ({"strategy": "fedkseed", "train": {"warmup_steps": 5}}, "train.lr_schedule"),
    ({"strategy": "fedkseed", "train": {"gradient_accumulation_steps": 2}}, "train.gradient_accumulation_steps"),
    ({"strategy": "fedkseed", "train": {"max_grad_norm": 1.0}}, "options.loss_diff_clip"),
    ({"strategy": "admm", "model": {"device": "cuda"}}, "model.device: admm runs on the CPU only"),
])
def test_strategies_refuse_controls_their_local_work_cannot_honour_at_config_time(raw, field):
    with pytest.raises(ConfigError, match=field):
        parse_run_config(SimulationConfig, raw, "run.toml", None)


def test_client_level_dp_and_schedules_combine():
    raw = {"dp": {"level": "client", "clipping_norm": 1.0}, "train": {"max_grad_norm": 1.0, "lr_schedule": "cosine"}}
    assert parse_run_config(SimulationConfig, raw, "run.toml", None).train.max_grad_norm == 1.0
    sample = {"dp": DP_SAMPLE, "train": {"lr_schedule": "linear", "warmup_ratio": 0.1}}
    assert parse_run_config(SimulationConfig, sample, "run.toml", None).train.lr_schedule == "linear"
