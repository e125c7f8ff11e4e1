"""The command-line tools: light start-up, `fedsim strategies`, `--set` overrides and `fedsim config`.

Start-up time itself is measured by benchmarks/bench_cli_startup.py, not here; these tests check
what makes it fast: no heavy module is imported by `--help`, `--version` or `fedsim strategies`.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

from fedtune.fedserver.cli import main as fedserver_main
from fedtune.simulations.cli import main as fedsim_main
from fedtune.simulations.config import SimulationConfig
from fedtune.strategies import catalog, registry
from fedtune.strategies.runconfig import ConfigError, load_run_config, parse_assignment

HEAVY = ("torch", "transformers", "peft", "grpc", "opacus")
LIGHT_COMMANDS = {
    "fedtune.simulations.cli": [["--help"], ["--version"], ["run", "--help"], ["config", "--help"], ["strategies"]],
    "fedtune.fedserver.cli": [["--help"], ["--version"], ["start", "--help"], ["config", "--help"]],
    "fedtune.fedclient.cli": [["--help"], ["--version"], ["join", "--help"]],
}


def heavy_modules_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_importing_the_cli_modules_imports_no_heavy_module():
    assert heavy_modules_after("\n".join(f"import {module}" for module in LIGHT_COMMANDS)) == []


def test_help_version_and_strategies_import_no_heavy_module():
    code = textwrap.dedent(f"""
        import contextlib, importlib, io
        for module, argvs in {LIGHT_COMMANDS!r}.items():
            for argv in argvs:
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        status = importlib.import_module(module).main(argv)
                except SystemExit as exit:
                    status = exit.code
                assert status in (0, None), (module, argv, status)
    """)
    assert heavy_modules_after(code) == []


def test_config_errors_outside_a_strategys_options_import_no_heavy_module(tmp_path):
    """A wrong field in any table but the strategy's own options is reported before torch loads."""
    bad = tmp_path / "bad.toml"
    bad.write_text('strategy = "ffa_lora"\nrounds = "ten"\n[train]\nbatch_sise = 4\n[channel.uplink]\nsnr_db = "x"\n')
    code = textwrap.dedent(f"""
        import contextlib, io
        from fedtune.fedserver.cli import main as fedserver
        from fedtune.simulations.cli import main as fedsim
        for main, argv in ((fedsim, ["run", {str(bad)!r}]),
                           (fedserver, ["start", "--config", {str(bad)!r}, "--run-dir", {str(tmp_path)!r}])):
            errors = io.StringIO()
            with contextlib.redirect_stderr(errors):
                assert main(argv) == 2, argv
            assert "rounds" in errors.getvalue() and "train.batch_sise" in errors.getvalue(), errors.getvalue()
    """)
    assert heavy_modules_after(code) == []


def test_catalog_matches_the_imported_registry():
    names = set(registry.BUILTIN_MODULES) | {entry.name for entry in entry_points(group=registry.ENTRY_POINT_GROUP)}
    listed = {entry.name: entry for entry in catalog.strategies()}
    assert set(listed) == names
    for name, entry in listed.items():
        assert entry.summary and entry.summary == registry.get_strategy(name).summary, name
    assert [(entry.name, entry.module) for entry in catalog.wrappers()] == list(registry.WRAPPER_MODULES.items())
    for entry in catalog.wrappers():
        docstring = importlib.import_module(entry.module).__doc__ or ""
        assert entry.summary and entry.summary == " ".join(docstring.strip().split("\n\n")[0].split()), entry.name


def test_strategies_command_and_run_help_list_every_strategy_and_wrapper(capsys):
    assert fedsim_main(["strategies"]) == 0
    listing = capsys.readouterr().out
    with pytest.raises(SystemExit):
        fedsim_main(["run", "--help"])
    run_help = capsys.readouterr().out
    for text in (listing, run_help):
        for entry in catalog.strategies():
            assert f"{entry.name} " in text and entry.summary in text
        for entry in catalog.wrappers():
            assert f"[{entry.name}]" in text
    assert "fedsim config" in run_help


