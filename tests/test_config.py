"""Run configs: one base for fedsim, fedserver and the run spec; wrappers from the registry's table; one loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.fedserver.config import ServerConfig
from fedtune.protos.runspec import RunSpec
from fedtune.simulations.config import SimulationConfig, load_config
from fedtune.strategies.registry import WRAPPER_MODULES, wrapper_config
from fedtune.strategies.runconfig import ConfigError, RunConfig, RunFields, load_run_config, with_wrapper_sections
from fedtune.tasks.config import StrictModel

CONFIGS = [SimulationConfig, ServerConfig]


def test_fedsim_and_fedserver_add_only_their_own_sections_to_the_base():
    assert set(SimulationConfig.model_fields) - set(RunConfig.model_fields) == {
        "workers", "threads", "backend", "ray_address", "channel", "devices", "round_deadline_s", "quorum"}
    assert set(ServerConfig.model_fields) - set(RunConfig.model_fields) == {"server", "limits"}
    for config_class in CONFIGS:
        assert issubclass(config_class, RunConfig) and set(RunConfig.model_fields) <= set(config_class.model_fields)


def test_the_run_spec_is_the_base_run_fields_plus_the_wrappers():
    assert issubclass(RunSpec, RunFields) and issubclass(RunConfig, RunFields)
    assert set(RunSpec.model_fields) == {*RunFields.model_fields, "wrapper_sections"}
    assert set(RunConfig.model_fields) == {*RunFields.model_fields, *WRAPPER_MODULES, "partition", "tracking"}


def test_wrapper_sections_come_from_the_registry_table_in_its_order():
    wrapper_fields = [name for name in RunConfig.model_fields if name in WRAPPER_MODULES]
    assert wrapper_fields == list(WRAPPER_MODULES)
    config = ServerConfig.model_validate({"compression": {"codec": "int8"}})
    assert list(config.wrappers()) == list(WRAPPER_MODULES)
    assert config.wrappers()["compression"] == {"codec": "int8"} and config.wrappers()["dp"] is None
    assert ServerConfig.spec_fields() == (*RunFields.model_fields, *WRAPPER_MODULES)


def test_a_wrapper_added_to_the_table_gets_its_section_and_is_kept_on_resume(monkeypatch):
    monkeypatch.setitem(WRAPPER_MODULES, "sketch", "my_package.sketch")
    assert list(with_wrapper_sections(RunFields).model_fields)[-3:] == ["dp", "compression", "sketch"]
    assert RunConfig.spec_fields()[-3:] == ("dp", "compression", "sketch")


def test_run_spec_json_on_the_wire_keeps_its_layout():
    config = ServerConfig.model_validate({"strategy": "ffa_lora", "rounds": 3, "compression": {"codec": "int8"}})
    wire = json.loads(config.run_spec().model_dump_json())
    assert set(wire) == {"strategy", "options", "wrappers", "model", "data", "train", "evaluation", "rounds", "seed"}
    # resolved: every option of the strategy and of each applied wrapper, defaults included
    assert wire["wrappers"]["asynchronous"] is None and wire["wrappers"]["dp"] is None
    assert wire["wrappers"]["compression"] == wrapper_config("compression", {"codec": "int8"}).model_dump(mode="json")
    assert wire["options"] == config.strategy_config().model_dump(mode="json")
    assert wire["strategy"] == "ffa_lora" and wire["rounds"] == 3 and wire["model"] == config.model.model_dump()
    spec = RunSpec.model_validate_json(config.run_spec().model_dump_json())
    assert spec == config.run_spec()
    assert spec.context() == config.context() and spec.strategy_config() == config.strategy_config()


def test_a_resumed_run_keeps_every_field_the_clients_were_sent():
    config = ServerConfig.model_validate({"strategy": "ffa_lora"})
    assert config.differing_run_fields(config.model_copy(update={
        "server": config.server.model_copy(update={"port": 1}), "partition": config.partition.model_copy(
            update={"num_clients": 9})})) == []
    for section in WRAPPER_MODULES:
        changed = config.model_copy(update={section: {}})
        assert config.differing_run_fields(changed) == [section]
    assert config.differing_run_fields(config.model_copy(update={"rounds": 4, "seed": 1})) == ["rounds", "seed"]


def test_the_stored_server_config_round_trips():
    config = ServerConfig.model_validate({"strategy": "ffa_lora", "compression": {"codec": "int4"}})
    assert ServerConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize("config_class", CONFIGS)
def test_one_loader_reports_each_kind_of_bad_file(tmp_path: Path, config_class: type[RunConfig]):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        load_run_config(config_class, missing)
    assert str(caught.value) == f"{missing}: no such file"
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = \n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(config_class, broken)
    assert str(caught.value).startswith(f"{broken}: not valid TOML: ")
    misspelt = tmp_path / "misspelt.toml"
    misspelt.write_text('strategy = "ffa_lora"\nrouns = 3\n')
    with pytest.raises(ConfigError) as caught:
        load_run_config(config_class, misspelt)
    assert str(caught.value) == f"{misspelt}: invalid config\n  rouns: Extra inputs are not permitted"
    misspelt.write_text('strategy = "ffa_lora"\n[dp]\nlevel = "nowhere"\n')
    with pytest.raises(ConfigError, match=rf"^{misspelt}: invalid config\n  dp.level: "):
        load_run_config(config_class, misspelt)


def test_overrides_replace_top_level_keys_for_fedsim_and_server_keys_for_fedserver(tmp_path: Path):
    path = tmp_path / "run.toml"
    path.write_text('strategy = "ffa_lora"\nrounds = 2\n[data]\ntrain = "data/train.jsonl"\n'
                    '[server]\nrun_dir = "runs/here"\nport = 7\n')
    server = load_run_config(ServerConfig, path, {"port": 0})
    assert server.rounds == 2 and server.server.port == 0 and server.run_dir() == tmp_path / "runs" / "here"
    assert server.data.train == str(tmp_path / "data" / "train.jsonl")
    path.write_text(path.read_text().split("[server]")[0])
    simulation = load_config(path, {"rounds": 5})
    assert simulation.rounds == 5 and simulation.data.train == server.data.train
    assert load_config(None).strategy == SimulationConfig().strategy


def test_loading_configs_does_not_import_any_wrapper():
    """Wrappers (opacus for dp) are slow to import: only a run that uses one imports it."""
    code = ("import sys; import fedtune.simulations.cli, fedtune.fedserver.cli; "
            f"print([m for m in {list(WRAPPER_MODULES.values())!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_strict_models_are_the_base_of_every_config():
    for config_class in (*CONFIGS, RunSpec):
        assert issubclass(config_class, StrictModel)
        assert config_class.model_config["extra"] == "forbid" and config_class.model_config["frozen"]
