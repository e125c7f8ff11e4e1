"""The conformance suite every built-in strategy and the example plug-in must pass, bare and under each
wrapper (peft's testing_common idea): aggregation of identical updates, resumable server state, and
named rejection of bad updates. Also: the wrapper bases forward every hook of the API, and a strategy
that cannot take a wrapper is refused by name when the federation is built."""

from __future__ import annotations

import inspect
import io
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtune.simulations.runner import Federation, build_federation
from fedtune.strategies import api
from fedtune.strategies.api import (
    ClientStrategy,
    ClientUpdate,
    HoldsGlobalTensors,
    InvalidUpdate,
    RunContext,
    ServerStrategy,
    StrategyConfig,
    TensorSpec,
    TrainsLocally,
    check_tensors,
)
from fedtune.strategies.compression import CompressionClient, CompressionServer
from fedtune.strategies.dp_client import ClientLevelClient, ClientLevelServer
from fedtune.strategies.dp_sample import SampleLevelClient
from fedtune.strategies.fedavg_lora import FedAvgLoraClient, FedAvgLoraServer
from fedtune.strategies.registry import BUILTIN_MODULES, register, resolve
from fedtune.strategies.wrappers import ClientWrapper, ServerWrapper
from tests.helpers import tiny_config

EXAMPLE_PLUGIN = Path(__file__).resolve().parent.parent / "examples" / "fedtune-plugin-example"


def register_example_plugin() -> str:
    """Register the example plug-in's definition as its entry point would, without installing the package."""
    sys.path.insert(0, str(EXAMPLE_PLUGIN))
    try:
        import fedtune_median
    finally:
        sys.path.remove(str(EXAMPLE_PLUGIN))
    return register(fedtune_median.DEFINITION).name


PLUGIN = register_example_plugin()
STRATEGIES = [*sorted(BUILTIN_MODULES), PLUGIN]
# A clipping norm below every real update's norm, so clipping is active; no noise, so identical updates
# stay identical and the checks below keep their exact tolerances.
DP_CLIENT = {"level": "client", "clipping_norm": 1e-3, "noise_multiplier": 0.0}
DP_SAMPLE = {"level": "sample", "clipping_norm": 1.0, "noise_multiplier": 1.0}
INT8 = {"codec": "int8"}
WITHOUT_GLOBAL_TENSORS = {"fedkseed"}  # its global state is a seed log: client-level DP is refused (tested below)

COMPRESSED_BLOBS = (
    "int8 sends uint8 blobs (`<name>|enc`), which cannot hold NaN or Inf; a blob that decodes to them is the "
    "codec's check (tests/test_compression.py)"
)
ADMM_STATE_UNDER_INT8 = (
    "admm keeps two adapters (θ_k, θ̃) by design and compression adds a float32 residual, while int8 shrinks the "
    "wire update to a quarter of an adapter: 4 × the wire update is below that state; bare admm checks the bound"
)


@dataclass(frozen=True)
class Variant:
    """A strategy with some wrapper sections, and the checks that cannot hold for it (check name: why)."""

    strategy: str
    wrappers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    does_not_hold: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        labels = {"dp": "dp_client", "compression": "int8"}
        return "-".join([self.strategy, *(labels[section] for section in self.wrappers)])

    def holds(self, check: str) -> bool:
        return check not in self.does_not_hold


def compressed(strategy: str, wrappers: Mapping[str, Mapping[str, Any]] | None = None) -> Variant:
    does_not_hold = {"test_non_finite_update_is_rejected_naming_the_tensor": COMPRESSED_BLOBS}
    if strategy == "admm":
        does_not_hold["test_client_state_stays_adapter_sized"] = ADMM_STATE_UNDER_INT8
    return Variant(strategy, {**(wrappers or {}), "compression": INT8}, does_not_hold)


