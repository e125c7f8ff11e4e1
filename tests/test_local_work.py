"""Local work the way users state it: local epochs, a time budget per round, FedNova normalisation (issue 13.1)."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier
from safetensors.torch import load_file
from torch import nn

from fedtune.fedserver.config import ServerConfig
from fedtune.protos.runspec import RunSpec
from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.runner import build_federation, run_simulation
from fedtune.strategies.api import ClientUpdate, InvalidUpdate, RunContext, weighted_mean
from fedtune.strategies.dp import epsilon_of
from fedtune.strategies.fedavg_lora import FedAvgLoraClient, FedAvgLoraConfig, FedAvgLoraServer, fednova_mean
from fedtune.strategies.fedkseed import SCALAR_GRAD, SEED_INDEX, FedKSeedConfig, FedKSeedServer
from fedtune.strategies.ffa_lora import FfaLoraConfig
from fedtune.strategies.runconfig import ConfigError, parse_run_config
from fedtune.tasks.config import TrainConfig
from fedtune.tasks.data import EncodedExample, TokenDataset
from fedtune.tasks.training import LOCAL_STEPS, local_batches, planned_steps, train_steps
from tests.helpers import tiny_config

DELTA = 1e-5


def numbered(n: int) -> TokenDataset:
    """n classification examples whose label is their own index, so a batch shows which examples it holds."""
    return TokenDataset([EncodedExample((1, 2), i) for i in range(n)], "seq_cls", pad_token_id=0)


def visits(data: TokenDataset, train: TrainConfig, round: int) -> list[list[int]]:
    """The example indices of each batch of a round, drawn with the generator client-000 uses that round."""
    context = RunContext(seed=0, rounds=2, train=train, model_kind="seq_cls")
    generator = FedAvgLoraClient(FedAvgLoraConfig(), context, "client-000").batch_generator(round)
    return [batch["labels"].tolist() for batch in local_batches(data, train, generator)]


# --- configuration --------------------------------------------------------------------------------


def test_steps_default_to_20_and_epochs_replace_them():
    assert (TrainConfig().local_steps, TrainConfig().local_epochs) == (20, None)
    epochs = TrainConfig(local_epochs=2)
    assert (epochs.local_steps, epochs.local_epochs) == (None, 2)
    for config in (SimulationConfig(), tiny_config(train={"local_steps": None, "local_epochs": 1})):
        assert SimulationConfig.model_validate(json.loads(config.model_dump_json())) == config  # config.json reloads


def test_both_steps_and_epochs_is_an_error_naming_both():
    raw = {"train": {"local_steps": 3, "local_epochs": 1}}
    with pytest.raises(ConfigError) as caught:
        parse_run_config(SimulationConfig, raw, "run.toml", None)
    assert "local_steps" in str(caught.value) and "local_epochs" in str(caught.value)
    assert str(caught.value).startswith("run.toml: invalid config\n  train: ")


@pytest.mark.parametrize("train", [{"local_epochs": 0}, {"max_local_seconds": 0}, {"max_local_seconds": -1.0}])
def test_work_fields_are_bounded(train):
    with pytest.raises(ConfigError, match=f"train.{next(iter(train))}"):
        parse_run_config(SimulationConfig, {"train": train}, "run.toml", None)


def test_new_fields_reach_a_client_through_the_run_spec():
    config = ServerConfig.model_validate({"train": {"local_epochs": 2, "max_local_seconds": 1.5}})
    spec = RunSpec.model_validate_json(config.run_spec().model_dump_json())
    train = spec.context().train
    assert (train.local_steps, train.local_epochs, train.max_local_seconds) == (None, 2, 1.5)


# --- batching --------------------------------------------------------------------------------------


def test_one_epoch_visits_every_example_once_in_a_seeded_order():
    data, train = numbered(24), TrainConfig(local_epochs=1, batch_size=8)
    first = visits(data, train, round=1)
    assert [len(batch) for batch in first] == [8, 8, 8]
    order = [index for batch in first for index in batch]
    assert sorted(order) == list(range(24)) and order != list(range(24))
    assert visits(data, train, round=1) == first
    assert visits(data, train, round=2) != first


def test_the_last_partial_batch_is_kept_and_every_epoch_is_a_full_pass():
    data, train = numbered(10), TrainConfig(local_epochs=2, batch_size=4)
    batches = visits(data, train, round=1)
    assert [len(batch) for batch in batches] == [4, 4, 2, 4, 4, 2]
    assert planned_steps(len(data), train) == len(batches) == 6
    for epoch in (batches[:3], batches[3:]):
        assert sorted(index for batch in epoch for index in batch) == list(range(10))
    assert batches[:3] != batches[3:]  # a fresh permutation per epoch


def test_epochs_draw_the_same_batches_as_the_equivalent_steps():
    data = numbered(12)
    epochs = visits(data, TrainConfig(local_epochs=3, batch_size=4), round=1)
    steps = visits(data, TrainConfig(local_steps=9, batch_size=4), round=1)
    assert epochs == steps and len(epochs) == 9


def test_planned_steps_follow_the_unit_the_user_stated():
    assert planned_steps(1000, TrainConfig(local_steps=7, batch_size=4)) == 7
    assert planned_steps(9, TrainConfig(local_epochs=2, batch_size=4)) == 6
    assert planned_steps(3, TrainConfig(local_epochs=1, batch_size=16)) == 1


# --- the time budget -------------------------------------------------------------------------------


class Scalar(nn.Module):
    """A one-parameter model with the transformers call convention (`model(**batch).loss`)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, labels):
        return SimpleNamespace(loss=(self.weight - 1.0).square())


