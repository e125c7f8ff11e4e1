"""Experiment tracking: every metrics.jsonl value, and each accepted update's metrics, in TensorBoard and MLflow.

`MetricsLog` hands `Tracking` what it writes: a round's row, values added to a row later (federated
evaluation), and the round's accepted updates. fedsim and fedserver build it alike from the run
config's `[tracking]`. Both trackers are optional extras (`pip install "fedtune[tensorboard]"`,
`"fedtune[mlflow]"`), imported only by a run that turns one on; one that is turned on but not
installed is a config error before any work starts.

Names: a round's value under its metrics.jsonl key (`eval_loss`, ...), at step = round; a client's
as `client/<client id>/<metric>` (`train_loss`, `local_steps`, ... and `num_examples`), at the step of
the round that aggregated it.

Resuming: trackers open at the first value written, after a resumed run has cut metrics.jsonl back to
its last completed round r. TensorBoard then hides what a killed run wrote at steps after r
(`purge_step`), and MLflow continues the same run (its id is kept in <out>/tracking.json); MLflow
cannot drop a value, so a round logged just before a kill shows twice there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedtune.strategies.api import ClientUpdate
from fedtune.strategies.runconfig import ConfigError, RunConfig, TrackingConfig

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RECORD = "tracking.json"
MLFLOW_BATCH = 1000  # metrics per log_batch call, MLflow's limit
MLFLOW_PARAM_BATCH = 100  # params per log_batch call, MLflow's limit
MLFLOW_NAME = re.compile(r"[^\w\-. :/]")  # what MLflow refuses in a metric name


class Tracker(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class Tracking:
    """The run's trackers, checked when built and opened at the first value."""

    def __init__(self, config: TrackingConfig, out_dir: Path, params: Mapping[str, Any]):
        for wanted, module, extra in ((config.tensorboard, "tensorboard", "tensorboard"),
                                      (config.mlflow, "mlflow", "mlflow")):
            if wanted and importlib.util.find_spec(module) is None:
                raise ConfigError(f"tracking.{extra} = true, but {module} is not installed: "
                                  f"pip install \"fedtune[{extra}]\" -c constraints.txt")
        self.config = config
        self.out_dir = out_dir
        self.params = params
        self._trackers: list[Tracker] | None = None

    @property
    def opened(self) -> bool:
        return self._trackers is not None

    def open(self, resumed_after: int | None) -> None:
        """Start the trackers: a fresh run (None), or one resumed after round `resumed_after`."""
        trackers: list[Tracker] = []
        if self.config.tensorboard:
            trackers.append(TensorBoardTracker(self.out_dir / TENSORBOARD_DIR,
                                               0 if resumed_after is None else resumed_after + 1))
        if self.config.mlflow:
            trackers.append(MlflowTracker(self.config, self.out_dir, self.params, resumed_after is not None))
        self._trackers = trackers

    def log_round(self, round: int, row: Mapping[str, Any]) -> None:
        """A round's metrics.jsonl values (or values added to its row later); None and non-numbers are left out."""
        self._log(round, {key: float(value) for key, value in row.items()
                          if key != "round" and isinstance(value, int | float) and not isinstance(value, bool)})

    def log_clients(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        """Each accepted update's own metrics, by client id."""
        self._log(round, dict(client_values(updates)))

    def _log(self, step: int, values: Mapping[str, float]) -> None:
        assert self._trackers is not None, "open() the trackers first"
        if values:
            for tracker in self._trackers:
                tracker.log(step, values)

    def close(self) -> None:
        for tracker in self._trackers or ():
            tracker.close()
        self._trackers = None


def tracking_for(config: RunConfig, out_dir: Path) -> Tracking | None:
    """The run's tracking (the whole config goes to MLflow as params), or None when `[tracking]` turns nothing on."""
    wanted = config.tracking
    return Tracking(wanted, out_dir, config.model_dump(mode="json")) if wanted.tensorboard or wanted.mlflow else None


def client_values(updates: Sequence[ClientUpdate]) -> Iterator[tuple[str, float]]:
    for update in updates:
        prefix = f"client/{MLFLOW_NAME.sub('_', update.client_id)}"
        yield f"{prefix}/num_examples", float(update.num_examples)
        for name, value in sorted(update.metrics.items()):
            yield f"{prefix}/{MLFLOW_NAME.sub('_', name)}", float(value)


class TensorBoardTracker:
    """Scalars in event files under `log_dir`; `purge_step` hides a killed run's later steps."""

    def __init__(self, log_dir: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # on disk each round: a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run: the flattened config as params, then the metrics; resumed runs continue it."""

    def __init__(self, config: TrackingConfig, out_dir: Path, params: Mapping[str, Any], resumed: bool):
        uri = config.mlflow_tracking_uri or (out_dir / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from a federated run's host
        if uri.startswith("file:"):
            # MLflow 3 refuses new file stores unless told; the local store is what this setting asks for
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        record = out_dir / MLFLOW_RECORD
        previous = json.loads(record.read_text()) if resumed and record.exists() else {}
        if previous.get("mlflow_tracking_uri") == uri:
            self.run_id = previous["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(config.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(config.mlflow_experiment))
        self.run_id = self.client.create_run(experiment_id, run_name=config.mlflow_run_name or out_dir.name).info.run_id
        self._log_params(params)
        record.write_text(json.dumps({"mlflow_tracking_uri": uri, "mlflow_run_id": self.run_id}))

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(key, json.dumps(value) if not isinstance(value, str) else value)
                for key, value in flatten(params)]
        for start in range(0, len(flat), MLFLOW_PARAM_BATCH):
            self.client.log_batch(self.run_id, params=flat[start:start + MLFLOW_PARAM_BATCH])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in values.items()]
        for start in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + MLFLOW_BATCH])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """`{"train": {"batch_size": 8}}` as `("train.batch_size", 8)`; unset (None) fields are left out."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        elif value is not None:
            yield f"{prefix}{key}", value