VARIANTS = [
    *(Variant(strategy) for strategy in STRATEGIES),
    *(Variant(strategy, {"dp": DP_CLIENT}) for strategy in STRATEGIES if strategy not in WITHOUT_GLOBAL_TENSORS),
    *(compressed(strategy) for strategy in STRATEGIES),
    compressed("fedavg_lora", {"dp": DP_CLIENT}),  # compression around DP, as the registry nests them
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test taking `federation` runs on every variant where it can hold (`does_not_hold` says why not)."""
    if "federation" in metafunc.fixturenames:
        check = metafunc.function.__name__
        variants = [pytest.param(variant, id=variant.id) for variant in VARIANTS if variant.holds(check)]
        metafunc.parametrize("federation", variants, indirect=True, scope="module")


@pytest.fixture(scope="module")
def federation(request: pytest.FixtureRequest) -> Federation:
    variant: Variant = request.param
    return build_federation(
        tiny_config(strategy=variant.strategy, partition={"scheme": "iid", "num_clients": 3}, **variant.wrappers)
    )


def real_update(federation: Federation, client_id: str = "client-000", round: int = 1) -> ClientUpdate:
    instruction = federation.server.instruction(round, client_id)
    return federation.clients[client_id].fit(federation.workspace, instruction, federation.data.clients[client_id])


def model_state(federation: Federation) -> dict[str, torch.Tensor]:
    federation.server.load_global_into(federation.workspace)
    return {name: tensor.clone() for name, tensor in federation.workspace.model.state_dict().items()}


def fresh_server(federation: Federation) -> ServerStrategy:
    """A second server of the same run (wrappers included), as a restarted process would build it."""
    config = federation.config
    server = resolve(config.strategy, config.wrappers()).server(config.strategy_config(), federation.server.context)
    server.initialize(federation.workspace)
    return server


def with_tensors(update: ClientUpdate, tensors) -> ClientUpdate:
    return update.model_copy(update={"tensors": tensors})


def tensor_to_break(update: ClientUpdate) -> str:
    """The first floating-point tensor; in a compressed update (all uint8 blobs), the first blob."""
    floats = [name for name, tensor in update.tensors.items() if tensor.is_floating_point()]
    return floats[0] if floats else next(iter(update.tensors))


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


def break_update(update: ClientUpdate, fault: str) -> tuple[ClientUpdate, str]:
    """The update with one fault, and the name the rejection must carry."""
    name = tensor_to_break(update)
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
    return with_tensors(update, tensors), name


def assert_rejected_naming_the_tensor(federation: Federation, fault: str) -> None:
    update = real_update(federation)
    federation.server.validate_update(update, 1)
    broken, name = break_update(update, fault)
    with pytest.raises(InvalidUpdate, match=name.replace(".", r"\.")):
        federation.server.validate_update(broken, 1)


@pytest.mark.parametrize("fault", ["nan", "inf"])
def test_non_finite_update_is_rejected_naming_the_tensor(federation, fault):
    assert_rejected_naming_the_tensor(federation, fault)


@pytest.mark.parametrize("fault", ["missing", "shape", "dtype", "extra"])
def test_bad_update_is_rejected_naming_the_tensor(federation, fault):
    assert_rejected_naming_the_tensor(federation, fault)


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


@pytest.mark.parametrize("bad_name", ["a", "c", "big"])
def test_check_tensors_names_the_tensor_with_nan_among_many_of_mixed_dtypes_and_sizes(monkeypatch, bad_name):
    """Small tensors are checked together and a large one alone; either way the error names the one."""
    monkeypatch.setattr(api, "BATCHED_FINITE_ELEMENTS", 100)
    dtypes = {"a": torch.float16, "b": torch.float64, "c": torch.float32, "big": torch.float32, "n": torch.int64}
    tensors = {name: torch.zeros(200 if name == "big" else 6, dtype=dtype) for name, dtype in dtypes.items()}
    specs = {name: TensorSpec.like(tensor) for name, tensor in tensors.items()}
    check_tensors(tensors, specs, "update")
    tensors[bad_name][-1] = math.inf if bad_name == "a" else math.nan
    with pytest.raises(InvalidUpdate, match=f"update: tensor '{bad_name}' holds NaN or Inf"):
        check_tensors(tensors, specs, "update")


# --- strategies that cannot take a wrapper ------------------------------------------------------------


def test_client_level_dp_refuses_a_strategy_without_global_tensors_by_name():
    config = tiny_config(strategy="fedkseed", dp=DP_CLIENT)
    with pytest.raises(TypeError, match=r"dp: strategy 'fedkseed' exposes no global_tensors \(its server half "
                                        r"FedKSeedServer does not implement HoldsGlobalTensors\)"):
        build_federation(config)


@pytest.mark.parametrize(("strategy", "client_half"), [("fedkseed", "FedKSeedClient"), ("admm", "AdmmClient")])
def test_sample_level_dp_refuses_a_strategy_without_a_local_trainer_by_name(strategy, client_half):
    """fedkseed trains by zeroth-order steps; admm's local solve adds its penalty and dual terms (AdmmClient)."""
    config = tiny_config(strategy=strategy, dp=DP_SAMPLE)
    definition = resolve(config.strategy, config.wrappers())
    context = RunContext(seed=0, rounds=1, train=config.train, model_kind="causal_lm")
    with pytest.raises(TypeError, match=rf"'{strategy}' has no local_trainer hook for DP-SGD \(its client half "
                                        rf"{client_half} does not implement TrainsLocally\.use_local_trainer"):
        definition.client(config.strategy_config(), context, "client-000")


def test_dp_is_innermost_so_its_seams_are_the_strategy_s_own():
    """The registry applies DP before compression: DP checks the strategy's own halves, and compression,
    which renames every float tensor on the wire, does not claim the seams of what it wraps."""
    context = RunContext(seed=0, rounds=1, train=tiny_config().train, model_kind="causal_lm")
    options = StrategyConfig()
    client_level = resolve("fedavg_lora", {"dp": DP_CLIENT, "compression": INT8})
    server = client_level.server(options, context)
    assert type(server) is CompressionServer and type(server.inner) is ClientLevelServer
    assert type(server.inner.inner) is FedAvgLoraServer
    assert not isinstance(server, HoldsGlobalTensors)
    client = client_level.client(options, context, "client-000")
    assert type(client) is CompressionClient and type(client.inner) is ClientLevelClient
    assert type(client.inner.inner) is FedAvgLoraClient and not isinstance(client, TrainsLocally)

    sample_level = resolve("fedavg_lora", {"dp": DP_SAMPLE, "compression": INT8}).client(options, context, "client-000")
    private = sample_level.inner
    assert isinstance(private, SampleLevelClient) and isinstance(private.inner, FedAvgLoraClient)
    assert private.inner.local_trainer == private.train_privately


# --- the wrapper bases forward every hook ---------------------------------------------------------------

# Helpers a half calls on itself, keyed on its own client id (which a wrapper shares with its inner half):
# not hooks that the transports call, so a wrapper inherits them instead of forwarding.
PER_CLIENT_HELPERS = {"batch_generator", "seeded"}
# Templates built from hooks: a wrapper must inherit them, so that they call the wrapper's own hooks
# (`respond` calls `receive` and `fit`; forwarded, it would skip e.g. compression's encoding).
TEMPLATES = {"respond"}


def api_hooks(half: type) -> list[str]:
    """The public methods of an API half, helpers and templates excluded."""
    methods = [name for name, member in vars(half).items() if callable(member) and not name.startswith("_")]
    return sorted(set(methods) - PER_CLIENT_HELPERS - TEMPLATES)


@pytest.mark.parametrize(("half", "wrapper"), [(ServerStrategy, ServerWrapper), (ClientStrategy, ClientWrapper)])
def test_wrapper_bases_override_every_hook_of_the_api(half, wrapper):
    assert PER_CLIENT_HELPERS & set(vars(ClientStrategy)) == PER_CLIENT_HELPERS  # the exemption is not stale
    assert TEMPLATES <= set(vars(ClientStrategy)) and not TEMPLATES & set(vars(ClientWrapper))
    assert [name for name in api_hooks(half) if name not in vars(wrapper)] == []


def recording(half: type) -> type:
    """`half` with every hook replaced by one that records its arguments and returns a value of its own."""

    def recorder(hook: str) -> Callable[..., Any]:
        def record(self, *args: Any) -> Any:
            self.calls.append((hook, args))
            return f"returned by {hook}"
        return record

    return type(f"Recording{half.__name__}", (half,), {hook: recorder(hook) for hook in api_hooks(half)})


@pytest.mark.parametrize(("half", "wrapper"), [(ServerStrategy, ServerWrapper), (ClientStrategy, ClientWrapper)])
def test_wrapper_bases_forward_each_hook_with_its_arguments_and_return_its_value(half, wrapper):
    context = RunContext(seed=0, rounds=1, train=tiny_config().train, model_kind="causal_lm")
    extra = ("client-000",) if half is ClientStrategy else ()
    inner = recording(half)(StrategyConfig(), context, *extra)
    inner.calls = []
    wrapped = wrapper(inner)
    for hook in api_hooks(half):
        arguments = tuple(object() for _ in list(inspect.signature(getattr(half, hook)).parameters)[1:])
        if hook == "load_state_dict":  # a wrapper nests the inner half's state under "inner"
            returned = getattr(wrapped, hook)({"inner": arguments[0]})
        else:
            returned = getattr(wrapped, hook)(*arguments)
        assert inner.calls[-1] == (hook, arguments), hook
        if hook == "state_dict":
            assert returned == {"inner": f"returned by {hook}"}
        elif inspect.signature(getattr(half, hook)).return_annotation != "None":
            assert returned == f"returned by {hook}", hook
    assert [hook for hook, _ in inner.calls] == api_hooks(half)