def drawn_batches(count: int, pulled: list[int]):
    for index in range(count):
        pulled.append(index)
        yield {"input_ids": torch.zeros(1), "attention_mask": torch.zeros(1), "labels": torch.zeros(1)}


@pytest.mark.parametrize(("seconds", "tick", "expected"), [(None, 1.0, 10), (2.5, 1.0, 3), (2.5, 100.0, 1)])
def test_the_budget_stops_the_loop_and_at_least_one_step_runs(seconds, tick, expected):
    model, pulled = Scalar(), []
    train = TrainConfig(local_steps=10, max_local_seconds=seconds, optimizer="sgd", learning_rate=0.1)
    clock = map(lambda count: count * tick, itertools.count()).__next__  # start 0, then one tick per reading
    work = train_steps(model, [model.weight], drawn_batches(10, pulled), train, clock=clock)
    assert work.steps == expected and len(pulled) == expected  # no batch drawn past the budget
    assert model.weight.item() == pytest.approx(1 - 0.8**expected)  # w <- w - 0.1·2(w - 1), once per step


def test_a_cut_round_reports_the_steps_actually_done():
    config = tiny_config(partition={"scheme": "iid", "num_clients": 2}, train={"local_steps": 5})
    federation = build_federation(config)
    client_id = "client-000"
    data = federation.data.clients[client_id]
    full = federation.clients[client_id].fit(federation.workspace, federation.server.instruction(1, client_id), data)
    assert full.metrics[LOCAL_STEPS] == 5
    federation.clients[client_id].context = RunContext(
        seed=0, rounds=2, train=config.train.model_copy(update={"max_local_seconds": 1e-9}), model_kind="causal_lm"
    )
    cut = federation.clients[client_id].fit(federation.workspace, federation.server.instruction(1, client_id), data)
    assert cut.metrics[LOCAL_STEPS] == 1
    federation.server.validate_update(cut, 1)


# --- fedsim runs -----------------------------------------------------------------------------------


def equal_clients(train: dict) -> SimulationConfig:
    """100 rows: 90 for training over 3 iid clients of 30, 10 held out."""
    return tiny_config(rounds=2, partition={"scheme": "iid", "num_clients": 3},
                       data={"max_train_examples": 100, "max_eval_examples": 8},
                       train={"batch_size": 10, "local_steps": None, **train})


