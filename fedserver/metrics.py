"""Per-round metrics: one pydantic record per round, written as JSONL and CSV and plotted as PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict


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
    """Appends each round to `metrics.jsonl` as it completes; CSV and PNG are rewritten from it."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = out_dir / "metrics.jsonl"

    def rows(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def append(self, metrics: RoundMetrics) -> None:
        with self.jsonl.open("a") as handle:
            handle.write(metrics.model_dump_json() + "\n")
        self._write_csv()

    def truncate(self, last_round: int) -> None:
        """Drop rows after `last_round` (a resumed server redoes a round whose row it wrote but never committed)."""
        kept = [row for row in self.rows() if row["round"] <= last_round]
        self.jsonl.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._write_csv()

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
        for key, axis in (("train_loss", loss_axis), ("eval_loss", loss_axis),
                          ("eval_accuracy", accuracy_axis), ("eval_exact_match", accuracy_axis)):
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
