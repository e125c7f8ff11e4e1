"""The conformance suite every registered built-in strategy must pass (peft's testing_common idea):
aggregation of identical updates, resumable server state, and named rejection of bad updates."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fedtune.simulations.runner import Federation, build_federation
from fedtune.strategies.api import ClientUpdate, InvalidUpdate, TensorSpec, check_tensors
from fedtune.strategies.registry import BUILTIN_MODULES, get_strategy
from tests.helpers import tiny_config

STRATEGIES = sorted(BUILTIN_MODULES)


@pytest.fixture(scope="module", params=STRATEGIES)
def federation(request) -> Federation:
    return build_federation(tiny_config(strategy=request.param, partition={"scheme": "iid", "num_clients": 3}))


def real_update(federation: Federation, client_id: str = "client-000", round: int = 1) -> ClientUpdate:
    instruction = federation.server.instruction(round, client_id)
    return federation.clients[client_id].fit(federation.workspace, instruction, federation.data.clients[client_id])


def model_state(federation: Federation) -> dict[str, torch.Tensor]:
    federation.server.load_global_into(federation.workspace)
    return {name: tensor.clone() for name, tensor in federation.workspace.model.state_dict().items()}


def fresh_server(federation: Federation):
    definition = get_strategy(federation.config.strategy)
    server = definition.server(federation.config.strategy_config(), federation.server.context)
    server.initialize(federation.workspace)
    return server


def with_tensors(update: ClientUpdate, tensors) -> ClientUpdate:
    return update.model_copy(update={"tensors": tensors})


def first_float_tensor(update: ClientUpdate) -> str:
    return next(name for name, tensor in update.tensors.items() if tensor.is_floating_point())


def test_identical_updates_aggregate_to_that_update(federation):
    update = real_update(federation)
    start = federation.server.state_dict()
    federation.server.aggregate(1, [update])
    single = model_state(federation)

    federation.server.load_state_dict(start)
    copies = [
        update.model_copy(update={"client_id": f"client-{i:03d}", "num_examples": n})
        for i, n in enumerate((5, 1, 17))
    ]
    federation.server.aggregate(1, copies)
    repeated = model_state(federation)
    federation.server.load_state_dict(start)
    for name in single:
        torch.testing.assert_close(repeated[name], single[name], rtol=1e-6, atol=1e-7, msg=name)


def test_state_dict_round_trips_through_bytes(federation):
    update = real_update(federation)
    federation.server.aggregate(1, [update])
    buffer = io.BytesIO()
    torch.save(federation.server.state_dict(), buffer)
    buffer.seek(0)
    restored = fresh_server(federation)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    expected = federation.server.instruction(2, "client-001")
    got = restored.instruction(2, "client-001")
    assert got.settings == expected.settings
    assert got.tensors.keys() == expected.tensors.keys()
    for name in expected.tensors:
        assert torch.equal(got.tensors[name], expected.tensors[name]), name


@pytest.mark.parametrize("fault", ["nan", "inf", "missing", "shape", "dtype", "extra"])
def test_bad_update_is_rejected_naming_the_tensor(federation, fault):
    update = real_update(federation)
    federation.server.validate_update(update, 1)
    name = first_float_tensor(update)
    tensors = dict(update.tensors)
    if fault in ("nan", "inf"):
        broken = tensors[name].clone()
        broken.view(-1)[0] = float("nan") if fault == "nan" else float("inf")
        tensors[name] = broken
    elif fault == "missing":
        del tensors[name]
    elif fault == "shape":
        tensors[name] = tensors[name].unsqueeze(0)
    elif fault == "dtype":
        tensors[name] = tensors[name].double()
    else:
        name = "not.a.real.tensor"
        tensors[name] = torch.zeros(2)
    with pytest.raises(InvalidUpdate, match=name.replace(".", r"\.")):
        federation.server.validate_update(with_tensors(update, tensors), 1)


def test_stale_round_is_rejected(federation):
    update = real_update(federation, round=1)
    with pytest.raises(InvalidUpdate, match="round 1 is not the current round 2"):
        federation.server.validate_update(update, 2)


def test_client_state_stays_adapter_sized(federation):
    """Virtual clients share the one workspace; what a client half keeps between rounds is at
    most a few update-sized tensors, never a model copy, so memory grows per client by about an
    adapter (or less)."""
    update = real_update(federation)
    update_bytes = sum(t.numel() * t.element_size() for t in update.tensors.values())
    for client in federation.clients.values():
        buffer = io.BytesIO()
        torch.save(client.state_dict(), buffer)
        assert buffer.tell() <= 4 * update_bytes + 64 * 1024
    model_bytes = sum(p.numel() * p.element_size() for p in federation.workspace.model.parameters())
    assert 4 * update_bytes + 64 * 1024 < model_bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_check_tensors_finds_nan_and_inf_in_every_float_dtype(dtype, bad):
    tensor = torch.zeros(3, 5, dtype=dtype)
    if bad is not None:
        tensor[2, 4] = bad
    specs = {"w": TensorSpec(shape=(3, 5), dtype=dtype)}
    if bad is None:
        check_tensors({"w": tensor}, specs, "update")
    else:
        with pytest.raises(InvalidUpdate, match="update: tensor 'w' holds NaN or Inf"):
            check_tensors({"w": tensor}, specs, "update")