def test_one_epoch_equals_n_over_batch_steps_in_a_fedsim_run(tmp_path):
    epochs, steps = equal_clients({"local_epochs": 1}), equal_clients({"local_steps": 3})
    run_simulation(epochs, tmp_path / "epochs", show_progress=False)
    run_simulation(steps, tmp_path / "steps", show_progress=False)
    by_epochs = load_file(tmp_path / "epochs" / "global" / "adapter_model.safetensors")
    by_steps = load_file(tmp_path / "steps" / "global" / "adapter_model.safetensors")
    assert by_epochs.keys() == by_steps.keys()
    for name in by_epochs:
        assert torch.equal(by_epochs[name], by_steps[name]), name
    assert any("lora_B" in name and by_epochs[name].abs().sum() > 0 for name in by_epochs), "B never moved"


def test_fednova_run_on_unequal_clients_accepts_every_update():
    config = tiny_config(strategy="ffa_lora", rounds=1, options={"step_normalization": "fednova"},
                         partition={"scheme": "dirichlet", "num_clients": 3}, data={"max_train_examples": 100},
                         train={"local_steps": None, "local_epochs": 1})
    federation = build_federation(config)
    server, workspace = federation.server, federation.workspace
    updates = []
    for client_id, data in federation.data.clients.items():
        update = federation.clients[client_id].fit(workspace, server.instruction(1, client_id), data)
        assert update.metrics[LOCAL_STEPS] == math.ceil(len(data) / 8)
        server.validate_update(update, 1)
        updates.append(update)
    assert len({update.metrics[LOCAL_STEPS] for update in updates}) > 1, "the natural split should be unequal"
    before = dict(server.global_tensors)
    server.aggregate(1, updates)
    assert any(not torch.equal(before[name], server.global_tensors[name]) for name in before)


# --- FedNova -------------------------------------------------------------------------------------------


def fednova_server(normalization: str = "fednova") -> FedAvgLoraServer:
    context = RunContext(seed=0, rounds=1, train=TrainConfig(), model_kind="causal_lm")
    server = FedAvgLoraServer(FedAvgLoraConfig(step_normalization=normalization), context)
    server.global_tensors = {"w": torch.ones(2, 3)}
    return server


def update(client_id: str, value: float, examples: int, steps: float | None) -> ClientUpdate:
    metrics = {} if steps is None else {LOCAL_STEPS: steps}
    return ClientUpdate(client_id=client_id, round=1, num_examples=examples,
                        tensors={"w": torch.full((2, 3), value)}, metrics=metrics)


def test_fednova_hand_computed_with_unequal_steps():
    """global 1; (θ, n, τ) = (3, 1, 1), (5, 1, 4), (-1, 2, 2): p = (¼, ¼, ½), τ_eff = 2.25,
    Σ p Δ/τ = ¼·2 + ¼·4/4 + ½·(−2)/2 = 0.25, new = 1 + 2.25·0.25 = 1.5625 (FedAvg: 1.5)."""
    server = fednova_server()
    updates = [update("c", -1.0, 2, 2), update("a", 3.0, 1, 1), update("b", 5.0, 1, 4)]
    for each in updates:
        server.validate_update(each, 1)
    server.aggregate(1, updates)
    assert torch.equal(server.global_tensors["w"], torch.full((2, 3), 1.5625))


def test_fednova_with_equal_steps_is_fedavg():
    generator = torch.Generator().manual_seed(0)
    current = torch.randn(4, 5, generator=generator)
    tensors = [torch.randn(4, 5, generator=generator) for _ in range(3)]
    weights = [3, 7, 11]
    normalised = fednova_mean(current, tensors, weights, [6, 6, 6])
    plain = weighted_mean(tensors, weights)
    assert (normalised - plain).abs().max() < 1e-6
    assert not torch.allclose(fednova_mean(current, tensors, weights, [1, 6, 12]), plain, atol=1e-3)


def test_ffa_lora_inherits_the_option():
    assert FfaLoraConfig(step_normalization="fednova").step_normalization == "fednova"
    with pytest.raises(ValueError, match="step_normalization"):
        FedAvgLoraConfig(step_normalization="fednova2")


@pytest.mark.parametrize("steps", [None, 0, -2, 2.5])
def test_fednova_rejects_an_update_without_whole_positive_local_steps(steps):
    with pytest.raises(InvalidUpdate, match="metric 'local_steps'"):
        fednova_server().validate_update(update("a", 1.0, 1, steps), 1)
    fednova_server("none").validate_update(update("a", 1.0, 1, steps), 1)  # plain FedAvg does not need it


