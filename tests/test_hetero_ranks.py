"""Adapters of different shapes per device: HetLoRA, rank-sliced averaging, FlexLoRA, FFA-LoRA across ranks,
the capacity policy and its memory estimate (docs/algorithms.md §5.3, §6.7 checks 3 and 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedtune.simulations.config import ConfigError
from fedtune.simulations.runner import Federation, build_federation, run_simulation
from fedtune.strategies.api import ClientUpdate, DeviceProfile, InvalidUpdate, Refusal, Refused
from fedtune.strategies.ffa_lora import frozen_names
from fedtune.strategies.flexlora import redistribute
from fedtune.strategies.hetlora import PRUNED_RANK, tail_share
from fedtune.strategies.lora_shapes import RANK_SETTING, padded_mean, shape_of, training_memory_bytes
from fedtune.strategies.peft_lora import AdapterShape, is_lora_a, is_lora_b, layer_of, truncate, zero_pad
from tests.helpers import tiny_config

CLASSES = {"phone": {"rank": 2, "depth": 1}, "laptop": {"rank": 4}, "workstation": {"rank": 8}}
DEVICES = {"classes": {"phone": {"share": 0.34}, "laptop": {"share": 0.33}, "workstation": {"share": 0.33}}}


def hetero_config(strategy: str, classes: dict[str, dict[str, int]] = CLASSES, **overrides: Any):
    options = {"rank": 8, "capacity": {"by_compute_class": classes}, **overrides.pop("options", {})}
    return tiny_config(strategy=strategy, options=options, partition={"num_clients": 6}, devices=DEVICES,
                       **overrides)


def random_update(federation: Federation, client_id: str, seed: int, num_examples: int = 10) -> ClientUpdate:
    """An update of exactly the tensors `client_id` was told to send, with seeded random values."""
    generator = torch.Generator().manual_seed(seed)
    specs = federation.server.client_update_specs(client_id)
    tensors = {name: torch.randn(spec.shape, generator=generator, dtype=spec.dtype) for name, spec in specs.items()}
    return ClientUpdate(client_id=client_id, round=1, num_examples=num_examples, tensors=tensors)


# -- §6.7.3: zero-padding and truncation are exact ------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_zero_padding_leaves_b_times_a_bit_identical_and_truncation_recovers_the_factors(rank: int):
    generator = torch.Generator().manual_seed(rank)
    a, b = torch.randn(rank, 48, generator=generator), torch.randn(32, rank, generator=generator)
    a_name, b_name = "m.layers.0.q.lora_A.weight", "m.layers.0.q.lora_B.weight"
    padded_a, padded_b = zero_pad(a_name, a, 8), zero_pad(b_name, b, 8)
    assert padded_a.shape == (8, 48) and padded_b.shape == (32, 8)
    assert torch.equal(padded_b @ padded_a, b @ a)
    assert torch.equal(truncate(a_name, padded_a, rank), a) and torch.equal(truncate(b_name, padded_b, rank), b)


def test_padded_mean_of_equal_ranks_is_the_weighted_mean_and_rank_sliced_averages_each_slice_over_its_holders():
    previous = torch.zeros(4, 6)
    low, high = torch.ones(2, 6), torch.full((4, 6), 3.0)
    name = "m.layers.0.q.lora_A.weight"
    zero_padded = padded_mean(name, previous, [low, high], [1.0, 1.0], per_slice=False)
    assert torch.equal(zero_padded[:2], torch.full((2, 6), 2.0))  # (1 + 3) / 2
    assert torch.equal(zero_padded[2:], torch.full((2, 6), 1.5))  # (0 + 3) / 2: diluted by the padding
    sliced = padded_mean(name, previous, [low, high], [1.0, 1.0], per_slice=True)
    assert torch.equal(sliced[2:], torch.full((2, 6), 3.0))  # only the rank-4 client holds these rows
    # a component nobody sent keeps its value
    kept = padded_mean(name, torch.full((4, 6), 7.0), [low], [1.0], per_slice=True)
    assert torch.equal(kept[:2], low) and torch.equal(kept[2:], torch.full((2, 6), 7.0))


# -- §6.7.4: FlexLoRA redistribution ---------------------------------------------------------------------------


def test_flexlora_redistribution_is_exact_when_the_rank_allows_and_eckart_young_otherwise():
    generator = torch.Generator().manual_seed(0)
    factors = [(torch.randn(40, r, generator=generator, dtype=torch.float64),
                torch.randn(r, 30, generator=generator, dtype=torch.float64)) for r in (2, 3)]
    delta = sum(0.5 * b @ a for b, a in factors)  # rank 5
    b, a, sigma = redistribute(delta, 5)
    assert torch.allclose(b @ a, delta, atol=1e-10)
    for rank in (1, 3, 4):
        b, a, sigma = redistribute(delta, rank)
        error = torch.linalg.matrix_norm(delta - b @ a)
        assert float(error) == pytest.approx(float(sigma[rank:].square().sum().sqrt()), rel=1e-9)
    b, a, _ = redistribute(delta, 8)  # above the matrix rank: zero components, still exact
    assert b.shape == (40, 8) and a.shape == (8, 30) and torch.allclose(b @ a, delta, atol=1e-10)


def test_flexlora_server_gives_each_client_the_best_approximation_of_its_rank():
    federation = build_federation(hetero_config("flexlora"))
    server = federation.server
    updates = [random_update(federation, cid, seed) for seed, cid in enumerate(sorted(federation.clients))]
    server.aggregate(1, updates)
    scale = 1.0  # every shape shares alpha / rank: it cancels in the comparison
    for client_id in federation.clients:
        shape = server.shape(client_id)
        sent = server.instruction(2, client_id).tensors
        for a_name in [name for name in sent if is_lora_a(name)]:
            b_name = a_name.replace(".lora_A.", ".lora_B.")
            holders = [u for u in updates if a_name in u.tensors]
            total = sum(u.num_examples for u in holders)
            delta = sum((u.num_examples / total) * u.tensors[b_name].double() @ u.tensors[a_name].double()
                        for u in holders)
            sigma = torch.linalg.svdvals(delta)
            error = torch.linalg.matrix_norm(delta - scale * sent[b_name].double() @ sent[a_name].double())
            assert sent[a_name].shape[0] == shape.rank
            assert float(error) == pytest.approx(float(sigma[shape.rank:].square().sum().sqrt()), rel=1e-4, abs=1e-5)
    assert 0 < server.round_metrics()["flexlora_residual"] < 1


# -- the policy, the instructions and the replies ---------------------------------------------------------------


def test_each_device_class_is_told_its_shape_and_sent_exactly_the_truncated_global_adapter():
    federation = build_federation(hetero_config("hetlora"))
    server, workspace = federation.server, federation.workspace
    layers = workspace.layer_count()
    seen = set()
    for client_id in federation.clients:
        compute_class = server.compute_classes[client_id]
        want = AdapterShape(**CLASSES[compute_class])
        instruction = server.instruction(1, client_id)
        assert shape_of(instruction) == want == server.shape(client_id)
        for name, tensor in instruction.tensors.items():
            assert torch.equal(tensor, truncate(name, server.global_tensors[name], want.rank))
            if is_lora_a(name) or is_lora_b(name):
                assert min(tensor.shape) == want.rank
        lora_layers = {layer for name in instruction.tensors if (layer := layer_of(name)) is not None}
        assert lora_layers == (set(range(layers)) if want.depth is None else set(range(layers - want.depth, layers)))
        seen.add(compute_class)
        # the client trains that shape and sends it back
        update = federation.clients[client_id].fit(workspace, instruction, federation.data.clients[client_id])
        server.validate_update(update, 1)
        assert {name: tuple(t.shape) for name, t in update.tensors.items()} == {
            name: tuple(t.shape) for name, t in instruction.tensors.items()}
    assert seen == set(CLASSES)


def test_an_update_of_another_shape_than_told_is_rejected_naming_the_tensor():
    federation = build_federation(hetero_config("hetlora"))
    phone = next(cid for cid, cls in federation.server.compute_classes.items() if cls == "phone")
    laptop = next(cid for cid, cls in federation.server.compute_classes.items() if cls == "laptop")
    wrong = random_update(federation, laptop, 0).model_copy(update={"client_id": phone})
    with pytest.raises(InvalidUpdate, match=r"update from '.*': (unexpected tensor|tensor '.*' has shape)"):
        federation.server.validate_update(wrong, 1)


def test_a_device_too_small_for_any_shape_is_refused_naming_the_memory_reported_and_needed():
    federation = build_federation(hetero_config("hetlora", options={"capacity": {"fit_memory": True}}))
    server = federation.server
    with pytest.raises(Refused) as refusal:
        server.on_client_registered("tiny-device", DeviceProfile(memory_mb=1, compute_class="watch"))
    assert refusal.value.reason is Refusal.DEVICE_TOO_SMALL
    needed = server.estimate_mb(server.candidates()[-1])["total"]
    assert "memory_mb = 1" in str(refusal.value) and f"{needed} MiB" in str(refusal.value)
    assert "tiny-device" not in server.shapes


def test_fit_memory_gives_the_largest_shape_whose_estimate_fits():
    """Batches of 64 × 128 tokens, so that the shapes' estimates differ by whole MiB on the tiny model."""
    candidates = [{"rank": 1}, {"rank": 8, "depth": 1}, {"rank": 8}, {"rank": 1, "depth": 1}]
    config = hetero_config("hetlora", options={"capacity": {"fit_memory": True, "candidates": candidates}},
                           model={"max_length": 128}, train={"batch_size": 64})
    server = build_federation(config).server
    ordered = server.candidates()
    assert [(shape.rank, shape.depth) for shape in ordered] == [(8, None), (1, None), (8, 1), (1, 1)]
    estimates = [server.estimate_mb(shape)["total"] for shape in ordered]
    assert estimates == sorted(set(estimates), reverse=True)  # distinct, largest first
    for shape, needed in zip(ordered, estimates, strict=True):
        server.on_client_registered("device", DeviceProfile(memory_mb=needed, compute_class="unlisted"))
        assert server.shape("device") == shape
    server.on_client_registered("unknown-memory", DeviceProfile(compute_class="unlisted"))
    assert server.shape("unknown-memory") == AdapterShape(rank=8)
    default = build_federation(hetero_config("hetlora", options={"capacity": {"fit_memory": True}})).server
    assert [shape.rank for shape in default.candidates()] == [8, 4, 2, 1]


