"""The committed generated modules are exactly what `python -m fedtune.protos.generate` writes from the .proto."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from fedtune.protos.generate import GENERATED, HERE, generate
from fedtune.protos.runspec import SCHEMA_FILE, RunSpec, run_spec_schema
from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.runner import build_federation
from fedtune.strategies.api import EVALUATE, EVALUATE_ONLY
from fedtune.strategies.registry import wrapper_config
from tests.helpers import tiny_config


def test_regenerating_gives_the_committed_files(tmp_path: Path):
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (HERE / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `python -m fedtune.protos.generate`"


def test_service_is_versioned():
    from fedtune.protos import fedtune_pb2

    service = fedtune_pb2.DESCRIPTOR.services_by_name["Federation"]
    assert service.full_name == "fedtune.v1.Federation"
    assert {m.name for m in service.methods} == {"Register", "PullInstruction", "PushUpdate", "Heartbeat", "Leave"}


# -- the run spec's schema ---------------------------------------------------------------------------------

SPEC_VARIANTS = [
    {"strategy": "fedavg_lora"},
    {"strategy": "ffa_lora", "options": {"rank": 4}},
    {"strategy": "fedkseed"},
    {"strategy": "admm", "options": {"dual": "none"}},
    {"strategy": "fedavg_lora", "compression": {"codec": "int8"},
     "dp": {"clipping_norm": 1.0, "noise_multiplier": 0.5}},
    {"strategy": "ffa_lora", "dp": {"level": "sample", "clipping_norm": 1.0, "noise_multiplier": 0.5}},
    {"strategy": "fedavg_lora", "asynchronous": {"buffer_size": 2}},
]


def shipped_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def test_the_shipped_run_spec_schema_is_what_the_strategies_define():
    assert shipped_schema() == json.loads(json.dumps(run_spec_schema())), \
        "protos/runspec.schema.json is stale: run `python -m fedtune.protos.generate`"


@pytest.mark.parametrize("raw", SPEC_VARIANTS, ids=lambda raw: "+".join(k for k in raw if k != "options") + "-"
                         + raw["strategy"])
def test_every_run_spec_validates_against_the_shipped_schema_and_holds_every_option(raw):
    config = SimulationConfig.model_validate(raw)
    spec = json.loads(RunSpec.of(config).model_dump_json())
    Draft202012Validator(shipped_schema()).validate(spec)
    assert set(spec["options"]) == set(type(config.strategy_config()).model_fields)  # no default left implicit
    for section, options in spec["wrappers"].items():
        assert (options is None) == (raw.get(section) is None)
        if options is not None:
            assert set(options) == set(type(wrapper_config(section, raw[section])).model_fields)


@pytest.mark.parametrize("change, named", [
    (lambda spec: spec["options"].update(rnak=4), "rnak"),
    (lambda spec: spec["options"].update(rank="four"), "four"),
    (lambda spec: spec.update(strategy="fedprox"), "fedprox"),
    (lambda spec: spec["wrappers"].update(dp={"clipping_norm": -1}), "-1"),
])
def test_the_schema_refuses_what_a_server_would(change, named):
    spec = json.loads(RunSpec.of(SimulationConfig()).model_dump_json())
    change(spec)
    errors = list(Draft202012Validator(shipped_schema()).iter_errors(spec))
    assert errors and any(named in error.message for error in errors), [error.message for error in errors]


# -- the settings table beside the proto ----------------------------------------------------------------------

SETTINGS_TABLE = HERE / "SETTINGS.md"
SENDERS = [
    {"strategy": "fedavg_lora"}, {"strategy": "ffa_lora"}, {"strategy": "fedkseed"}, {"strategy": "admm"},
    {"strategy": "fedavg_lora", "compression": {"codec": "topk_ternary"}},
    {"strategy": "fedavg_lora", "dp": {"clipping_norm": 1.0, "noise_multiplier": 0.5}},
    {"strategy": "fedavg_lora", "dp": {"level": "sample", "clipping_norm": 1.0, "noise_multiplier": 0.5}},
    {"strategy": "fedavg_lora", "asynchronous": {"buffer_size": 2}},
]


def test_the_settings_table_lists_exactly_the_keys_instructions_carry():
    documented = set(re.findall(r"^\| `([^`]+)` \|", SETTINGS_TABLE.read_text(), flags=re.MULTILINE))
    sent = {EVALUATE, EVALUATE_ONLY}  # the round engine's own
    for raw in SENDERS:
        federation = build_federation(tiny_config(**raw))
        sent |= set(federation.server.instruction(1, sorted(federation.clients)[0]).settings)
    assert sent == documented, f"sent but not in SETTINGS.md: {sent - documented}; listed, never sent: " \
                               f"{documented - sent}"
