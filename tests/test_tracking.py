"""[tracking]: TensorBoard event files and an MLflow run hold every metrics.jsonl value and each client's metrics.

Both trackers are in the `test` extra (fedtune[tensorboard], fedtune[mlflow]); a test that lacks one
fails saying how to install it, it is never skipped.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedtune.fedserver.config import ServerConfig
from fedtune.fedserver.coordinator import build_engine
from fedtune.fedserver.tracking import Tracking
from fedtune.simulations import runner
from fedtune.simulations.runner import run_simulation
from fedtune.strategies.runconfig import ConfigError, RunConfig, TrackingConfig
from tests.helpers import tiny_config

Values = dict[tuple[str, int], float]


def require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: pip install -e '.[test]' -c constraints.txt (the test extra holds "
                    f"fedtune[{extra}])")


def jsonl_values(out: Path) -> Values:
    """Every number metrics.jsonl holds, by (name, round)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(key, row["round"]): value for row in rows for key, value in row.items()
            if key != "round" and isinstance(value, int | float)}


def tensorboard_values(out: Path) -> Values:
    require("tensorboard", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    values: Values = {}
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            assert (tag, event.step) not in values, f"{tag} at step {event.step} twice"
            values[tag, event.step] = event.value
    return values


def mlflow_histories(out: Path) -> tuple[Any, dict[str, list[tuple[int, float]]]]:
    require("mlflow", "mlflow")
    from mlflow.tracking import MlflowClient

    record = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=record["mlflow_tracking_uri"])
    run = client.get_run(record["mlflow_run_id"])
    return run, {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
                 for name in run.data.metrics}


def split(values: Values) -> tuple[Values, Values]:
    """Round values and the clients' (`client/<id>/<metric>`)."""
    clients = {key: value for key, value in values.items() if key[0].startswith("client/")}
    return {key: value for key, value in values.items() if key not in clients}, clients


def float32(values: Values) -> Values:
    """TensorBoard keeps scalars as float32."""
    return {key: float(np.float32(value)) for key, value in values.items()}


def test_a_fedsim_run_writes_metrics_jsonl_and_each_clients_metrics_to_tensorboard_and_mlflow(tmp_path: Path):
    out = tmp_path / "run"
    run_simulation(tiny_config(rounds=2, tracking={"tensorboard": True, "mlflow": True}), out, show_progress=False)
    want = jsonl_values(out)
    assert ("eval_loss", 2) in want and ("train_loss", 1) in want

    rounds, clients = split(tensorboard_values(out))
    assert rounds == float32(want)
    run, histories = mlflow_histories(out)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["strategy"] == "fedavg_lora" and run.data.params["train.local_steps"] == "3"
    logged = {(name, step): value for name, history in histories.items() for step, value in history}
    mlflow_rounds, mlflow_clients = split(logged)
    assert mlflow_rounds == want and sum(len(history) for history in histories.values()) == len(logged)
    assert float32(mlflow_clients) == clients

    for round in (1, 2):  # each accepted update's own metrics, by client: the round's train_loss is their mean
        ids = sorted({name.split("/")[1] for name, step in mlflow_clients if step == round})
        assert len(ids) == want["clients", round] == 4
        assert all(mlflow_clients[f"client/{cid}/local_steps", round] == 3.0 for cid in ids)
        losses = [(mlflow_clients[f"client/{cid}/train_loss", round],
                   mlflow_clients[f"client/{cid}/num_examples", round]) for cid in ids]
        assert sum(loss * n for loss, n in losses) / sum(n for _, n in losses) == want["train_loss", round]


def test_a_resumed_run_hides_the_killed_runs_last_round_in_tensorboard_and_continues_the_mlflow_run(
        tmp_path: Path, monkeypatch):
    """The fault strikes after round 2 was logged but before its checkpoint: the resumed run redoes round 2."""
    config = tiny_config(rounds=2, tracking={"tensorboard": True, "mlflow": True})
    out = tmp_path / "run"
    original_save = runner.save_checkpoint

    def failing_save(out_dir, checkpoint):
        if checkpoint.round == 2:
            raise RuntimeError("killed before round 2's checkpoint")
        original_save(out_dir, checkpoint)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "save_checkpoint", failing_save)
        with pytest.raises(RuntimeError, match="killed"):
            run_simulation(config, out, show_progress=False)
    first_run = json.loads((out / "tracking.json").read_text())["mlflow_run_id"]
    run_simulation(config, out, show_progress=False, resume=True)
    want = jsonl_values(out)
    assert split(tensorboard_values(out))[0] == float32(want)  # round 2 once: the killed run's is purged
    run, histories = mlflow_histories(out)
    assert run.info.run_id == first_run and run.info.status == "FINISHED"
    assert [step for step, _ in histories["eval_loss"]] == [0, 1, 2, 2]  # MLflow keeps both round-2 values
    assert histories["eval_loss"][-1][1] == want["eval_loss", 2]


def test_a_tracker_that_is_not_installed_is_a_config_error_naming_the_extra(tmp_path: Path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "mlflow"
                        else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match=r"tracking.mlflow = true, but mlflow is not installed: pip install "
                                          r"\"fedtune\[mlflow\]\""):
        Tracking(TrackingConfig(mlflow=True), tmp_path, {})


def test_fedserver_tracks_what_its_metrics_log_writes(tmp_path: Path):
    run_part = tiny_config().model_dump(mode="json", by_alias=True, include=set(RunConfig.model_fields))
    engine = build_engine(ServerConfig.model_validate({**run_part, "tracking": {"tensorboard": True},
                                                       "server": {"run_dir": str(tmp_path)}}))
    engine.record_baseline()
    engine.metrics.close()
    assert split(tensorboard_values(tmp_path))[0] == float32(jsonl_values(tmp_path))
    assert ("eval_loss", 0) in jsonl_values(tmp_path)