def test_the_memory_estimate_grows_with_rank_and_depth_and_counts_activations_of_the_trained_layers_only():
    federation = build_federation(tiny_config(strategy="hetlora", options={"rank": 8}))
    workspace, batch = federation.workspace, 8
    full = training_memory_bytes(workspace, AdapterShape(rank=8), batch)
    low = training_memory_bytes(workspace, AdapterShape(rank=2), batch)
    shallow = training_memory_bytes(workspace, AdapterShape(rank=8, depth=1), batch)
    trainable = sum(p.numel() * 4 for p in workspace.parameters_for(workspace.wire_names))
    assert full["optimizer"] == 3 * trainable  # a gradient and AdamW's two moments per adapter value
    assert shallow["activations"] < full["activations"]  # backward stops at the lowest trained layer
    assert low["total"] < full["total"] and workspace.active_shape == workspace.full_shape


def test_the_policy_rejects_shapes_above_the_runs_rank_or_depth_at_config_time():
    with pytest.raises(ValueError, match=r"capacity.by_compute_class.phone.rank: 16 is above the run's rank 8"):
        hetero_config("hetlora", classes={"phone": {"rank": 16}})
    with pytest.raises(ConfigError, match="options.capacity: depth 5 is above the model's 2 LoRA layers"):
        build_federation(hetero_config("hetlora", classes={"phone": {"rank": 2, "depth": 5}}))