def test_client_level_dp_refuses_fednova():
    config = tiny_config(options={"step_normalization": "fednova"}, dp={"level": "client", "clipping_norm": 1.0})
    with pytest.raises(ValueError, match="step_normalization"):
        config.definition().server(config.strategy_config(), config.context())


# --- sample-level DP and FedKSeed ------------------------------------------------------------------


def test_dp_sgd_plans_and_accounts_epochs_per_client():
    """With local_epochs the planned steps follow the client's size; z is calibrated to rounds × those steps."""
    config = tiny_config(rounds=2, partition={"scheme": "iid", "num_clients": 2}, data={"max_train_examples": 100},
                         dp={"level": "sample", "clipping_norm": 1.0, "epsilon": 5.0},
                         train={"local_steps": None, "local_epochs": 1, "batch_size": 16})
    federation = build_federation(config)
    client, data = federation.clients["client-000"], federation.data.clients["client-000"]
    assert len(data) == 45
    rate = 16 / 45
    update = client.fit(federation.workspace, federation.server.instruction(1, "client-000"), data)
    z = get_noise_multiplier(target_epsilon=5.0, target_delta=DELTA, sample_rate=rate, steps=2 * 3)
    assert client.noise_multiplier == z
    assert update.metrics[LOCAL_STEPS] == 3
    assert update.metrics["epsilon"] == pytest.approx(epsilon_of([(z, rate, 3)], DELTA), abs=1e-9)


def test_dp_sgd_accounts_only_the_steps_a_time_budget_let_run():
    z = 1.0
    config = tiny_config(partition={"scheme": "iid", "num_clients": 2}, data={"max_train_examples": 100},
                         dp={"level": "sample", "clipping_norm": 1.0, "noise_multiplier": z},
                         train={"local_steps": 4, "batch_size": 16, "max_local_seconds": 1e-9})
    federation = build_federation(config)
    client, data = federation.clients["client-000"], federation.data.clients["client-000"]
    update = client.fit(federation.workspace, federation.server.instruction(1, "client-000"), data)
    assert update.metrics[LOCAL_STEPS] == 1
    assert update.metrics["epsilon"] == pytest.approx(epsilon_of([(z, 16 / 45, 1)], DELTA), abs=1e-9)


def seed_update(pairs: int, examples: int) -> ClientUpdate:
    return ClientUpdate(client_id="a", round=1, num_examples=examples, tensors={
        SEED_INDEX: torch.arange(pairs, dtype=torch.int16), SCALAR_GRAD: torch.ones(pairs, dtype=torch.float32)})


def test_fedkseed_bounds_the_pairs_by_the_clients_planned_epochs():
    train = TrainConfig(local_epochs=1, batch_size=4, learning_rate=1e-3)
    server = FedKSeedServer(FedKSeedConfig(seed_pool_size=64), RunContext(0, 1, train, "causal_lm"))
    server.validate_update(seed_update(3, examples=10), 1)  # ⌈10/4⌉ = 3 steps
    server.validate_update(seed_update(5, examples=20), 1)
    with pytest.raises(InvalidUpdate, match="holds 4 pairs, more than the 3 steps of train.local_epochs=1 over 10"):
        server.validate_update(seed_update(4, examples=10), 1)


def test_fedkseed_client_runs_epochs_and_reports_its_steps():
    config = tiny_config(strategy="fedkseed", partition={"scheme": "iid", "num_clients": 3},
                         data={"max_train_examples": 100}, options={"seed_pool_size": 64},
                         train={"local_steps": None, "local_epochs": 1, "batch_size": 8, "learning_rate": 1e-4})
    federation = build_federation(config)
    client_id = "client-000"
    data = federation.data.clients[client_id]
    update = federation.clients[client_id].fit(
        federation.workspace, federation.server.instruction(1, client_id), data)
    assert update.metrics[LOCAL_STEPS] == math.ceil(len(data) / 8) == 4
    assert 0 < update.tensors[SEED_INDEX].numel() <= 4
    federation.server.validate_update(update, 1)
