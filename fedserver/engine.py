"""The round engine: the server half of a run, independent of how messages travel.

`fedsim` drives it with in-process virtual clients; the gRPC server drives it with real ones.
Both therefore run the very same strategy objects, the same decision whether an upload is
acceptable (`check_upload`), the same validation and metrics. Its `RoundState` is the only record
of the round in progress: a transport reads it, it never keeps a copy.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.fedserver.metrics import MetricsLog, RoundMetrics
from fedtune.protos.convert import wire_size
from fedtune.protos.limits import status_details
from fedtune.strategies import fedbuff
from fedtune.strategies.api import (
    EVAL_METRICS,
    EVALUATE,
    EVALUATE_ONLY,
    EVALUATION_REPLY,
    ClientUpdate,
    Instruction,
    InvalidUpdate,
    Refusal,
    Refused,
    ServerStrategy,
    Workspace,
)
from fedtune.tasks.data import TokenDataset
from fedtune.tasks.evaluation import EvalResult, evaluate

log = logging.getLogger(__name__)


@dataclass
class RoundState:
    """What the engine knows about the round in progress.

    It is written only on the one thread that drives the engine. fedserver's event loop also reads it
    while that thread works, through single operations that are atomic against a concurrent insert
    (`in`, `len`, attribute reads), never by iterating `accepted` or `rejected`.
    """

    round: int
    selected: tuple[str, ...]  # asynchronous mode: empty (work is handed out one client at a time)
    started: float
    accepted: dict[str, ClientUpdate] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # client id -> why its reply was invalid (until a valid one)
    bytes_down: int = 0
    bytes_up: int = 0
    stale: int = 0  # asynchronous mode: updates refused as older than max_staleness
    evaluate_only: bool = False  # federated evaluation of the final model: updates carry metrics only

    def __post_init__(self) -> None:
        self._selected = frozenset(self.selected)

    def is_selected(self, client_id: str) -> bool:
        """In `selected`, in constant time: every poll and upload asks, and a round may select 10,000."""
        return client_id in self._selected

    def stragglers(self) -> list[str]:
        """Selected clients that sent no reply the strategy saw (neither accepted nor rejected)."""
        return sorted(set(self.selected) - set(self.accepted) - set(self.rejected))


class RoundEngine:
    def __init__(
        self,
        strategy: ServerStrategy,
        workspace: Workspace,
        eval_data: TokenDataset | None,
        eval_batch_size: int,
        metrics: MetricsLog,
        asynchronous: fedbuff.Config | None = None,
        federated_evaluation: bool = False,
    ):
        self.strategy = strategy
        self.asynchronous = asynchronous
        self.federated_evaluation = federated_evaluation
        self.outstanding: dict[str, int] = {}  # asynchronous mode: client -> the round of the work it holds
        self.workspace = workspace
        self.eval_data = eval_data
        self.eval_batch_size = eval_batch_size
        self.metrics = metrics
        self.current: RoundState | None = None
        self.ended: str | None = None  # why the run ended; no update is taken after it

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

    def begin_round(self, round: int, available: Sequence[str], evaluate_only: bool = False) -> dict[str, Instruction]:
        """The round's instructions: the strategy samples among `available`. In asynchronous mode
        nobody is selected up front: a round is filled by updates from work handed out by `dispatch`.
        Under federated evaluation each instruction asks its client to evaluate the global model it
        carries (EVALUATE); `evaluate_only` makes the round that evaluation alone (the final model's)."""
        selected = [] if self.asynchronous else self.strategy.sample_clients(round, available)
        self.current = RoundState(round=round, selected=tuple(selected), started=time.perf_counter(),
                                  evaluate_only=evaluate_only)
        asked = {EVALUATE_ONLY: True} if evaluate_only else {EVALUATE: True} if self.federated_evaluation else {}
        instructions = {cid: self.instruct(round, cid) for cid in selected}
        if asked:
            instructions = {cid: instruction.model_copy(update={
                "settings": {**instruction.settings, **asked},
                "reply": EVALUATION_REPLY if evaluate_only else instruction.reply,
            }) for cid, instruction in instructions.items()}
        return instructions

    def instruct(self, round: int, client_id: str) -> Instruction:
        """The strategy's instruction with the reply it asks for stated on it (the wire contract)."""
        instruction = self.strategy.instruction(round, client_id)
        return instruction.model_copy(update={"reply": self.strategy.reply_contract(client_id)})

    def can_dispatch(self, client_id: str) -> bool:
        """Asynchronous mode: a client contributes at most one update per aggregation, so that a fast
        device cannot fill the buffer alone; it gets new work once its update has been aggregated."""
        state = self.current
        return self.asynchronous is not None and state is not None and self.ended is None and \
            client_id not in state.accepted

    def dispatch(self, client_id: str) -> Instruction:
        """Asynchronous mode: hand `client_id` the current global model (work for the round being filled);
        it replaces any work the client held before (e.g. an instruction it lost)."""
        state = self.current
        assert self.asynchronous is not None and state is not None, "dispatch is for asynchronous rounds"
        instruction = self.instruct(state.round, client_id)
        self.outstanding[client_id] = state.round
        return instruction

    def buffer_full(self) -> bool:
        """Asynchronous mode: enough updates are in for an aggregation."""
        state = self.current
        return self.asynchronous is not None and state is not None and \
            len(state.accepted) >= self.asynchronous.buffer_size

    def count_down(self, instruction: Instruction, size: int | None = None) -> bool:
        """Add one delivered instruction's bytes to its round (measured here unless the transport
        measured them). False when that round is no longer in progress: a transport may finish
        sending after the round closed."""
        state = self.current
        if state is None or state.round != instruction.round:
            return False
        state.bytes_down += wire_size(instruction) if size is None else size
        return True

    def check_upload(self, client_id: str, round: int) -> None:
        """The one decision whether an update from `client_id` for `round` can be taken now; raises
        Refused saying why not. A transport may ask early (gRPC: on the stream header, before any
        data); `submit` asks again, since the round may have closed meanwhile."""
        if self.ended is not None:
            raise Refused(Refusal.RUN_OVER, "the run is over; no update is taken")
        state = self.current
        if state is None:
            raise Refused(Refusal.NO_ROUND,
                          f"ClientUpdate.round: {round}, but no round is in progress (it may have closed)")
        if self.asynchronous is not None:
            self._check_stale(client_id, round, state, self.asynchronous.max_staleness)
            if self.buffer_full():  # accepted before the round loop closed it: it would be one update too many
                raise Refused(Refusal.BUFFER_FULL, f"asynchronous round {state.round} already holds its "
                                                   f"asynchronous.buffer_size={self.asynchronous.buffer_size} "
                                                   "updates and is being aggregated; send the update again")
        elif round != state.round:
            raise Refused(Refusal.WRONG_ROUND, f"ClientUpdate.round: {round} is not the current round {state.round}")
        elif not state.is_selected(client_id):
            raise Refused(Refusal.NOT_SELECTED, f"client {client_id!r} is not selected for round {state.round}")
        if client_id in state.accepted:
            raise Refused(Refusal.DUPLICATE,
                          f"an update from {client_id!r} for round {state.round} was already accepted")

    def _check_stale(self, client_id: str, round: int, state: RoundState, max_staleness: int) -> None:
        if self.outstanding.get(client_id) != round:
            raise Refused(Refusal.NOT_SELECTED, f"ClientUpdate.round: {round}, but client {client_id!r} holds no "
                                                f"work for round {round}")
        current = state.round
        if current - round > max_staleness:
            state.stale += 1
            self.outstanding.pop(client_id)
            raise Refused(Refusal.STALE, f"ClientUpdate.round: {round} is {current - round} rounds older than the "
                                         f"current round {current}; asynchronous.max_staleness is {max_staleness}")

    def submit(self, update: ClientUpdate, size: int | None = None) -> None:
        """Accept a reply, or raise Refused: `check_upload`'s reasons, or INVALID_UPDATE when the
        strategy rejects it (counted in the round's `rejected`). A refused reply never stops the round."""
        self.check_upload(update.client_id, update.round)
        state = self.current
        assert state is not None
        try:
            if not state.evaluate_only:
                self.strategy.validate_update(update, update.round)  # the round it was computed for (async: older)
            check_evaluation(update, state.evaluate_only)
        except InvalidUpdate as error:
            state.rejected[update.client_id] = str(error)
            log.warning("rejected: %s", status_details(str(error)))
            raise Refused(Refusal.INVALID_UPDATE, str(error)) from error
        state.accepted[update.client_id] = update
        state.rejected.pop(update.client_id, None)  # its corrected update counts; the round's `rejected` does not
        self.outstanding.pop(update.client_id, None)
        state.bytes_up += wire_size(update) if size is None else size

    def finish_round(self, extra: Mapping[str, float] | None = None) -> RoundMetrics:
        """Aggregate the accepted replies, evaluate the new global model and log the round (with the
        transport's own `extra` values, e.g. stragglers). The clients' evaluation of the model the round
        started from (federated evaluation) is added to the previous round's row, which describes that
        model; an evaluate-only round adds only that, and returns the amended row."""
        state = self.current
        assert state is not None
        updates = [state.accepted[cid] for cid in sorted(state.accepted)]
        evaluated = federated_evaluation(updates)
        if evaluated:
            self.metrics.amend(state.round - 1, evaluated)
        if state.evaluate_only:
            self.current = None
            return RoundMetrics.model_validate(self.metrics.rows()[-1])
        if updates:
            self.strategy.aggregate(state.round, updates)
        result = self.evaluate_global()
        losses = [(u.metrics["train_loss"], u.num_examples) for u in updates if "train_loss" in u.metrics]
        metrics = RoundMetrics(
            round=state.round,
            clients=len(updates),
            train_loss=sum(loss * n for loss, n in losses) / sum(n for _, n in losses) if losses else None,
            eval_loss=result.loss if result else None,
            eval_accuracy=result.accuracy if result else None,
            eval_exact_match=result.exact_match if result else None,
            bytes_up=state.bytes_up,
            bytes_down=state.bytes_down,
            rejected=len(state.rejected),
            **({"stale_refused": state.stale} if self.asynchronous else {}),
            seconds=round(time.perf_counter() - state.started, 3),
            **self.strategy.round_metrics(),
            **(extra or {}),
        )
        self.metrics.append(metrics, updates)
        self.current = None
        return metrics

    def end_run(self, reason: str) -> None:
        """No round follows; every later upload is refused with RUN_OVER."""
        self.ended = reason

    def save_global(self, directory: Path) -> None:
        self.strategy.load_global_into(self.workspace)
        self.workspace.save(directory)


def federated_evaluation(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    """Example-weighted means of the clients' evaluations of the global model they received (`fed_eval_*`),
    over the updates that carry one; empty when none does."""
    reports = [update for update in updates if update.metrics.get("eval_examples", 0) > 0]
    if not reports:
        return {}
    total = sum(update.metrics["eval_examples"] for update in reports)
    means = {f"fed_{name}": sum(update.metrics[name] * update.metrics["eval_examples"] for update in reports) / total
             for name in EVAL_METRICS}
    return {**means, "fed_eval_examples": total, "fed_eval_clients": float(len(reports))}


def check_evaluation(update: ClientUpdate, evaluate_only: bool) -> None:
    """A reply's evaluation, if it carries one, complete and finite; an evaluate-only reply carries no
    tensors. InvalidUpdate names what is wrong."""
    origin = f"update from {update.client_id!r}"
    if evaluate_only and update.tensors:
        raise InvalidUpdate(f"{origin}: an evaluate-only reply carries no tensors, got {sorted(update.tensors)[:3]}")
    if "eval_examples" not in update.metrics:
        return  # no evaluation (not asked, or a client with too little data to hold any out)
    for name in (*EVAL_METRICS, "eval_examples"):
        value = update.metrics.get(name)
        if value is None or not math.isfinite(value):
            raise InvalidUpdate(f"{origin}: metric {name!r} is missing or not finite")
    if update.metrics["eval_examples"] != int(update.metrics["eval_examples"]) or update.metrics["eval_examples"] < 1:
        raise InvalidUpdate(f"{origin}: metric 'eval_examples' must be a positive whole number")
