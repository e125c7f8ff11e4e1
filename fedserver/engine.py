"""The round engine: the server half of a run, independent of how messages travel.

`fedsim` drives it with in-process virtual clients; the gRPC server drives it with real ones.
Both therefore run the very same strategy objects, validation and metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.fedserver.metrics import MetricsLog, RoundMetrics
from fedtune.protos.convert import wire_size
from fedtune.strategies.api import ClientUpdate, Instruction, InvalidUpdate, ServerStrategy, Workspace
from fedtune.tasks.data import TokenDataset
from fedtune.tasks.evaluation import EvalResult, evaluate

log = logging.getLogger(__name__)


@dataclass
class RoundState:
    """What the engine knows about the round in progress."""

    round: int
    selected: list[str]
    started: float
    accepted: dict[str, ClientUpdate] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0


class RoundEngine:
    def __init__(
        self,
        strategy: ServerStrategy,
        workspace: Workspace,
        eval_data: TokenDataset | None,
        eval_batch_size: int,
        metrics: MetricsLog,
    ):
        self.strategy = strategy
        self.workspace = workspace
        self.eval_data = eval_data
        self.eval_batch_size = eval_batch_size
        self.metrics = metrics
        self.current: RoundState | None = None

    def evaluate_global(self) -> EvalResult | None:
        if self.eval_data is None:
            return None
        self.strategy.load_global_into(self.workspace)
        return evaluate(self.workspace.model, self.eval_data, self.eval_batch_size)

    def record_baseline(self) -> RoundMetrics:
        """Round 0: the initial global model, before any training."""
        result = self.evaluate_global()
        metrics = RoundMetrics(
            round=0, clients=0, train_loss=None, bytes_up=0, bytes_down=0,
            eval_loss=result.loss if result else None,
            eval_accuracy=result.accuracy if result else None,
            eval_exact_match=result.exact_match if result else None,
        )
        self.metrics.append(metrics)
        return metrics

    def begin_round(self, round: int, available: Sequence[str]) -> dict[str, Instruction]:
        selected = self.strategy.sample_clients(round, available)
        self.current = RoundState(round=round, selected=selected, started=time.perf_counter())
        instructions = {cid: self.strategy.instruction(round, cid) for cid in selected}
        return instructions

    def count_down(self, instruction: Instruction, size: int | None = None) -> None:
        """Add one instruction's bytes on the wire (measured here unless the transport measured it)."""
        assert self.current is not None
        self.current.bytes_down += wire_size(instruction) if size is None else size

    def submit(self, update: ClientUpdate, size: int | None = None) -> None:
        """Accept a valid reply or raise InvalidUpdate; a rejected reply never stops the round."""
        state = self.current
        if state is None:
            raise InvalidUpdate(f"update from {update.client_id!r}: no round is in progress")
        if update.client_id not in state.selected:
            raise InvalidUpdate(f"update from {update.client_id!r}: client not selected for round {state.round}")
        if update.client_id in state.accepted:
            raise InvalidUpdate(f"update from {update.client_id!r}: duplicate upload for round {state.round}")
        try:
            self.strategy.validate_update(update, state.round)
        except InvalidUpdate as error:
            state.rejected[update.client_id] = str(error)
            log.warning("rejected: %s", error)
            raise
        state.accepted[update.client_id] = update
        state.bytes_up += wire_size(update) if size is None else size

    def finish_round(self, extra: Mapping[str, float] | None = None) -> RoundMetrics:
        """Aggregate the accepted replies, evaluate the new global model and log the round
        (with the transport's own `extra` values, e.g. stragglers)."""
        state = self.current
        assert state is not None
        updates = [state.accepted[cid] for cid in sorted(state.accepted)]
        if updates:
            self.strategy.aggregate(state.round, updates)
        result = self.evaluate_global()
        total = sum(u.num_examples for u in updates)
        losses = [(u.metrics["train_loss"], u.num_examples) for u in updates if "train_loss" in u.metrics]
        metrics = RoundMetrics(
            round=state.round,
            clients=len(updates),
            train_loss=sum(loss * n for loss, n in losses) / total if losses else None,
            eval_loss=result.loss if result else None,
            eval_accuracy=result.accuracy if result else None,
            eval_exact_match=result.exact_match if result else None,
            bytes_up=state.bytes_up,
            bytes_down=state.bytes_down,
            rejected=len(state.rejected),
            seconds=round(time.perf_counter() - state.started, 3),
            **self.strategy.round_metrics(),
            **(extra or {}),
        )
        self.metrics.append(metrics)
        self.current = None
        return metrics

    def save_global(self, directory: Path) -> None:
        self.strategy.load_global_into(self.workspace)
        self.workspace.save(directory)
