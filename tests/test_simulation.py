"""fedsim end to end: outputs, learning on the built-in task, config validation and the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from fedtune.simulations.cli import main as fedsim_main
from fedtune.simulations.config import ConfigError, load_config
from fedtune.simulations.runner import build_federation, run_simulation
from tests.helpers import tiny_config

REQUIRED_KEYS = {"round", "clients", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down"}


def test_short_run_learns_and_writes_every_output(tmp_path):
    config = tiny_config(rounds=4, train={"local_steps": 10})
    history = run_simulation(config, tmp_path, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4]
    assert all(REQUIRED_KEYS <= row.keys() for row in rows)
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"] + 0.05
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[1]["clients"] == 4 and rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] > 0
    with (tmp_path / "metrics.csv").open() as handle:
        assert [int(r["round"]) for r in csv.DictReader(handle)] == [0, 1, 2, 3, 4]
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "global" / "adapter_model.safetensors").exists()
    assert history[-1].eval_accuracy == rows[-1]["eval_accuracy"]


def test_clients_per_round_samples_reproducibly():
    config = tiny_config(options={"clients_per_round": 2}, partition={"scheme": "iid", "num_clients": 5})
    server = build_federation(config).server
    picks = [server.sample_clients(r, [f"client-{i:03d}" for i in range(5)]) for r in (1, 2, 3)]
    assert all(len(p) == 2 for p in picks)
    assert picks == [server.sample_clients(r, [f"client-{i:03d}" for i in range(5)]) for r in (1, 2, 3)]
    assert len({tuple(p) for p in picks}) > 1


def test_strategy_alone_is_a_valid_config(tmp_path):
    path = tmp_path / "ffa.toml"
    path.write_text('strategy = "ffa_lora"\n')
    config = load_config(path, {"rounds": 3})
    assert config.strategy == "ffa_lora" and config.rounds == 3
    assert config.model.path == "builtin:tiny-llama" and config.data.train == "builtin:ops"


@pytest.mark.parametrize(
    "text, named",
    [
        ('strategy = "ffa_lora"\nrouns = 3\n', "rouns"),
        ('strategy = "ffa_lora"\n[train]\nlocal_steps = "many"\n', "train.local_steps"),
        ('strategy = "ffa_lora"\n[options]\nrank = 0\n', "options.rank"),
        ('strategy = "ffa_lora"\n[options]\nrnak = 4\n', "options.rnak"),
        ('strategy = "fedavg_loar"\n', "fedavg_loar"),
        ('strategy = "ffa_lora"\n[partition]\nscheme = "random"\n', "partition.scheme"),
        ('strategy = "ffa_lora"\nrounds = \n', "not valid TOML"),
    ],
)
def test_broken_config_names_the_field(tmp_path, text, named):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_config(path)


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('strategy = "ffa_lora"\n[train]\nbatch_sise = 4\n')
    assert fedsim_main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "train.batch_sise" in capsys.readouterr().err


def test_relative_data_paths_are_relative_to_the_config(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    path = tmp_path / "run.toml"
    path.write_text('[data]\ntrain = "data/train.jsonl"\n')
    assert load_config(path).data.train == str(tmp_path / "data" / "train.jsonl")


@pytest.mark.e2e  # the installed console script in a subprocess
def test_fedsim_console_script_runs_the_default_demo(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedtune.simulations.cli", "run", "--out", str(tmp_path), "--rounds", "1", "--quiet"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "eval accuracy" in result.stdout
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
