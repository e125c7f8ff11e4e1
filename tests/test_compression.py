"""The [compression] wrapper: negotiation, delta round trips through real strategies, error feedback,
rejection of bad payloads, resumable state, and exact bytes on the wire in fedsim."""

from __future__ import annotations

import io

import pytest
import torch
from pydantic import ValidationError

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog
from fedtune.protos.convert import wire_size
from fedtune.simulations.config import ConfigError, load_config
from fedtune.simulations.runner import Federation, build_federation, run_round, run_simulation
from fedtune.strategies.api import ClientUpdate, DeviceProfile, Instruction, InvalidInstruction, InvalidUpdate
from fedtune.strategies.codecs import CODEC_IDS, SUPPORTED_CODECS, CodecParams, decode, encode, encoded_size
from fedtune.strategies.compression import (
    ENCODED_SUFFIX,
    CodecSettings,
    CompressionClient,
    CompressionServer,
    Config,
    compress_with_feedback,
)
from tests.helpers import tiny_config

CLIENT = "client-000"


@pytest.fixture(scope="module")
def federation() -> Federation:
    federation = build_federation(
        tiny_config(compression={"codec": "int8"}, partition={"scheme": "iid", "num_clients": 3})
    )
    for client_id in federation.clients:
        federation.server.on_client_registered(client_id, DeviceProfile(codecs=SUPPORTED_CODECS))
    return federation


def fit(federation: Federation, server: CompressionServer, client: CompressionClient, round: int = 1):
    instruction = server.instruction(round, client.client_id)
    update = client.fit(federation.workspace, instruction, federation.data.clients[client.client_id])
    return instruction, update


def uncompressed_update(federation: Federation, client: CompressionClient, instruction: Instruction) -> ClientUpdate:
    """What the inner client sends for the same instruction (local training is seeded per round)."""
    _, inner_settings = CodecSettings.from_instruction(instruction)
    plain = instruction.model_copy(update={"settings": inner_settings})
    return client.inner.fit(federation.workspace, plain, federation.data.clients[client.client_id])


def with_blob(update: ClientUpdate, name: str, blob: torch.Tensor) -> ClientUpdate:
    return update.model_copy(update={"tensors": {**update.tensors, name: blob}})


# --- negotiation -------------------------------------------------------------------------------

def test_codec_is_chosen_by_client_then_compute_class_then_default_within_the_profile(federation):
    config = Config(codec="int8", by_compute_class={"phone": "topk_ternary"}, by_client={"c2": "int4"},
                    fallback=("int8", "fp16", "none"))
    server = CompressionServer(federation.server.inner, config)
    profiles = {
        "c0": DeviceProfile(codecs=SUPPORTED_CODECS),
        "c1": DeviceProfile(compute_class="phone", codecs=("none", "fp16", "topk_ternary")),
        "c2": DeviceProfile(codecs=("none", "int8")),
        "c3": DeviceProfile(compute_class="phone", codecs=("fp16",)),
        "c4": DeviceProfile(compute_class="phone", codecs=("bf16",)),
    }
    for client_id, profile in profiles.items():
        server.on_client_registered(client_id, profile)
    chosen = {client_id: server.codec_for(client_id) for client_id in [*profiles, "never-registered"]}
    assert chosen == {"c0": "int8", "c1": "topk_ternary", "c2": "int8", "c3": "fp16", "c4": "none",
                      "never-registered": "none"}
    assert server.instruction(1, "c1").settings["compression.codec"] == "topk_ternary"


def test_config_takes_codec_names_from_the_codec_table():
    config = Config(codec="topk_ternary", by_client={"c": "int4"}, fallback=("fp16", "none"), downlink="int8")
    assert config.codec == "topk_ternary" and config.downlink == "int8"
    with pytest.raises(ValidationError, match="by_client.c"):
        Config(by_client={"c": "int3"})
    with pytest.raises(ValidationError, match="downlink"):
        Config(downlink="topk")  # sparse: without error feedback the global model would lose its small values


