"""A strategy from another package, found through the `fedtune.strategies` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # pip builds and installs
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fedtune-plugin-example"


def test_example_plugin_installs_and_runs_a_federation(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run(
        [sys.executable, "-c",
         "from fedtune.strategies.registry import available_strategies; print(available_strategies())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert "fedmedian_lora" in listed

    config = tmp_path / "median.toml"
    config.write_text(
        'strategy = "fedmedian_lora"\nrounds = 2\n'
        '[train]\nlocal_steps = 3\nbatch_size = 8\n'
        '[data]\nmax_train_examples = 400\nmax_eval_examples = 32\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "fedtune.simulations.cli", "run", str(config), "--out", str(tmp_path / "out"),
         "--quiet"],
        env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["clients"] == 4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["strategy"] == "fedmedian_lora"


def test_median_plugin_ignores_an_outlier_client():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import torch
        from fedtune_median import MedianLoraServer

        from fedtune.strategies.api import ClientUpdate, RunContext
        from fedtune.strategies.fedavg_lora import FedAvgLoraConfig
        from fedtune.tasks.config import TrainConfig
    finally:
        sys.path.remove(str(EXAMPLE))
    server = MedianLoraServer(FedAvgLoraConfig(), RunContext(0, 1, TrainConfig(), "causal_lm"))
    server.global_tensors = {"w": torch.zeros(3)}
    values = {"a": 1.0, "b": 2.0, "c": 1e6}
    server.aggregate(1, [ClientUpdate(client_id=c, round=1, num_examples=1, tensors={"w": torch.full((3,), v)})
                         for c, v in values.items()])
    assert torch.equal(server.global_tensors["w"], torch.full((3,), 2.0))
