"""Federated evaluation: clients evaluate the global model they receive on their own held-out data; the
server aggregates example-weighted `fed_eval_*` into the row of the model evaluated, and needs no data."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog
from fedtune.simulations.config import ConfigError
from fedtune.simulations.runner import build_federation, run_simulation
from fedtune.strategies.api import EVALUATE, EVALUATE_ONLY, ClientUpdate, Refusal, Refused, RunContext
from fedtune.strategies.fedavg_lora import FedAvgLoraConfig, FedAvgLoraServer
from fedtune.tasks.config import TrainConfig
from fedtune.tasks.evaluation import evaluate
from tests.helpers import tiny_config


def stub_engine(tmp_path, federated: bool = True) -> RoundEngine:
    server = FedAvgLoraServer(FedAvgLoraConfig(), RunContext(seed=0, rounds=2, train=TrainConfig(),
                                                             model_kind="causal_lm"))
    server.global_tensors = {"w": torch.zeros(2)}
    return RoundEngine(server, None, None, 8, MetricsLog(tmp_path), federated_evaluation=federated)


def reply(client: str, round: int, loss: float, accuracy: float, examples: int, tensors: bool = True) -> ClientUpdate:
    return ClientUpdate(client_id=client, round=round, num_examples=10,
                        tensors={"w": torch.ones(2)} if tensors else {},
                        metrics={"train_loss": 1.0, "eval_loss": loss, "eval_accuracy": accuracy,
                                 "eval_exact_match": accuracy / 2, "eval_examples": float(examples)})


def test_three_clients_evaluations_are_example_weighted_into_the_row_of_the_model_they_evaluated(tmp_path):
    engine = stub_engine(tmp_path)
    engine.record_baseline()
    instructions = engine.begin_round(1, ["a", "b", "c"])
    assert all(instruction.settings[EVALUATE] is True for instruction in instructions.values())
    for update in (reply("a", 1, 2.0, 0.5, 1), reply("b", 1, 4.0, 0.25, 3), reply("c", 1, 1.0, 1.0, 6)):
        engine.submit(update)
    engine.finish_round()
    baseline, first = engine.metrics.rows()
    assert math.isclose(baseline["fed_eval_loss"], (2.0 * 1 + 4.0 * 3 + 1.0 * 6) / 10)
    assert math.isclose(baseline["fed_eval_accuracy"], (0.5 * 1 + 0.25 * 3 + 1.0 * 6) / 10)
    assert math.isclose(baseline["fed_eval_exact_match"], (0.25 * 1 + 0.125 * 3 + 0.5 * 6) / 10)
    assert (baseline["fed_eval_examples"], baseline["fed_eval_clients"]) == (10.0, 3.0)
    assert "fed_eval_loss" not in first  # round 1's model is evaluated by the next exchange


def test_an_evaluate_only_round_amends_the_last_row_and_refuses_tensors(tmp_path):
    engine = stub_engine(tmp_path)
    engine.record_baseline()
    instructions = engine.begin_round(1, ["a", "b"], evaluate_only=True)
    assert all(instruction.settings[EVALUATE_ONLY] is True for instruction in instructions.values())
    with pytest.raises(Refused) as refused:
        engine.submit(reply("a", 1, 2.0, 0.5, 4))
    assert refused.value.reason is Refusal.INVALID_UPDATE and "carries no tensors" in str(refused.value)
    engine.submit(reply("a", 1, 2.0, 0.5, 4, tensors=False))
    engine.submit(reply("b", 1, 3.0, 0.5, 4, tensors=False))
    row = engine.finish_round()
    assert row.round == 0 and math.isclose(row.fed_eval_loss, 2.5) and len(engine.metrics.rows()) == 1
    assert torch.equal(engine.strategy.global_tensors["w"], torch.zeros(2))  # nothing aggregated


@pytest.mark.parametrize("metrics, named", [
    ({"eval_loss": float("nan"), "eval_accuracy": 0.5, "eval_exact_match": 0.0, "eval_examples": 3.0}, "eval_loss"),
    ({"eval_accuracy": 0.5, "eval_exact_match": 0.0, "eval_examples": 3.0}, "eval_loss"),
    ({"eval_loss": 1.0, "eval_accuracy": 0.5, "eval_exact_match": 0.0, "eval_examples": 2.5}, "eval_examples"),
])
def test_a_broken_evaluation_is_refused_naming_the_metric(tmp_path, metrics, named):
    engine = stub_engine(tmp_path)
    engine.begin_round(1, ["a"])
    with pytest.raises(Refused, match=named):
        engine.submit(ClientUpdate(client_id="a", round=1, num_examples=5, tensors={"w": torch.ones(2)},
                                   metrics=metrics))


def test_fedsim_without_central_data_reports_the_clients_evaluation_of_every_model(tmp_path):
    config = tiny_config(rounds=2, evaluation={"federated": True, "central": False})
    history = run_simulation(config, tmp_path, show_progress=False)
    assert [row.round for row in history] == [0, 1, 2]  # the final evaluation adds no round
    assert all(row.eval_loss is None and row.fed_eval_clients == 4 for row in history)
    assert history[-1].fed_eval_loss < history[0].fed_eval_loss
    federation = build_federation(config)  # the initial model, evaluated by hand on each client's held-out share
    results = [evaluate(federation.workspace.model, held_out, config.train.eval_batch_size)
               for held_out in federation.eval_data.values() if held_out is not None]
    total = sum(result.examples for result in results)
    assert history[0].fed_eval_examples == total
    assert math.isclose(history[0].fed_eval_loss, sum(r.loss * r.examples for r in results) / total, rel_tol=1e-6)
    assert sum(len(d) for d in federation.data.clients.values()) + total == sum(
        len(d) for d in build_federation(tiny_config(rounds=2)).data.clients.values())  # held out, not trained on


def test_federated_evaluation_and_asynchronous_rounds_are_refused_together():
    with pytest.raises((ConfigError, ValueError), match="evaluation.federated"):
        tiny_config(evaluation={"federated": True}, asynchronous={})


@pytest.mark.parametrize("overrides", [
    {"strategy": "ffa_lora"},
    {"strategy": "fedkseed", "options": {"seed_pool_size": 64}},
    {"strategy": "admm"},
    {"strategy": "fedavg_lora", "compression": {"codec": "int8", "downlink": "fp16"}},
    {"strategy": "fedavg_lora", "dp": {"level": "sample", "clipping_norm": 1.0, "noise_multiplier": 1.0}},
])
def test_every_built_in_strategy_and_wrapper_lets_clients_evaluate_what_they_receive(tmp_path, overrides):
    history = run_simulation(tiny_config(rounds=1, evaluation={"federated": True}, **overrides), tmp_path,
                             show_progress=False)
    assert [row.fed_eval_clients for row in history] == [4.0, 4.0]
    assert all(math.isfinite(row.fed_eval_loss) for row in history)