def test_fedsim_leaves_out_a_device_class_that_cannot_fit_and_refuses_a_run_where_none_can():
    devices = {"classes": {"phone": {"share": 0.5, "memory_mb": 1}, "laptop": {"share": 0.5}}}
    config = tiny_config(strategy="hetlora", options={"rank": 8, "capacity": {"by_compute_class": CLASSES}},
                         partition={"num_clients": 4}, devices=devices)
    federation = build_federation(config)
    assert sorted(federation.server.compute_classes.values()) == ["laptop", "laptop"]
    assert len(federation.clients) == 2 and set(federation.data.clients) == set(federation.clients)
    everyone_small = tiny_config(strategy="hetlora", options={"rank": 8}, devices={"classes": {"phone": {
        "share": 1.0, "memory_mb": 1}}})
    with pytest.raises(ConfigError, match="no client can take part"):
        build_federation(everyone_small)


def test_wrappers_that_need_one_shape_refuse_a_capacity_policy():
    with pytest.raises(TypeError, match="client-level DP clips every update against one global adapter"):
        build_federation(hetero_config("ffa_lora", dp={"level": "client", "clipping_norm": 1.0,
                                                        "noise_multiplier": 0.0}))
    with pytest.raises(Exception, match="FedBuff cannot rebase"):
        hetero_config("hetlora", asynchronous={"buffer_size": 2})


