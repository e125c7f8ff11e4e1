"""Differential privacy: docs/algorithms.md §6.5 checks, for client-level DP-FedAvg and sample-level DP-SGD."""

from __future__ import annotations

import gc
import io
import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule
from pydantic import ValidationError
from scipy import stats

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog
from fedtune.simulations.runner import Federation, build_federation, run_round, run_simulation
from fedtune.strategies.api import (
    ClientRetired,
    ClientStrategy,
    ClientUpdate,
    InvalidUpdate,
    RunContext,
    ServerStrategy,
    StrategyDefinition,
)
from fedtune.strategies.dp import Config, epsilon_of, wrap
from fedtune.strategies.dp_client import CLIPPING_NORM, UNCLIPPED, clip_update, update_delta
from fedtune.strategies.ffa_lora import frozen_names
from fedtune.strategies.registry import get_strategy, resolve
from fedtune.tasks.evaluation import evaluate
from tests.helpers import tiny_config

DELTA = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On a shared, busy CPU one torch thread runs these tiny steps several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def federation_with(dp: dict, clients: int = 3, **overrides) -> Federation:
    return build_federation(tiny_config(dp=dp, partition={"scheme": "iid", "num_clients": clients}, **overrides))


def fresh_server(federation: Federation) -> ServerStrategy:
    """A second server of the same run, as a restarted process would build it."""
    config = federation.config
    server = resolve(config.strategy, config.wrappers()).server(config.strategy_config(), federation.server.context)
    server.initialize(federation.workspace)
    return server


def echo_updates(server: ServerStrategy, round: int, client_ids, offset: float = 0.0) -> list[ClientUpdate]:
    """Replies that return the instruction's tensors (plus `offset` everywhere): a known update."""
    updates = []
    for client_id in client_ids:
        tensors = {name: t + offset for name, t in server.instruction(round, client_id).tensors.items()}
        updates.append(ClientUpdate(client_id=client_id, round=round, num_examples=10, tensors=tensors))
    return updates


def run_rounds(server: ServerStrategy, clients: list[str], rounds: int, start: int = 1) -> None:
    for round in range(start, start + rounds):
        assert server.stop_reason(round) is None
        server.aggregate(round, echo_updates(server, round, server.sample_clients(round, clients)))


