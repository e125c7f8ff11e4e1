"""The `[asynchronous]` mode (FedBuff): rebasing stale updates, the engine's refusals, fedsim on the device clock."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog
from fedtune.simulations.config import ConfigError
from fedtune.simulations.runner import build_federation, run_simulation
from fedtune.strategies.api import ClientUpdate, Refusal, Refused, RunContext
from fedtune.strategies.fedavg_lora import FedAvgLoraConfig, FedAvgLoraServer
from fedtune.strategies.fedbuff import Config, FedBuffServer
from fedtune.tasks.config import TrainConfig
from tests.helpers import tiny_config


def fedbuff_over_fedavg(**options: object) -> FedBuffServer:
    """FedBuff over a FedAvg server holding one hand-set tensor w = [0, 0] (no model needed)."""
    context = RunContext(seed=0, rounds=5, train=TrainConfig(), model_kind="causal_lm")
    inner = FedAvgLoraServer(FedAvgLoraConfig(), context)
    inner.global_tensors = {"w": torch.zeros(2)}
    server = FedBuffServer(inner, Config.model_validate(options))
    server._snapshot()
    return server


def update(client_id: str, round: int, values: list[float], examples: int) -> ClientUpdate:
    return ClientUpdate(client_id=client_id, round=round, num_examples=examples, tensors={"w": torch.tensor(values)})


def test_stale_updates_are_rebased_with_the_staleness_weight_a_hand_computed_three_client_case():
    server = fedbuff_over_fedavg(buffer_size=2, max_staleness=2)  # w(s) = (1+s)^-0.5, η = 1
    g1 = torch.zeros(2)
    server.aggregate(1, [update("b", 1, [2.0, 0.0], 1), update("c", 1, [0.0, 4.0], 3)])
    g2 = (1 * torch.tensor([2.0, 0.0]) + 3 * torch.tensor([0.0, 4.0])) / 4
    assert torch.allclose(server.inner.global_tensors["w"], g2)
    # round 2: a's update was computed on G1 (one round stale), b's on G2 (fresh)
    stale_a, fresh_b = update("a", 1, [4.0, 4.0], 2), update("b", 2, [1.0, 3.0], 1)
    server.validate_update(stale_a, 1)
    server.aggregate(2, [stale_a, fresh_b])
    rebased_a = g2 + 2**-0.5 * (torch.tensor([4.0, 4.0]) - g1)
    assert torch.allclose(server.inner.global_tensors["w"], (2 * rebased_a + 1 * torch.tensor([1.0, 3.0])) / 3)
    assert server.round_metrics()["staleness_mean"] == 0.5 and server.round_metrics()["staleness_max"] == 1.0


def test_constant_weight_and_server_learning_rate_are_applied_as_configured():
    server = fedbuff_over_fedavg(buffer_size=1, staleness_weight="constant", server_learning_rate=0.5)
    server.aggregate(1, [update("a", 1, [2.0, 2.0], 1)])  # fresh but η = 0.5: G2 = 0 + 0.5·2
    assert torch.equal(server.inner.global_tensors["w"], torch.tensor([1.0, 1.0]))
    server.aggregate(2, [update("b", 1, [4.0, 0.0], 1)])  # stale by 1, w = 1: G3 = G2 + 0.5·(θ − G1)
    assert torch.equal(server.inner.global_tensors["w"], torch.tensor([3.0, 1.0]))


def test_a_fresh_update_is_passed_on_bit_for_bit():
    server = fedbuff_over_fedavg()
    fresh = update("a", 1, [0.1, 0.7], 1)
    assert server.rebased(fresh) is fresh


def test_updates_older_than_max_staleness_cannot_be_rebased():
    server = fedbuff_over_fedavg(buffer_size=1, max_staleness=1)
    server.aggregate(1, [update("a", 1, [1.0, 1.0], 1)])
    server.aggregate(2, [update("a", 2, [1.0, 1.0], 1)])
    with pytest.raises(ValueError, match="round 1 is more than asynchronous.max_staleness=1"):
        server.validate_update(update("b", 1, [1.0, 1.0], 1), 1)
    server.validate_update(update("b", 2, [1.0, 1.0], 1), 2)
    assert sorted(server.versions) == [2, 3]  # memory: max_staleness + 1 global models


def test_the_engine_refuses_stale_unsent_and_duplicate_updates_and_aggregates_every_k(tmp_path):
    mode = Config(buffer_size=2, max_staleness=1)
    engine = RoundEngine(fedbuff_over_fedavg(**mode.model_dump()), None, None, 8, MetricsLog(tmp_path), mode)
    engine.begin_round(1, ["a", "b", "c"])
    assert engine.current is not None and engine.current.selected == ()
    with pytest.raises(Refused) as unsent:
        engine.submit(update("a", 1, [1.0, 1.0], 1))
    assert unsent.value.reason is Refusal.NOT_SELECTED and "holds no work for round 1" in str(unsent.value)
    for client in "abc":
        engine.dispatch(client)
    engine.submit(update("a", 1, [1.0, 1.0], 1))
    with pytest.raises(Refused) as twice:
        engine.submit(update("a", 1, [1.0, 1.0], 1))
    assert twice.value.reason is Refusal.NOT_SELECTED  # its work was taken; it holds none now
    assert not engine.can_dispatch("a") and engine.can_dispatch("c") and not engine.buffer_full()
    engine.submit(update("b", 1, [3.0, 3.0], 1))
    assert engine.buffer_full()
    with pytest.raises(Refused) as closing:  # arrived before the round loop closed the round: send again later
        engine.submit(update("c", 1, [5.0, 5.0], 1))
    assert closing.value.reason is Refusal.BUFFER_FULL and "buffer_size=2" in str(closing.value)
    engine.finish_round()
    engine.begin_round(2, [])
    engine.dispatch("a")
    engine.finish_round()  # nothing in: the global model does not move, but round 3 begins
    engine.begin_round(3, [])
    with pytest.raises(Refused) as stale:
        engine.submit(update("c", 1, [1.0, 1.0], 1))
    assert stale.value.reason is Refusal.STALE
    assert "2 rounds older than the current round 3; asynchronous.max_staleness is 1" in str(stale.value)


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "global" / "adapter_model.safetensors")


def test_fresh_buffers_of_every_client_equal_synchronous_fedavg_bit_for_bit(tmp_path):
    """K = clients, equal devices: every update is fresh, so FedBuff is exactly synchronous FedAvg."""
    synchronous = tiny_config(rounds=2)
    asynchronous = tiny_config(rounds=2, asynchronous={"buffer_size": 4})
    history = run_simulation(asynchronous, tmp_path / "async", show_progress=False)
    run_simulation(synchronous, tmp_path / "sync", show_progress=False)
    sync_adapter, async_adapter = adapter(tmp_path / "sync"), adapter(tmp_path / "async")
    assert sync_adapter.keys() == async_adapter.keys()
    assert all(torch.equal(sync_adapter[name], async_adapter[name]) for name in sync_adapter)
    assert [row.staleness_max for row in history[1:]] == [0.0, 0.0]


def test_slow_devices_do_not_hold_back_asynchronous_rounds(tmp_path):
    """Two of four clients at 0.3× speed: synchronous rounds wait for them; FedBuff with K = 2 aggregates
    the fast pair's work every 3 s and takes the slow pair's updates when they come, stale."""
    devices = {"classes": {"slow": {"share": 0.5, "speed": 0.3}}}
    synchronous = run_simulation(tiny_config(rounds=2, devices=devices), tmp_path / "sync", show_progress=False)
    asynchronous = run_simulation(tiny_config(rounds=4, devices=devices, asynchronous={"buffer_size": 2}),
                                  tmp_path / "async", show_progress=False)
    assert [row.sim_time_s for row in synchronous[1:]] == [10.0, 20.0]  # 3 steps at 0.3 steps/s
    assert [row.sim_time_s for row in asynchronous[1:]] == [3.0, 6.0, 9.0, 10.0]
    assert all(row.clients == 2 for row in asynchronous[1:])
    assert [row.staleness_max for row in asynchronous[1:]] == [0.0, 0.0, 0.0, 3.0]  # sent in round 1, taken in 4


def test_updates_staler_than_allowed_are_refused_and_counted(tmp_path):
    devices = {"classes": {"slow": {"share": 0.5, "speed": 0.3}}}
    history = run_simulation(tiny_config(rounds=4, devices=devices,
                                         asynchronous={"buffer_size": 2, "max_staleness": 2}),
                             tmp_path, show_progress=False)
    assert [row.stale_refused for row in history[1:]] == [0, 0, 0, 2]  # the slow pair, 3 rounds stale at t = 10
    assert [row.staleness_max for row in history[1:]] == [0.0, 0.0, 0.0, 0.0]


def test_asynchronous_rounds_give_the_same_model_with_forked_workers(tmp_path):
    devices = {"classes": {"slow": {"share": 0.5, "speed": 0.3}}}
    config = tiny_config(rounds=3, devices=devices, asynchronous={"buffer_size": 2})
    run_simulation(config, tmp_path / "one", show_progress=False)
    run_simulation(config.model_copy(update={"workers": 2}), tmp_path / "two", show_progress=False)
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert all(torch.equal(one[name], two[name]) for name in one)


def test_compressed_stale_updates_are_decoded_against_what_their_client_was_sent(tmp_path):
    """With [compression], each update is a delta against the global model its client got; a stale one
    must be decoded against that older model, not the current one, or the step would be wrong."""
    devices = {"classes": {"slow": {"share": 0.5, "speed": 0.3}}}
    config = tiny_config(rounds=4, devices=devices, asynchronous={"buffer_size": 2},
                         compression={"codec": "int8", "dense_below": 0})
    history = run_simulation(config, tmp_path / "compressed", show_progress=False)
    plain = run_simulation(config.model_copy(update={"compression": None}), tmp_path / "plain", show_progress=False)
    assert [row.staleness_max for row in history[1:]] == [0.0, 0.0, 0.0, 3.0]
    assert all(row.rejected == 0 and row.clients == 2 for row in history[1:])
    assert sum(row.bytes_up for row in history[1:]) < 0.35 * sum(row.bytes_up for row in plain[1:])
    compressed, reference = adapter(tmp_path / "compressed"), adapter(tmp_path / "plain")
    workspace = build_federation(config).workspace
    initial = workspace.get_tensors(reference)
    moved = sum(float((reference[name] - initial[name]).pow(2).sum()) for name in reference) ** 0.5
    apart = sum(float((compressed[name] - reference[name]).pow(2).sum()) for name in reference) ** 0.5
    assert apart < 0.1 * moved  # int8 error only (measured 1.4%); decoding on the current model instead: 59%


@pytest.mark.parametrize("overrides, named", [
    ({"strategy": "fedkseed", "asynchronous": {}}, "asynchronous: strategy 'fedkseed' cannot run asynchronously"),
    ({"strategy": "admm", "asynchronous": {}}, "asynchronous: strategy 'admm' cannot run asynchronously"),
    ({"asynchronous": {}, "dp": {"level": "client", "noise_multiplier": 1.0, "clipping_norm": 1.0}},
     "dp: differential privacy's accounting assumes synchronous"),
    ({"asynchronous": {"buffer_size": 0}}, "asynchronous.buffer_size"),
    ({"asynchronous": {"staleness_weight": "hinge"}}, "asynchronous.staleness_weight"),
])
def test_what_cannot_run_asynchronously_says_so_at_config_time(overrides, named):
    with pytest.raises((ConfigError, ValueError), match=named):
        tiny_config(**overrides)


def test_a_buffer_larger_than_the_federation_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="asynchronous.buffer_size: 5 updates per aggregation, but the run has 4"):
        run_simulation(tiny_config(asynchronous={"buffer_size": 5}), tmp_path, show_progress=False)
