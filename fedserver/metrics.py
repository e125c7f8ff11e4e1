"""Per-round metrics: one pydantic record per round, written as JSONL and CSV and plotted as PNG."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fedtune.fedserver.tracking import Tracking
from fedtune.strategies.api import ClientUpdate


class RoundMetrics(BaseModel):
    """One line of metrics.jsonl. Round 0 is the evaluation before any training."""

    model_config = ConfigDict(extra="allow")
    round: int
    clients: int
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    eval_exact_match: float | None = None
    bytes_up: int
    bytes_down: int
    rejected: int = 0
    seconds: float = 0.0


class MetricsLog:
    """Appends each round to `metrics.jsonl` as it completes; CSV and PNG are rewritten from it, and
    `tracking` (TensorBoard, MLflow) gets the same values plus the round's accepted updates' metrics."""

    def __init__(self, out_dir: Path, tracking: Tracking | None = None):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = out_dir / "metrics.jsonl"
        self.tracking = tracking

    def rows(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def append(self, metrics: RoundMetrics, updates: Sequence[ClientUpdate] = ()) -> None:
        """Log a round; `updates` are the ones it aggregated, whose own metrics go to the trackers by client."""
        tracking = self._tracking()
        with self.jsonl.open("a") as handle:
            handle.write(metrics.model_dump_json() + "\n")
        self._write_csv()
        if tracking is not None:
            tracking.log_round(metrics.round, metrics.model_dump())
            tracking.log_clients(metrics.round, updates)

    def amend(self, round: int, values: dict[str, float]) -> None:
        """Add `values` to the row of `round` (e.g. the clients' evaluation of that round's model, which
        arrives with the next round's updates)."""
        tracking = self._tracking()
        self.restore([{**row, **values} if row["round"] == round else row for row in self.rows()])
        if tracking is not None:
            tracking.log_round(round, values)

    def truncate(self, last_round: int) -> None:
        """Drop rows after `last_round` (a resumed server redoes a round whose row it wrote but never committed)."""
        self.restore([row for row in self.rows() if row["round"] <= last_round])

    def restore(self, rows: Sequence[dict[str, Any]]) -> None:
        """Make `rows` the whole log (a resumed run's rows up to its last completed round)."""
        self.jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
        self._write_csv()

    def close(self) -> None:
        """End the trackers' run (TensorBoard files closed, the MLflow run marked finished)."""
        if self.tracking is not None:
            self.tracking.close()

    def _tracking(self) -> Tracking | None:
        """The trackers, opened at the first value: after a resumed run has cut this log back, so they know
        from which round on they are written again."""
        if self.tracking is not None and not self.tracking.opened:
            rows = self.rows()
            self.tracking.open(rows[-1]["round"] if rows else None)
        return self.tracking

    def _write_csv(self) -> None:
        rows = self.rows()
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with (self.out_dir / "metrics.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def plot(self) -> Path:
        """Loss and accuracy curves over rounds."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
        for key, axis in (("train_loss", loss_axis), ("eval_loss", loss_axis), ("fed_eval_loss", loss_axis),
                          ("eval_accuracy", accuracy_axis), ("eval_exact_match", accuracy_axis),
                          ("fed_eval_accuracy", accuracy_axis)):
            points = [(row["round"], row[key]) for row in rows if row.get(key) is not None]
            if points:
                axis.plot(*zip(*points, strict=False), marker="o", label=key)
        for axis, title in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
            axis.set_xlabel("round")
            axis.set_title(title)
            axis.legend()
            axis.grid(alpha=0.3)
        figure.tight_layout()
        path = self.out_dir / "metrics.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path