# -- aggregation across shapes ------------------------------------------------------------------------------------


def test_ffa_lora_across_ranks_uses_the_first_rows_of_one_frozen_a_and_averages_updates_exactly():
    federation = build_federation(hetero_config("ffa_lora"))
    server, workspace = federation.server, federation.workspace
    full_a = workspace.get_tensors(frozen_names(workspace))
    workspace.use_shape(AdapterShape(rank=2, depth=1))
    for name, tensor in workspace.get_tensors(frozen_names(workspace)).items():
        assert torch.equal(tensor, full_a[name][:2])
    workspace.use_shape(workspace.full_shape)
    updates = [random_update(federation, cid, seed) for seed, cid in enumerate(sorted(federation.clients))]
    server.aggregate(1, updates)
    for a_name, a in full_a.items():
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        holders = [u for u in updates if b_name in u.tensors]
        total = sum(u.num_examples for u in holders)
        want = sum((u.num_examples / total) * u.tensors[b_name].double() @ a[: u.tensors[b_name].shape[1]].double()
                   for u in holders)
        assert torch.allclose(server.global_tensors[b_name].double() @ a.double(), want, atol=1e-6)


def test_hetlora_norm_weighting_weights_each_module_by_its_update_norm():
    federation = build_federation(hetero_config("hetlora", classes={"laptop": {"rank": 8}},
                                                options={"weighting": "norm"}))
    server = federation.server
    first, second = sorted(federation.clients)[:2]
    big, small = random_update(federation, first, 0), random_update(federation, second, 1)
    scaled = {n: t * (0.1 if is_lora_b(n) else 1.0) for n, t in small.tensors.items()}
    small = small.model_copy(update={"tensors": scaled})
    server.aggregate(1, [big, small])
    name = next(n for n in big.tensors if is_lora_b(n))
    a_name = name.replace(".lora_B.", ".lora_A.")
    norm = [float(torch.linalg.matrix_norm(u.tensors[name].double() @ u.tensors[a_name].double()))
            for u in (big, small)]
    want = (norm[0] * big.tensors[name].double() + norm[1] * small.tensors[name].double()) / sum(norm)
    assert torch.allclose(server.global_tensors[name].double(), want, atol=1e-6)


def test_self_pruning_shrinks_a_clients_rank_when_its_tail_is_small_and_checks_the_reported_rank():
    federation = build_federation(hetero_config("hetlora", classes={"laptop": {"rank": 8}},
                                                options={"self_prune": True}))
    server = federation.server
    client_id = sorted(federation.clients)[0]
    update = random_update(federation, client_id, 0)
    tensors = {name: zero_pad(name, truncate(name, t, 2), 8) for name, t in update.tensors.items()}
    assert tail_share(tensors, 4) == 0.0 and tail_share(update.tensors, 4) > 0.3
    pruned = update.model_copy(update={"tensors": tensors, "metrics": {PRUNED_RANK: 4.0}})
    server.validate_update(pruned, 1)
    server.aggregate(1, [pruned])
    assert server.shape(client_id).rank == 4 and server.instruction(2, client_id).settings[RANK_SETTING] == 4
    told = server.instruction(2, client_id).tensors
    too_high = update.model_copy(update={"round": 2, "tensors": told, "metrics": {PRUNED_RANK: 6.0}})
    with pytest.raises(InvalidUpdate, match=f"metric '{PRUNED_RANK}' must be a whole number from 1 to its rank 4"):
        server.validate_update(too_high, 2)