def global_tensors(server: ServerStrategy) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in server.inner.global_tensors.items()}


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("dp", "field"), [
    ({"noise_multiplier": 1.0}, "dp.noise_multiplier"),
    ({"epsilon": 3.0}, "dp.epsilon"),
    ({"clipping_norm": 1.0, "noise_multiplier": 0.0, "epsilon": 3.0}, "dp.epsilon"),
    ({"level": "sample", "noise_multiplier": 1.0}, "dp.clipping_norm"),
    ({"level": "sample", "clipping_norm": 1.0}, "dp.epsilon"),
    ({"level": "sample", "clipping_norm": 1.0, "epsilon": 3.0, "adaptive_clipping": True}, "dp.adaptive_clipping"),
    ({"adaptive_clipping": True}, "dp.adaptive_clipping"),
    ({"clipping_norm": -1.0}, "dp.clipping_norm"),
    ({"clip_norm": 1.0}, "dp.clip_norm"),
])
def test_config_errors_name_the_field(dp, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        tiny_config(dp=dp)


def test_non_tensor_strategy_is_refused_by_name():
    class SeedOnlyServer(ServerStrategy):
        def initialize(self, workspace): ...
        def instruction(self, round, client_id): ...
        def update_specs(self): return {}
        def aggregate(self, round, updates): ...
        def load_global_into(self, workspace): ...

    class SeedOnlyClient(ClientStrategy):
        def fit(self, workspace, instruction, data): ...

    lora = get_strategy("fedavg_lora")
    seeds_only = StrategyDefinition(name="seeds_only", config=lora.config, server=SeedOnlyServer,
                                    client=SeedOnlyClient, build_workspace=lora.build_workspace)
    context = RunContext(seed=0, rounds=1, train=tiny_config().train, model_kind="causal_lm")
    server = wrap(seeds_only, Config(clipping_norm=1.0)).server(seeds_only.config(), context)
    with pytest.raises(TypeError, match="'seeds_only' exposes no global_tensors"):
        server.initialize(None)
    with pytest.raises(TypeError, match="'seeds_only' has no local_trainer hook"):
        wrap(seeds_only, Config(level="sample", clipping_norm=1.0, epsilon=1.0)).client(
            seeds_only.config(), context, "client-000")


# --- clipping --------------------------------------------------------------------------------------


def test_clip_scales_a_10c_update_by_exactly_a_tenth():
    generator = torch.Generator().manual_seed(0)
    delta = {"a": torch.randn(7, 5, generator=generator, dtype=torch.float64), "b": torch.randn(11, generator=generator,
                                                                                             dtype=torch.float64)}
    norm = math.sqrt(sum(float(t.square().sum()) for t in delta.values()))
    clipping_norm = norm / 10
    clipped, measured = clip_update(delta, clipping_norm)
    assert measured == pytest.approx(norm, rel=1e-15)
    for name in delta:
        torch.testing.assert_close(clipped[name], delta[name] * 0.1, rtol=1e-14, atol=0)
    small, _ = clip_update(delta, norm * 2)
    assert all(torch.equal(small[name], delta[name]) for name in delta)


@pytest.mark.parametrize("strategy", ["fedavg_lora", "ffa_lora"])
def test_every_update_reaching_aggregation_has_norm_at_most_c(strategy):
    clipping_norm = 1e-3  # well below the norm of a real 3-step update, so clipping is active
    federation = federation_with({"clipping_norm": clipping_norm}, 2, strategy=strategy, train={"local_steps": 1})
    server = federation.server
    selected = server.sample_clients(1, list(federation.clients))
    updates = []
    for client_id in selected:
        instruction = server.instruction(1, client_id)
        assert instruction.settings[CLIPPING_NORM] == clipping_norm
        inner_client = federation.clients[client_id].inner
        raw = inner_client.fit(federation.workspace, instruction, federation.data.clients[client_id])
        raw_norm = clip_update(update_delta(raw.tensors, instruction.tensors), math.inf)[1]
        assert raw_norm > 10 * clipping_norm
        data = federation.data.clients[client_id]
        update = federation.clients[client_id].fit(federation.workspace, instruction, data)
        sent_norm = clip_update(update_delta(update.tensors, instruction.tensors), math.inf)[1]
        assert sent_norm <= clipping_norm * (1 + 1e-6)
        assert sent_norm == pytest.approx(clipping_norm, rel=1e-4)
        server.validate_update(update, 1)
        updates.append(update)
    before = global_tensors(server)
    server.aggregate(1, updates)
    step = clip_update(update_delta(server.inner.global_tensors, before), math.inf)[1]
    assert step <= clipping_norm * (1 + 1e-6)  # the mean of updates of norm <= C, no noise configured


def test_server_clips_an_unclipped_10c_update_to_exactly_a_tenth():
    """A client that skips clipping gains nothing: the server clips again before averaging."""
    federation = federation_with({"clipping_norm": 0.5}, clients=1)
    server = federation.server
    server.sample_clients(1, ["client-000"])
    instruction = server.instruction(1, "client-000")
    delta = {name: torch.full_like(t, 1.0) for name, t in instruction.tensors.items()}
    scale = 10 * 0.5 / math.sqrt(sum(t.numel() for t in delta.values()))
    attack = ClientUpdate(client_id="client-000", round=1, num_examples=5,
                          tensors={name: instruction.tensors[name] + scale * delta[name] for name in delta})
    sent = update_delta(attack.tensors, instruction.tensors)
    server.aggregate(1, [attack])
    moved = update_delta(server.inner.global_tensors, instruction.tensors)
    for name in sent:
        torch.testing.assert_close(moved[name], sent[name] * 0.1, rtol=1e-5, atol=1e-9)


# --- noise -----------------------------------------------------------------------------------------


def test_noise_std_is_z_c_over_m_on_a_zero_update_and_seeded_runs_reproduce():
    z, clipping_norm, clients = 1.0, 2.0, 4
    federation = federation_with({"clipping_norm": clipping_norm, "noise_multiplier": z, "noise_seed": 7}, clients)
    server, ids = federation.server, list(federation.clients)
    replay = fresh_server(federation)
    samples = []
    for round in range(1, 7):
        before = global_tensors(server)
        server.aggregate(round, echo_updates(server, round, server.sample_clients(round, ids)))
        replay.aggregate(round, echo_updates(replay, round, replay.sample_clients(round, ids)))
        for name, tensor in server.inner.global_tensors.items():
            samples.append((tensor.double() - before[name].double()).flatten())
            assert torch.equal(tensor, replay.inner.global_tensors[name]), name
    noise = torch.cat(samples).numpy()
    assert noise.size >= 100_000
    expected_std = z * clipping_norm / clients
    assert stats.kstest(noise, "norm", args=(0.0, expected_std)).pvalue > 0.01
    assert stats.kstest(noise, "norm", args=(0.0, expected_std * 1.05)).pvalue < 0.01  # the test can fail


def test_two_noise_seeds_differ():
    results = []
    for seed in (1, 2):
        federation = federation_with({"clipping_norm": 1.0, "noise_multiplier": 0.5, "noise_seed": seed})
        run_rounds(federation.server, list(federation.clients), 1)
        results.append(global_tensors(federation.server))
    assert any(not torch.equal(results[0][name], results[1][name]) for name in results[0])


def test_without_clipping_and_noise_the_wrapper_is_the_identity(tmp_path):
    """Two fedsim rounds of real training, with and without an empty [dp] section: bit-identical."""
    results = []
    for label, dp in (("plain", None), ("dp", {})):
        federation = federation_with(dp, 2, train={"local_steps": 2})
        engine = RoundEngine(federation.server, federation.workspace, federation.data.eval, 64,
                             MetricsLog(tmp_path / label))
        losses = [run_round(federation, engine, round).eval_loss for round in (1, 2)]
        federation.server.load_global_into(federation.workspace)
        results.append((federation.workspace.get_tensors(federation.workspace.wire_names), losses))
    (plain, plain_losses), (wrapped, wrapped_losses) = results
    assert plain_losses == wrapped_losses
    assert plain.keys() == wrapped.keys()
    assert all(torch.equal(plain[name], wrapped[name]) for name in plain)


# --- accounting and budget -------------------------------------------------------------------------


@pytest.mark.parametrize(("z", "q", "steps", "expected"), [
    (1.0, 0.1, 100, 7.8993), (1.0, 0.01, 1000, 2.1014), (0.8, 0.05, 200, 8.7318), (2.0, 1.0, 10, 8.0794),
])
def test_reference_epsilons_of_algorithms_md(z, q, steps, expected):
    assert epsilon_of([(z, q, steps)], DELTA) == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize(("clients", "per_round", "z", "rounds", "expected"), [
    (10, 1, 1.0, 100, 7.8993),  # q = 0.1
    (3, None, 2.0, 10, 8.0794),  # full participation: q = 1, no amplification
])
def test_reported_epsilon_equals_opacus_accountant(clients, per_round, z, rounds, expected):
    federation = federation_with({"clipping_norm": 1.0, "noise_multiplier": z}, clients,
                                 options={"clients_per_round": per_round})
    server, ids = federation.server, list(federation.clients)
    run_rounds(server, ids, rounds)
    direct = RDPAccountant()
    for _ in range(rounds):
        direct.step(noise_multiplier=z, sample_rate=(per_round or clients) / clients)
    metrics = server.round_metrics()
    assert metrics["epsilon"] == pytest.approx(direct.get_epsilon(DELTA), abs=1e-9)
    assert metrics["epsilon"] == pytest.approx(expected, abs=5e-5)
    assert metrics["delta"] == DELTA


def test_budget_stops_the_run_at_the_last_round_within_epsilon(tmp_path):
    z, budget = 2.0, 4.5  # with q = 1: epsilon after 3 rounds 4.01 <= 4.5 < 4.73 after 4 rounds
    within = max(t for t in range(1, 20) if epsilon_of([(z, 1.0, t)], DELTA) <= budget)
    assert within == 3
    config = tiny_config(dp={"clipping_norm": 1.0, "noise_multiplier": z, "epsilon": budget}, rounds=6,
                         partition={"scheme": "iid", "num_clients": 2}, train={"local_steps": 1})
    run_simulation(config, tmp_path, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(within + 1))
    assert all(row["epsilon"] <= budget and row["delta"] == DELTA for row in rows[1:])
    assert rows[-1]["epsilon"] == pytest.approx(epsilon_of([(z, 1.0, within)], DELTA), abs=1e-9)


def test_noise_is_calibrated_to_the_budget_over_the_planned_rounds():
    budget, rounds = 3.0, 6
    federation = federation_with({"clipping_norm": 1.0, "epsilon": budget}, 2, rounds=rounds)
    server, ids = federation.server, list(federation.clients)
    run_rounds(server, ids, rounds)
    z = get_noise_multiplier(target_epsilon=budget, target_delta=DELTA, sample_rate=1.0, steps=rounds)
    assert server.round_metrics()["dp_noise_multiplier"] == z
    assert budget - 0.01 <= server.round_metrics()["epsilon"] <= budget
    assert server.stop_reason(rounds + 1) is not None


def test_accountant_survives_a_state_dict_round_trip():
    federation = federation_with({"clipping_norm": 1.0, "noise_multiplier": 2.0, "epsilon": 5.5}, 2)
    server, ids = federation.server, list(federation.clients)
    run_rounds(server, ids, 3)
    buffer = io.BytesIO()
    torch.save(server.state_dict(), buffer)
    buffer.seek(0)
    restarted = fresh_server(federation)
    assert restarted.round_metrics()["epsilon"] == 0.0
    restarted.load_state_dict(torch.load(buffer, weights_only=False))
    assert restarted.round_metrics()["epsilon"] == server.round_metrics()["epsilon"] > 0
    run_rounds(server, ids, 2, start=4)
    run_rounds(restarted, ids, 2, start=4)
    assert restarted.round_metrics()["epsilon"] == pytest.approx(epsilon_of([(2.0, 1.0, 5)], DELTA), abs=1e-9)
    assert restarted.stop_reason(6) == server.stop_reason(6) is not None  # 5.98 > 5.5 after a sixth round


# --- adaptive clipping -----------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "direction"), [(0.0, -1), (1.0, +1)])
def test_adaptive_clipping_moves_c_towards_the_quantile(offset, direction):
    """Andrew et al. 2021: without noise, all updates unclipped lowers C by exp(-η(1 - γ)), all clipped
    raises it by exp(η γ)."""
    federation = federation_with({"clipping_norm": 0.1, "adaptive_clipping": True}, 2)
    server, ids = federation.server, list(federation.clients)
    updates = [u.model_copy(update={"metrics": {UNCLIPPED: 1.0 - offset}})
               for u in echo_updates(server, 1, server.sample_clients(1, ids), offset)]
    for update in updates:
        server.validate_update(update, 1)
    server.aggregate(1, updates)
    share = 1.0 - offset
    assert server.clipping_norm == pytest.approx(0.1 * math.exp(-0.2 * (share - 0.5)), rel=1e-12)
    assert (server.clipping_norm - 0.1) * direction > 0
    assert server.instruction(2, ids[0]).settings[CLIPPING_NORM] == server.clipping_norm
    with pytest.raises(InvalidUpdate, match=UNCLIPPED):
        server.validate_update(updates[0].model_copy(update={"metrics": {}, "round": 2}), 2)


def test_adaptive_clipping_splits_the_noise_keeping_the_total_multiplier():
    federation = federation_with({"clipping_norm": 0.1, "noise_multiplier": 1.0, "adaptive_clipping": True,
                                  "clipped_count_stddev": 1.0}, 2)
    assert federation.server.update_noise_multiplier(2) == pytest.approx((1 - 0.25) ** -0.5, rel=1e-12)
    too_small = federation_with({"clipping_norm": 0.1, "noise_multiplier": 1.0, "adaptive_clipping": True}, 2)
    with pytest.raises(ValueError, match="dp.clipped_count_stddev"):
        too_small.server.sample_clients(1, list(too_small.clients))


# --- sample level: DP-SGD --------------------------------------------------------------------------


def workspace_hooks(federation: Federation) -> int:
    return sum(
        len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
        + len(module._backward_pre_hooks)
        for module in federation.workspace.model.modules()
    )


@pytest.mark.parametrize("strategy", ["fedavg_lora", "ffa_lora"])
def test_dp_sgd_trains_the_adapter_and_reports_the_accountants_epsilon(strategy):
    z, rounds, steps = 0.8, 2, 4
    config = tiny_config(strategy=strategy, dp={"level": "sample", "clipping_norm": 1.0, "noise_multiplier": z},
                         rounds=rounds, partition={"scheme": "iid", "num_clients": 2},
                         train={"local_steps": steps, "learning_rate": 2e-2, "weight_decay": 0.1})
    federation = build_federation(config)
    workspace, server = federation.workspace, federation.server
    frozen = workspace.digest(frozen_names(workspace))
    start = evaluate(workspace.model, federation.data.eval, 64).loss
    for round in range(1, rounds + 1):
        updates = []
        for client_id in server.sample_clients(round, list(federation.clients)):
            data = federation.data.clients[client_id]
            update = federation.clients[client_id].fit(workspace, server.instruction(round, client_id), data)
            rate = config.train.batch_size / len(data)
            assert rate < 1
            assert update.metrics["epsilon"] == pytest.approx(epsilon_of([(z, rate, round * steps)], DELTA), abs=1e-9)
            assert update.metrics["delta"] == DELTA
            server.validate_update(update, round)
            updates.append(update)
        server.aggregate(round, updates)
    server.load_global_into(workspace)
    assert evaluate(workspace.model, federation.data.eval, 64).loss < start - 0.1  # 4.67 -> about 4.43
    assert server.round_metrics()["epsilon"] == max(u.metrics["epsilon"] for u in updates)
    # FFA-LoRA's frozen A is in no optimizer and gets no noise (weight decay 0.1 would move it otherwise);
    # LoRA's A is trained, so the same check fails there.
    assert (workspace.digest(frozen_names(workspace)) == frozen) == (strategy == "ffa_lora")


def test_sample_level_noise_is_calibrated_per_client_to_the_budget():
    """q = batch/n_i capped at 1; z from opacus for (budget, q, rounds × local steps)."""
    config = tiny_config(dp={"level": "sample", "clipping_norm": 1.0, "epsilon": 5.0}, rounds=3,
                         partition={"scheme": "iid", "num_clients": 2}, train={"local_steps": 4, "batch_size": 400})
    federation = build_federation(config)
    client, data = federation.clients["client-000"], federation.data.clients["client-000"]
    assert client.sample_rate(data) == 1.0
    update = client.fit(federation.workspace, federation.server.instruction(1, "client-000"), data)
    z = get_noise_multiplier(target_epsilon=5.0, target_delta=DELTA, sample_rate=1.0, steps=12)
    assert client.noise_multiplier == z
    assert update.metrics["epsilon"] == pytest.approx(epsilon_of([(z, 1.0, 4)], DELTA), abs=1e-9)


def test_dp_sgd_leaves_the_shared_workspace_clean():
    federation = federation_with({"level": "sample", "clipping_norm": 1.0, "noise_multiplier": 1.0}, 2,
                                 train={"local_steps": 2})
    workspace, server = federation.workspace, federation.server
    server.load_global_into(workspace)
    before = evaluate(workspace.model, federation.data.eval, 64)
    hooks = workspace_hooks(federation)
    attributes = [dict(vars(p)) for p in workspace.model.parameters()]
    for client_id in federation.clients:
        data = federation.data.clients[client_id]
        federation.clients[client_id].fit(workspace, server.instruction(1, client_id), data)
        assert workspace_hooks(federation) == hooks
        assert [dict(vars(p)) for p in workspace.model.parameters()] == attributes, "opacus state left behind"
        assert all(p.grad is None for p in workspace.model.parameters())
    gc.collect()
    assert not any(isinstance(obj, GradSampleModule) for obj in gc.get_objects())
    server.load_global_into(workspace)
    after = evaluate(workspace.model, federation.data.eval, 64)
    assert after == before


def test_client_retires_before_exceeding_its_budget(tmp_path):
    """The budget allows one round of local steps and not two: each client trains once, then retires,
    spending nothing more, and the run stops."""
    z, steps, rate = 1.0, 2, 8 / 180  # tiny_config: 360 training rows over 2 clients, batch 8
    budget = epsilon_of([(z, rate, steps)], DELTA) * 1.01
    assert epsilon_of([(z, rate, 2 * steps)], DELTA) > budget
    config = tiny_config(dp={"level": "sample", "clipping_norm": 1.0, "noise_multiplier": z, "epsilon": budget},
                         rounds=4, partition={"scheme": "iid", "num_clients": 2}, train={"local_steps": steps})
    federation = build_federation(config)
    assert all(len(data) == 180 for data in federation.data.clients.values())
    client, data = federation.clients["client-000"], federation.data.clients["client-000"]
    update = client.fit(federation.workspace, federation.server.instruction(1, "client-000"), data)
    assert update.metrics["epsilon"] == pytest.approx(epsilon_of([(z, rate, steps)], DELTA), abs=1e-9)
    with pytest.raises(ClientRetired, match=f"budget dp.epsilon = {budget}"):
        client.fit(federation.workspace, federation.server.instruction(2, "client-000"), data)
    assert client.epsilon() == update.metrics["epsilon"]

    history = run_simulation(config, tmp_path, show_progress=False)
    assert [(m.round, m.clients) for m in history] == [(0, 0), (1, 2), (2, 0)]  # round 2: both retire
    assert history[1].epsilon == history[2].epsilon == update.metrics["epsilon"]


def test_server_rejects_a_reply_claiming_more_than_the_budget():
    federation = federation_with({"level": "sample", "clipping_norm": 1.0, "epsilon": 2.0})
    update = echo_updates(federation.server, 1, ["client-000"])[0]
    with pytest.raises(InvalidUpdate, match="metric 'epsilon' is missing"):
        federation.server.validate_update(update, 1)
    with pytest.raises(InvalidUpdate, match="exceeds the budget dp.epsilon = 2.0"):
        federation.server.validate_update(update.model_copy(update={"metrics": {"epsilon": 2.5}}), 1)