@pytest.mark.parametrize("text, path, value", [
    ("train.local_steps=5", ("train", "local_steps"), 5),
    ('strategy="ffa_lora"', ("strategy",), "ffa_lora"),
    ("strategy=ffa_lora", ("strategy",), "ffa_lora"),
    ("options.rank = 4", ("options", "rank"), 4),
    ("train.learning_rate=1e-3", ("train", "learning_rate"), 1e-3),
    ("dp.adaptive_clipping=true", ("dp", "adaptive_clipping"), True),
    ('options.target_modules=["q_proj", "v_proj"]', ("options", "target_modules"), ["q_proj", "v_proj"]),
    ("compression.by_compute_class.phone=topk", ("compression", "by_compute_class", "phone"), "topk"),
])
def test_set_values_are_read_as_toml(text, path, value):
    assert parse_assignment(text) == (path, value)


@pytest.mark.parametrize("text", ["rounds", "=5", "train..local_steps=5", ".rounds=1"])
def test_malformed_set_says_what_is_expected(text):
    with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
        parse_assignment(text)


def test_set_merges_into_the_files_tables_and_a_dedicated_flag_wins(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 5\n[train]\nbatch_size = 4\nlocal_steps = 7\n[options]\nalpha = 32\n')
    config = load_run_config(SimulationConfig, path, {"rounds": 3},
                             ["train.local_steps=2", "strategy=ffa_lora", "options.rank=4", "rounds=9"])
    assert (config.train.batch_size, config.train.local_steps) == (4, 2)
    assert config.strategy == "ffa_lora" and config.options == {"alpha": 32, "rank": 4}
    assert config.rounds == 3


def test_fedsim_set_overrides_reach_the_resolved_config_json(tmp_path):
    sets = ["rounds=1", "train.local_steps=1", "data.max_train_examples=200", "data.max_eval_examples=16"]
    argv = ["run", "--out", str(tmp_path), "--quiet"]
    assert fedsim_main([*argv, *(item for text in sets for item in ("--set", text))]) == 0
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["rounds"] == 1 and resolved["train"]["local_steps"] == 1
    assert resolved["train"]["batch_size"] == SimulationConfig().train.batch_size  # the rest of [train] kept
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("text, named", [
    ("train.local_stepz=1", "train.local_stepz"),
    ("train.local_steps=many", "train.local_steps"),
    ("options.rank=0", "options.rank"),
    ("strategy=fedavg_loar", "fedavg_loar"),
    ("rounds", "SECTION.FIELD=VALUE"),
])
def test_a_bad_set_is_an_error_naming_it(tmp_path, capsys, text, named):
    assert fedsim_main(["run", "--out", str(tmp_path), "--set", text]) == 2
    error = capsys.readouterr().err
    assert named in error and "Traceback" not in error
    assert not (tmp_path / "config.json").exists()


def test_fedserver_start_applies_set_before_it_checks_the_run_dir(tmp_path, capsys):
    config = tmp_path / "server.toml"
    config.write_text('[server]\nrun_dir = "elsewhere"\n')
    assert fedserver_main(["start", "--config", str(config), "--set", f"server.run_dir={tmp_path / 'chosen'}"]) == 2
    assert f"{tmp_path / 'chosen'}: no enrollment tokens" in capsys.readouterr().err
    assert fedserver_main(["start", "--config", str(config), "--set", "server.prot=1"]) == 2
    assert "server.prot" in capsys.readouterr().err


@pytest.mark.parametrize("main, sets", [
    (fedsim_main, []),
    (fedsim_main, ["strategy=fedkseed", "dp.level=client", "compression.codec=int4", "channel.uplink.loss_rate=0.1"]),
    # an absolute run_dir: a relative one would resolve against the saved file's folder when read back
    (fedserver_main, ["server.host=127.0.0.1", "server.run_dir=/srv/fedtune-run"]),
])
def test_config_command_prints_toml_that_loads_back_to_the_same_config(tmp_path, capsys, main, sets):
    assert main(["config", *(item for text in sets for item in ("--set", text))]) == 0
    printed = capsys.readouterr().out
    for text in sets:
        key, _, value = text.partition("=")
        assert f"\n{key.rsplit('.', 1)[-1]} = " in printed and value in printed, text
    saved = tmp_path / "printed.toml"
    saved.write_text(printed)
    assert main(["config", str(saved)] if main is fedsim_main else ["config", "--config", str(saved)]) == 0
    assert capsys.readouterr().out == printed