def test_a_homogeneous_run_through_the_heterogeneous_path_is_fedavg_lora_bit_for_bit(tmp_path: Path):
    full = {"laptop": {"rank": 8}, "phone": {"rank": 8}, "workstation": {"rank": 8}}
    runs = {"fedavg_lora": tiny_config(strategy="fedavg_lora", options={"rank": 8}, partition={"num_clients": 6},
                                       devices=DEVICES),
            "hetlora": hetero_config("hetlora", classes=full),
            "rank_sliced": hetero_config("hetlora", classes=full, options={"aggregation": "rank_sliced"})}
    results = {}
    for name, config in runs.items():
        run_simulation(config, tmp_path / name, show_progress=False)
        results[name] = load_file(tmp_path / name / "global" / "adapter_model.safetensors")
    for name in ("hetlora", "rank_sliced"):
        assert results[name].keys() == results["fedavg_lora"].keys()
        assert all(torch.equal(results[name][k], results["fedavg_lora"][k]) for k in results[name]), name


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "ffa_lora"])
def test_three_device_classes_train_and_save_a_peft_adapter_at_the_global_rank(strategy: str, tmp_path: Path):
    config = hetero_config(strategy, rounds=2, options={"aggregation": "rank_sliced"} if strategy == "hetlora" else {})
    rows = run_simulation(config, tmp_path, show_progress=False)
    saved = load_file(tmp_path / "global" / "adapter_model.safetensors")
    assert all(t.shape[0] == 8 for n, t in saved.items() if is_lora_a(n))
    last = rows[-1].model_dump()
    up = {cls: last[f"payload_up.{cls}"] for cls in CLASSES}
    assert up["phone"] < up["laptop"] < up["workstation"]  # bytes scale with each class's shape
    assert rows[-1].eval_loss < rows[0].eval_loss


# -- over gRPC: the same strategy objects, real fedserver and fedclient processes -------------------------------

GRPC_CLASSES = {"client-000": "phone", "client-001": "laptop", "client-002": "workstation"}


@pytest.mark.e2e
def test_three_device_classes_over_grpc_end_with_fedsims_global_adapter(tmp_path: Path):
    """FlexLoRA (hetlora and ffa_lora share its per-client instructions and checks; fedsim tests cover their
    aggregation)."""
    from tests.test_transport import (
        CLIENTS,
        assert_same_tensors,
        fedsim_run,
        finish,
        init_run,
        run_config,
        start_client,
        start_server,
        stored,
        write_partitions,
    )

    options = {"rank": 8, "capacity": {"by_compute_class": CLASSES}}
    config = run_config("flexlora", options=options)
    simulated = {**config, "devices": {"clients": {cid: {"compute_class": cls} for cid, cls in GRPC_CLASSES.items()}}}
    tokens = init_run(tmp_path / "run", len(CLIENTS))
    files = write_partitions(config, tmp_path)
    server = start_server(tmp_path, config, {"min_clients": 3})
    clients = [start_client(server, tmp_path, cid, files[cid], token, ["--compute-class", GRPC_CLASSES[cid]])
               for cid, token in zip(CLIENTS, tokens, strict=True)]
    want = fedsim_run(simulated, tmp_path / "fedsim")
    finish(clients, tmp_path)
    assert server.wait(60) == 0, server.output()[-3000:]
    rows = server.metrics()
    assert [row["clients"] for row in rows] == [0, 3, 3]
    for key in [f"payload_{direction}.{cls}" for direction in ("up", "down") for cls in CLASSES]:
        assert [row.get(key) for row in rows] == [row.get(key) for row in want.metrics], key
    assert rows[-1]["payload_up.phone"] < rows[-1]["payload_up.laptop"] < rows[-1]["payload_up.workstation"]
    assert_same_tensors(server.global_model(), want.global_model)
    profiles = {record.client_id: record.profile for record in stored(server.run_dir, lambda store: store.clients())}
    assert {cid: profile.compute_class for cid, profile in profiles.items()} == GRPC_CLASSES
    assert all(p.step_ms > 0 and p.memory_mb > 0 and p.threads == 1 for p in profiles.values())  # measured