def test_downlink_codec_is_used_only_for_clients_that_list_it(federation):
    server = CompressionServer(federation.server.inner, Config(downlink="fp16"))
    server.on_client_registered("new", DeviceProfile(codecs=("none", "fp16")))
    server.on_client_registered("old", DeviceProfile(codecs=("none",)))
    new, old = server.instruction(1, "new"), server.instruction(1, "old")
    assert all(name.endswith(ENCODED_SUFFIX) and t.dtype == torch.uint8 for name, t in new.tensors.items())
    assert old.tensors.keys() == federation.server.inner.instruction(1, "old").tensors.keys()
    plain = federation.server.inner.instruction(1, "old").tensors
    assert sum(t.numel() for t in new.tensors.values()) == sum(2 * t.numel() + 12 + 4 * t.dim() for t in plain.values())
    assert wire_size(new) < 0.55 * wire_size(old)


# --- round trips through a real strategy ---------------------------------------------------------

def test_int8_update_decodes_to_the_trained_tensors_within_half_a_step(federation):
    server, client = federation.server, CompressionClient(federation.clients[CLIENT].inner)
    instruction, update = fit(federation, server, client)
    plain = uncompressed_update(federation, client, instruction)
    assert update.tensors.keys() == {name + ENCODED_SUFFIX for name in plain.tensors}
    assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in update.tensors.values())
    assert wire_size(update) < 0.3 * wire_size(plain)

    server.validate_update(update, 1)
    decoded = server.decode_update(update, 1)
    for name, trained in plain.tensors.items():
        delta = trained - instruction.tensors[name]
        step = delta.abs().max() / 127  # an upper bound of every block's scale
        assert decoded.tensors[name].dtype == trained.dtype
        assert (decoded.tensors[name] - trained).abs().max() <= step / 2 + 1e-6, name
        sent_delta = decoded.tensors[name] - instruction.tensors[name]
        torch.testing.assert_close(client.residual[name], delta - sent_delta, atol=1e-6, rtol=0)


def test_tensors_below_dense_below_go_as_fp16_and_the_rest_with_the_codec():
    small = build_federation(tiny_config(compression={"codec": "topk", "density": 0.1, "dense_below": 1000}))
    client = small.clients[CLIENT]
    small.server.on_client_registered(CLIENT, DeviceProfile(codecs=SUPPORTED_CODECS))
    instruction, update = fit(small, small.server, client)
    plain = uncompressed_update(small, client, instruction)
    codecs = {name: int(update.tensors[name + ENCODED_SUFFIX][1]) for name in plain.tensors}  # blob byte 1: codec id
    want = {name: CODEC_IDS["fp16" if tensor.numel() < 1000 else "topk"] for name, tensor in plain.tensors.items()}
    assert codecs == want and len(set(want.values())) == 2
    decoded = small.server.decode_update(update, 1)
    for name, trained in plain.tensors.items():
        if trained.numel() < 1000:  # fp16 keeps the small tensors to within fp16 rounding of the delta
            delta = trained - instruction.tensors[name]
            assert (decoded.tensors[name] - trained).abs().max() <= delta.abs().max() * 2**-10 + 1e-7, name


def test_fp16_beyond_its_range_goes_as_bf16_instead_of_failing_the_round():
    delta = torch.tensor([[1e6, -3.0], [0.5, 70000.0]])
    blob, residual = compress_with_feedback(delta, None, "fp16", CodecParams(), "big", None)
    assert int(blob[1]) == CODEC_IDS["bf16"]
    decoded = decode(blob, name="big")
    assert torch.allclose(decoded, delta, rtol=2**-8, atol=0)
    assert torch.equal(residual, delta - decoded)  # error feedback keeps what bf16 rounded away
    in_range, _ = compress_with_feedback(delta / 100, None, "fp16", CodecParams(), "small", None)
    assert int(in_range[1]) == CODEC_IDS["fp16"]


