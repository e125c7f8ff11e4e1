"""The noisy-link simulator (simulations/channel.py) and its use in fedsim's rounds."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog
from fedtune.simulations.channel import Channel
from fedtune.simulations.config import ChannelConfig, LinkConfig
from fedtune.simulations.runner import build_federation, run_round
from fedtune.strategies.api import ClientUpdate, Instruction
from tests.helpers import tiny_config


def noisy_channel(seed: int | None = None, **link) -> Channel:
    return Channel(ChannelConfig(downlink=LinkConfig(**link), uplink=LinkConfig(**link), seed=seed), run_seed=0)


def signal(numel: int = 200_000) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"w": 3.0 * torch.randn(numel, generator=generator)}


def test_off_by_default_is_the_identity():
    tensors = signal(10)
    for channel in (Channel(None, 0), Channel(ChannelConfig(), 0)):
        assert channel.transmit(tensors, 1, "client-000", "down") is tensors
        assert channel.transmit(tensors, 1, "client-000", "up") is tensors


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 30.0])
def test_snr_sets_the_measured_noise_variance(snr_db):
    tensors = signal()
    received = noisy_channel(snr_db=snr_db).transmit(tensors, 3, "client-001", "up")
    noise = received["w"] - tensors["w"]
    expected = float(tensors["w"].pow(2).mean()) / 10 ** (snr_db / 10)
    assert float(noise.var()) == pytest.approx(expected, rel=0.02)  # 2e5 samples: SE of a variance ≈ 0.3%
    assert abs(float(noise.mean())) < 5 * expected**0.5 / len(noise) ** 0.5


def test_fixed_variance_is_independent_of_the_signal():
    for scale in (0.01, 100.0):
        tensors = {"w": scale * signal()["w"]}
        received = noisy_channel(noise_variance=0.25).transmit(tensors, 1, "client-000", "down")
        assert float((received["w"] - tensors["w"]).var()) == pytest.approx(0.25, rel=0.02)


def test_noise_is_seeded_per_round_client_and_direction():
    tensors = signal(1000)
    channel = noisy_channel(snr_db=5.0)
    first = channel.transmit(tensors, 2, "client-000", "down")["w"]
    assert torch.equal(first, noisy_channel(snr_db=5.0).transmit(tensors, 2, "client-000", "down")["w"])
    others = [
        channel.transmit(tensors, 3, "client-000", "down")["w"],
        channel.transmit(tensors, 2, "client-001", "down")["w"],
        channel.transmit(tensors, 2, "client-000", "up")["w"],
        noisy_channel(seed=7, snr_db=5.0).transmit(tensors, 2, "client-000", "down")["w"],
    ]
    for other in others:
        assert not torch.equal(first, other)


def test_only_floating_point_tensors_are_noised_and_dtypes_are_kept():
    tensors = {
        "seeds": torch.arange(10, dtype=torch.int64),
        "half": torch.ones(10, dtype=torch.bfloat16),
        "double": torch.ones(10, dtype=torch.float64),
    }
    received = noisy_channel(noise_variance=1.0).transmit(tensors, 1, "client-000", "up")
    assert torch.equal(received["seeds"], tensors["seeds"])
    for name in ("half", "double"):
        assert received[name].dtype == tensors[name].dtype
        assert not torch.equal(received[name], tensors[name])


def test_loss_rate_drops_whole_messages_at_the_configured_rate():
    channel = noisy_channel(loss_rate=0.3)
    tensors = signal(4)
    outcomes = [channel.transmit(tensors, r, f"client-{c:03d}", "up") for r in range(100) for c in range(30)]
    lost = sum(outcome is None for outcome in outcomes) / len(outcomes)
    assert lost == pytest.approx(0.3, abs=4 * (0.3 * 0.7 / len(outcomes)) ** 0.5)
    delivered = next(outcome for outcome in outcomes if outcome is not None)
    assert torch.equal(delivered["w"], tensors["w"])  # loss only: what arrives is intact


def test_message_wrappers_keep_everything_but_the_tensors():
    channel = noisy_channel(noise_variance=1.0)
    instruction = Instruction(round=4, tensors=signal(8), settings={"x": 1})
    received = channel.downlink(instruction, "client-002")
    assert received.round == 4 and received.settings == {"x": 1}
    assert torch.equal(received.tensors["w"], channel.transmit(instruction.tensors, 4, "client-002", "down")["w"])
    update = ClientUpdate(client_id="client-002", round=4, num_examples=5, tensors=signal(8),
                          metrics={"train_loss": 1.0})
    delivered = channel.uplink(update)
    assert (delivered.client_id, delivered.num_examples, delivered.metrics) == ("client-002", 5, {"train_loss": 1.0})
    assert not torch.equal(delivered.tensors["w"], update.tensors["w"])


@pytest.mark.parametrize(
    "section, named",
    [
        ({"downlink": {"snr_db": 10, "noise_variance": 1.0}}, "channel.downlink"),
        ({"uplink": {"loss_rate": 1.0}}, "channel.uplink.loss_rate"),
        ({"uplink": {"noise_variance": -1.0}}, "channel.uplink.noise_variance"),
        ({"downlink": {"snr": 10}}, "channel.downlink.snr"),
    ],
)
def test_bad_channel_config_names_the_field(section, named):
    with pytest.raises(ValidationError) as error:
        tiny_config(channel=section)
    assert named in {".".join(map(str, item["loc"])) for item in error.value.errors()}


def test_lost_messages_in_fedsim_rounds(tmp_path):
    """A lost instruction: the client sits the round out (and idles); a lost update: not submitted.
    The clients counted per round are exactly those whose two messages both got through."""
    channel = {"downlink": {"loss_rate": 0.4}, "uplink": {"loss_rate": 0.4}}
    config = tiny_config(rounds=3, channel=channel, train={"local_steps": 1})
    federation = build_federation(config)
    idled: list[tuple[int, str]] = []
    for client in federation.clients.values():  # a spy on the idle hook
        client.idle = lambda workspace, round, data, cid=client.client_id: idled.append((round, cid))
    engine = RoundEngine(federation.server, federation.workspace, None, 8, MetricsLog(tmp_path))
    reference = Channel(config.channel, config.seed)
    probe = {"w": torch.zeros(1)}
    for round in (1, 2, 3):
        metrics = run_round(federation, engine, round)
        down_ok = {cid for cid in federation.clients if reference.transmit(probe, round, cid, "down") is not None}
        both_ok = {cid for cid in down_ok if reference.transmit(probe, round, cid, "up") is not None}
        assert metrics.clients == len(both_ok)
        assert sorted(cid for r, cid in idled if r == round) == sorted(set(federation.clients) - down_ok)
    assert idled, "with 40% loss over 12 instructions some client should have sat a round out"