@pytest.mark.e2e
def test_a_device_too_small_is_refused_at_registration_and_the_server_keeps_serving(tmp_path: Path):
    from tests.test_transport import CLIENTS, finish, init_run, run_config, start_client, start_server, write_partitions

    config = run_config("hetlora", options={"rank": 8, "capacity": {"fit_memory": True}}, rounds=1)
    tokens = init_run(tmp_path / "run", len(CLIENTS))
    files = write_partitions(config, tmp_path)
    server = start_server(tmp_path, config, {"min_clients": 2})
    small = start_client(server, tmp_path, "client-002", files["client-002"], tokens[2], ["--memory-mb", "1"])
    assert small.wait(120) != 0
    log = (tmp_path / "client-002.log").read_text()
    assert "reports memory_mb = 1, but training its adapter r1 (the smallest candidate) needs" in log, log[-2000:]
    clients = [start_client(server, tmp_path, cid, files[cid], token, ["--memory-mb", "100000"])
               for cid, token in zip(CLIENTS[:2], tokens[:2], strict=True)]
    finish(clients, tmp_path)
    assert server.wait(60) == 0, server.output()[-3000:]
    assert [row["clients"] for row in server.metrics()] == [0, 2]


# -- what a device reports ------------------------------------------------------------------------------------------


def test_fedclient_measures_what_its_flags_leave_out_and_keeps_what_they_give():
    from argparse import Namespace

    from fedtune.fedclient.cli import device_profile

    measured = device_profile(Namespace(memory_mb=None, compute_class="phone", device=None), ("none",))
    assert measured.memory_mb > 0 and measured.threads == torch.get_num_threads() and measured.compute_class == "phone"
    given = device_profile(Namespace(memory_mb=1500, compute_class="cpu", device=None), ("none",))
    assert given.memory_mb == 1500
    assert device_profile(Namespace(memory_mb=0, compute_class="cpu", device=None), ("none",)).memory_mb == 0


def test_the_timed_training_step_changes_nothing_in_the_model():
    from fedtune.fedclient.probe import time_training_step

    federation = build_federation(tiny_config(strategy="hetlora"))
    workspace, client_id = federation.workspace, "client-000"
    before = {name: tensor.clone() for name, tensor in workspace.model.state_dict().items()}
    rng = torch.random.get_rng_state()
    assert time_training_step(workspace.model, federation.data.clients[client_id], federation.config.train) > 0
    assert all(torch.equal(before[name], tensor) for name, tensor in workspace.model.state_dict().items())
    assert all(p.grad is None for p in workspace.model.parameters()) and not workspace.model.training
    assert torch.equal(rng, torch.random.get_rng_state())


@pytest.mark.parametrize("example", ["hetlora_devices", "flexlora_devices"])
def test_the_readme_examples_give_each_class_its_shape_and_train(example: str, tmp_path: Path):
    from fedtune.simulations.config import load_config

    config = load_config(Path(__file__).parents[1] / "examples" / "configs" / f"{example}.toml", {"rounds": 1})
    federation = build_federation(config)
    shapes = {cls: federation.server.shape(cid).label() for cid, cls in federation.server.compute_classes.items()}
    assert shapes == {"hetlora_devices": {"phone": "r2_d1", "laptop": "r4", "workstation": "r8"},
                      "flexlora_devices": {"phone": "r4_d1", "laptop": "r4", "workstation": "r8"}}[example]
    rows = run_simulation(config, tmp_path, show_progress=False)
    last = rows[-1].model_dump()
    assert last["clients"] == 6
    assert last["payload_up.phone"] < last["payload_up.laptop"] < last["payload_up.workstation"]