def test_ffa_lora_with_ternary_updates_and_fp16_downlink_trains_a_round(tmp_path):
    config = tiny_config(strategy="ffa_lora", partition={"scheme": "iid", "num_clients": 2},
                         compression={"codec": "topk_ternary", "density": 0.05, "downlink": "fp16"})
    federation = build_federation(config)
    for client_id in federation.clients:
        federation.server.on_client_registered(client_id, DeviceProfile(codecs=SUPPORTED_CODECS))
    before = federation.server.inner.global_tensors
    assert all("lora_B" in name and torch.count_nonzero(t) == 0 for name, t in before.items())
    engine = RoundEngine(federation.server, federation.workspace, None, 8, MetricsLog(tmp_path))
    metrics = run_round(federation, engine, 1)
    assert metrics.clients == 2 and metrics.rejected == 0
    # B starts at 0 (exact in fp16), so the new global is the mean of two ternary deltas: non-zero on
    # at most 2k = 2 * ceil(5% of numel) positions of each tensor, and on some
    after = federation.server.inner.global_tensors
    for name, tensor in after.items():
        assert 0 < torch.count_nonzero(tensor) <= 2 * -(-tensor.numel() * 5 // 100), name


def test_a_client_negotiated_to_none_sends_and_gets_plain_tensors(federation):
    server = CompressionServer(federation.server.inner, Config(codec="int4", fallback=()))
    client = CompressionClient(federation.clients[CLIENT].inner)
    server.on_client_registered(CLIENT, DeviceProfile(codecs=("none",)))
    instruction, update = fit(federation, server, client)
    assert update.tensors.keys() == instruction.tensors.keys()
    server.validate_update(update, 1)
    assert server.decode_update(update, 1) is update and client.residual == {}


# --- error feedback ----------------------------------------------------------------------------

@pytest.mark.parametrize("codec, density", [("topk", 0.1), ("topk_ternary", 0.1), ("int4", 1.0)])
def test_error_feedback_makes_the_decoded_sum_track_the_true_sum(codec, density):
    generator = torch.Generator().manual_seed(0)
    drift = torch.randn(64, 32, generator=generator) * 0.01
    params = CodecParams(density=density, block_size=64)
    totals = {"true": torch.zeros(64, 32), "with_ef": torch.zeros(64, 32), "without_ef": torch.zeros(64, 32)}
    residual, norms = None, []
    for _ in range(300):
        delta = drift + torch.randn(64, 32, generator=generator) * 0.01
        blob, residual = compress_with_feedback(delta, residual, codec, params, "w", None)
        totals["true"] += delta
        totals["with_ef"] += decode(blob)
        totals["without_ef"] += decode(encode(codec, delta, params))
        norms.append(float(residual.norm()))
    # the identity behind error feedback: what was sent is what was trained minus what is still held back
    torch.testing.assert_close(totals["with_ef"], totals["true"] - residual, atol=1e-4, rtol=0)
    assert max(norms[150:]) <= 1.25 * max(norms[:150]) <= 5 * float(delta.norm())  # bounded, not growing
    relative = {key: float((totals[key] - totals["true"]).norm() / totals["true"].norm()) for key in totals}
    assert relative["with_ef"] < 0.05
    assert relative["with_ef"] < relative["without_ef"] / 10


def test_client_residual_and_server_profiles_survive_a_state_round_trip(federation):
    client = CompressionClient(federation.clients[CLIENT].inner)
    fit(federation, federation.server, client)
    buffer = io.BytesIO()
    torch.save({"client": client.state_dict(), "server": federation.server.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    restored = CompressionClient(federation.clients[CLIENT].inner)
    restored.load_state_dict(saved["client"])
    assert restored.residual.keys() == client.residual.keys() and client.residual
    assert all(torch.equal(restored.residual[n], client.residual[n]) for n in client.residual)
    server = CompressionServer(federation.server.inner, federation.server.compression)
    server.load_state_dict(saved["server"])
    assert server.profiles == federation.server.profiles and server.codec_for(CLIENT) == "int8"


# --- bad payloads ------------------------------------------------------------------------------

def test_corrupted_truncated_or_misshapen_payloads_are_rejected_by_name(federation):
    server, client = federation.server, federation.clients["client-001"]
    _, update = fit(federation, server, client)
    name = sorted(update.tensors)[0]
    plain_name = name.removesuffix(ENCODED_SUFFIX)
    flipped = update.tensors[name].clone()
    flipped[-1] ^= 0x01
    cases = {
        "CRC mismatch": with_blob(update, name, flipped),
        r"bytes, expected": with_blob(update, name, update.tensors[name][:-3]),
        "decodes to shape": with_blob(update, name, encode("int8", torch.zeros(3, 3))),
    }
    for reason, bad in cases.items():
        with pytest.raises(InvalidUpdate, match=f"'client-001'.*{plain_name!r}.*{reason}"):
            server.validate_update(bad, 1)
    raw = {**update.tensors}
    del raw[name]
    raw[plain_name] = torch.zeros(2)
    with pytest.raises(InvalidUpdate, match=r"'client-001'.*missing tensor"):
        server.validate_update(update.model_copy(update={"tensors": raw}), 1)
    server.validate_update(update, 1)  # the intact reply is still accepted


def test_instruction_without_codec_settings_is_refused_by_name(federation):
    client = federation.clients[CLIENT]
    instruction = federation.server.instruction(1, CLIENT)
    bare = instruction.model_copy(update={"settings": {}})
    with pytest.raises(InvalidInstruction, match="compression.codec"):
        client.fit(federation.workspace, bare, federation.data.clients[CLIENT])


def test_config_errors_name_the_compression_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('strategy = "fedavg_lora"\n[compression]\ncodec = "int3"\n')
    with pytest.raises(ConfigError, match="compression.codec"):
        load_config(path)
    path.write_text('strategy = "fedavg_lora"\n[compression]\ndensity = 0\n')
    with pytest.raises(ConfigError, match="compression.density"):
        load_config(path)


# --- fedsim end to end -------------------------------------------------------------------------

def plain_update_size(federation: Federation, client_id: str, round: int) -> int:
    """Protobuf bytes of an uncompressed reply with a real reply's metrics (sizes do not depend on the float values)."""
    specs = federation.server.inner.update_specs()
    update = ClientUpdate(client_id=client_id, round=round, num_examples=len(federation.data.clients[client_id]),
                          tensors={n: torch.zeros(s.shape, dtype=s.dtype) for n, s in specs.items()},
                          metrics={"train_loss": 1.0, "local_steps": 1.0})
    return wire_size(update)


def int8_update_size(federation: Federation, client_id: str, round: int, block_size: int) -> int:
    """Protobuf bytes of an int8 reply: blob sizes are fixed by shape and block size."""
    specs = federation.server.inner.update_specs()
    tensors = {n + ENCODED_SUFFIX: torch.zeros(encoded_size("int8", s.shape, block_size), dtype=torch.uint8)
               for n, s in specs.items()}
    update = ClientUpdate(client_id=client_id, round=round, num_examples=len(federation.data.clients[client_id]),
                          tensors=tensors, metrics={"train_loss": 1.0, "local_steps": 1.0})
    return wire_size(update)


def test_fedsim_with_int8_reports_exact_smaller_bytes_up_and_still_learns(tmp_path):
    config = tiny_config(rounds=3, train={"local_steps": 8}, compression={"codec": "int8", "block_size": 32})
    history = run_simulation(config, tmp_path, show_progress=False)
    federation = build_federation(config)
    clients = sorted(federation.clients)
    for metrics in history[1:]:
        assert metrics.clients == len(clients) and metrics.rejected == 0
        expected = sum(int8_update_size(federation, cid, metrics.round, 32) for cid in clients)
        assert metrics.bytes_up == expected
        uncompressed = sum(plain_update_size(federation, cid, metrics.round) for cid in clients)
        assert metrics.bytes_up < 0.35 * uncompressed  # int8 + scales per 32 values + long names
    assert history[-1].eval_loss < history[0].eval_loss - 0.1
    assert history[-1].eval_accuracy > history[0].eval_accuracy


def test_fedsim_devices_section_negotiates_per_client(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'strategy = "fedavg_lora"\n'
        '[compression]\ncodec = "int8"\nby_compute_class = { phone = "topk_ternary" }\n'
        '[devices.clients.client-001]\ncompute_class = "phone"\ncodecs = ["none", "topk_ternary"]\n'
        '[devices.clients.client-002]\ncodecs = ["none"]\n'
    )
    federation = build_federation(load_config(path))
    server = federation.server
    assert [server.codec_for(cid) for cid in sorted(federation.clients)] == ["int8", "topk_ternary", "none", "int8"]
    with pytest.raises(ValueError, match="devices.*'client-999'"):
        build_federation(load_config(path, {"devices": {"clients": {"client-999": {}}}}))
