"""The coordinator: one run's round lifecycle over the shared RoundEngine, whatever carries the messages.

It builds the run exactly as fedsim does (`resolve`, `build_workspace`, `definition.server`,
`RoundEngine`), so the strategy objects, validation and metrics are the same; only clients are
real. It answers in transport-neutral terms: a `PollAnswer`, a `HeartbeatAnswer`, or
`Refused(reason, message)`; a transport only maps those to its own messages and statuses
(gRPC: fedserver.service). This module imports no transport: the round loop never depended on
gRPC, only its answers did, so the lifecycle stays here rather than in a module of its own.

Round life: wait for `min_clients` live clients -> `begin_round` (strategy samples, instructions)
-> persist -> wait until every selected client has replied or left, or the deadline has passed and
the quorum is in -> `finish_round` (clients that never replied are counted as stragglers) ->
checkpoint (atomic) and commit the new strategy state. A resumed server continues after the last
committed round and replays the interrupted round's stored updates.

Asynchronous rounds (`[asynchronous]`, strategies.fedbuff): nobody is selected up front; a polling
client that is free gets the current global model (`RoundEngine.dispatch`, at most `concurrency` at
once, each handout persisted so a restarted server still takes the update), and the round closes once
`buffer_size` updates are in, whatever their staleness. A client whose update went into the buffer
waits for the next round before it gets new work.

Threads: every engine (hence strategy) and SQLite call runs on one worker thread (`_call`), in
order, so the event loop never blocks on aggregation, evaluation or disk and the strategy is never
touched by two threads. The round has one state, the engine's `RoundState`, written only on that
thread; the event loop reads it (poll answers, the early upload check, the round-end test) only
through lookups that are atomic against the worker's inserts. Client sessions, tokens and the open
round's deadline and instructions belong to the event loop. `prepare` runs before either serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, TypeVar

from fedtune.fedserver.config import ServerConfig
from fedtune.fedserver.engine import RoundEngine, RoundState
from fedtune.fedserver.metrics import MetricsLog, RoundMetrics
from fedtune.fedserver.store import CorruptPayload, Payload, RunStore
from fedtune.fedserver.tracking import tracking_for
from fedtune.strategies.api import ClientUpdate, DeviceProfile, Instruction, Refusal, Refused
from fedtune.strategies.mapped import release
from fedtune.tasks.data import TokenDataset, encode, load_records, split_holdout
from fedtune.tasks.models import load_model

log = logging.getLogger(__name__)
T = TypeVar("T")
KEPT_CHECKPOINTS = 2
HOUSEKEEPING_S = 2.0
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # matched in full: no trailing newline slips through
ROUND_MOVED_ON = frozenset({Refusal.RUN_OVER, Refusal.NO_ROUND, Refusal.WRONG_ROUND, Refusal.NOT_SELECTED,
                            Refusal.STALE})
"""Refusals that, when an upload is committed after its header was accepted, mean the round closed meanwhile."""


class PollKind(Enum):
    INSTRUCTION = "instruction"  # take part in `round`; the instruction comes with the answer
    WAIT = "wait"  # nothing to do now; ask again after `retry_after_s`
    DONE = "done"  # the run is over; `reason` says why


@dataclass(frozen=True)
class PollAnswer:
    """What a polling client is told."""

    kind: PollKind
    rounds: int  # the run's planned number of rounds
    round: int = 0  # the round the answer is about; 0 = none in progress
    reason: str = ""
    deadline: float = 0.0  # wall clock by which the round waits for this client's update (INSTRUCTION)
    retry_after_s: float = 0.0
    sits_out: bool = False  # the round runs without this client (its strategy may do idle work)
    instruction: Instruction | None = None


@dataclass(frozen=True)
class HeartbeatAnswer:
    round: int  # the round in progress; 0 = none
    done: bool  # the run is over


@dataclass
class ClientSession:
    """What the server knows about one client right now (the durable part is in the store)."""

    client_id: str
    token_hash: str
    profile: DeviceProfile
    last_seen: float = 0.0
    activity: str = ""
    open_pulls: int = 0
    left: str | None = None
    told_done: bool = False


@dataclass(frozen=True)
class OpenRound:
    """The round clients are told about: the engine's state of it (the object itself, not a copy) and
    what only the lifecycle knows, its deadline and each selected client's instruction."""

    state: RoundState
    deadline: float  # wall clock, as persisted
    instructions: dict[str, Instruction]  # asynchronous mode: the work handed out so far (any round still held)


def eval_dataset(config: ServerConfig, tokenizer) -> TokenDataset:
    """The server's evaluation set, chosen exactly as fedsim chooses it (the eval file, else the
    seeded held-out slice of the training source)."""
    data = config.data
    if data.eval:
        rows = load_records(data.eval, config.seed + 1)
    else:
        rows = split_holdout(load_records(data.train, config.seed, data.max_train_examples),
                             data.eval_fraction, config.seed)[1]
    return encode(rows[: data.max_eval_examples], tokenizer, data, config.model.kind, config.model.max_length)


def build_engine(config: ServerConfig) -> RoundEngine:
    """The run's strategy, workspace and evaluation set, built as fedsim builds them."""
    spec = config.run_spec()
    definition, strategy_config, context = spec.definition(), spec.strategy_config(), spec.context()
    bundle = load_model(config.model, config.seed)
    workspace = definition.build_workspace(bundle, strategy_config, context)
    strategy = definition.server(strategy_config, context)
    strategy.initialize(workspace)
    central = eval_dataset(config, bundle.tokenizer) if config.evaluation.central else None  # else: no data here
    return RoundEngine(strategy, workspace, central, config.train.eval_batch_size,
                       MetricsLog(config.run_dir(), tracking_for(config, config.run_dir())), config.asynchronous_mode(),
                       config.evaluation.federated)


class Coordinator:
    def __init__(self, config: ServerConfig, store: RunStore):
        self.config = config
        self.store = store
        self.run_dir = config.run_dir()
        self.sessions: dict[str, ClientSession] = {}
        self.tokens: dict[str, str | None] = {}
        self.run_id = ""
        self.next_round = 1
        self.waiting_for = "starting"
        self.open_round: OpenRound | None = None
        self._event = asyncio.Event()
        self._poll_event = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._register_lock = asyncio.Lock()
        self._dirty: dict[str, tuple[float, str]] = {}
        self._sent: list[tuple[Instruction, int]] = []  # delivered instructions not yet counted: (it, wire bytes)
        self.engine: RoundEngine

    @property
    def done_reason(self) -> str | None:
        """Why the run ended, once it has."""
        return self.engine.ended

    @property
    def current_round(self) -> int:
        """The round clients are told about; 0 = none."""
        return self.open_round.state.round if self.open_round else 0

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run on the engine thread (in order with every other engine/store call)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(function, *args, **kwargs))

    def _changed(self) -> None:
        """Wake the round loop (a client came, went or uploaded); it re-checks its condition."""
        self._event.set()
        self._event = asyncio.Event()

    def _round_changed(self) -> None:
        """Wake the round loop and every long poll: a round began or ended, or the run is over.
        (Long polls wait only for these, so a thousand waiting clients are not woken per upload.)"""
        self._changed()
        self._poll_event.set()
        self._poll_event = asyncio.Event()

    async def _wait(self, timeout: float, polling: bool = False) -> None:
        """Until the next change, or `timeout`. (Not asyncio.wait_for: on Python 3.11 it can swallow a
        cancellation that arrives as the event is set, and a stopped server would wait on.)"""
        event = self._poll_event if polling else self._event
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout, 0.0)):
                await event.wait()

    def touch(self, client_id: str, activity: str | None = None) -> ClientSession:
        session = self.sessions[client_id]
        session.last_seen = time.time()
        if activity is not None:
            session.activity = activity
        self._dirty[client_id] = (session.last_seen, session.activity)
        return session

    def live_clients(self) -> list[str]:
        """Clients that called within client_timeout_s (or hold a long poll open) and have not left."""
        cutoff = time.time() - self.config.server.client_timeout_s
        return sorted(cid for cid, s in self.sessions.items()
                      if s.left is None and (s.open_pulls > 0 or s.last_seen >= cutoff))

    # -- start: fresh or resumed ------------------------------------------------------------

    async def prepare(self, resume: bool, build: Callable[[ServerConfig], RoundEngine] = build_engine) -> None:
        """Build the engine (tests pass a `build` around a stub strategy), then start fresh or resume."""
        self.engine = await self._call(build, self.config)
        await self._call(self._restore if resume else self._start_fresh)
        if removed := await self._call(self.store.remove_orphan_payloads):
            log.info("removed %d payload file(s) of uploads that were never committed: %s", len(removed), removed)
        self.tokens = await self._call(self.store.tokens)

    def _start_fresh(self) -> None:
        self.run_id = uuid.uuid4().hex
        self.store.set_meta(run_id=self.run_id, config=self.config.model_dump_json(), status="running",
                            created=str(time.time()))
        self.store.save_initial_state(self.engine.strategy.state_dict())
        self.engine.metrics.jsonl.unlink(missing_ok=True)
        self.engine.record_baseline()
        self.next_round = 1

    def _restore(self) -> None:
        """Continue after the last committed round; replay the interrupted round's accepted updates."""
        self.run_id = self.store.get_meta("run_id") or ""
        strategy = self.engine.strategy
        for record in self.store.clients():
            strategy.on_client_registered(record.client_id, record.profile)
            self.sessions[record.client_id] = ClientSession(record.client_id, record.token_hash, record.profile,
                                                            left=record.left_reason)
        last, saved = self.store.latest_state()
        strategy.load_state_dict(saved)
        self.engine.metrics.truncate(last)
        self.next_round = last + 1
        self.engine.outstanding.update(self.store.handouts())  # asynchronous work still being done
        interrupted = next((r for r in self.store.rounds() if r.round == last + 1 and r.status == "running"), None)
        if interrupted is None:
            return
        instructions = self.engine.begin_round(interrupted.round, interrupted.available,
                                               self.is_evaluation_round(interrupted.round))
        if sorted(instructions) != sorted(interrupted.selected):
            log.warning("resume: round %d now selects %s, the interrupted run had selected %s (the strategy's "
                        "sampling is not deterministic)", interrupted.round, sorted(instructions), interrupted.selected)
        state = self.engine.current
        assert state is not None
        state.bytes_down = interrupted.bytes_down
        for stored in self.store.stored_updates(interrupted.round):
            try:
                update = self.store.load_update(stored)
                self.engine.submit(update, stored.wire_bytes)
                for tensor in update.tensors.values():
                    release(tensor)  # hashed and checked: its mapped pages can go until aggregation
            except Refused as refused:
                log.warning("resume: stored update no longer valid, dropped: %s", refused)
                self.store.drop_update(stored)
            except CorruptPayload as corrupt:  # the client is asked for its update again (if selected)
                log.error("resume: stored update dropped: %s", corrupt)
                self.store.drop_update(stored)
        self.open_round = OpenRound(state, interrupted.deadline, instructions)
        if self.engine.asynchronous is not None:
            log.info("resume: round %d continues with %d buffered update(s)", interrupted.round, len(state.accepted))
        else:
            log.info("resume: round %d continues with %d of %d updates already accepted", interrupted.round,
                     len(state.accepted), len(instructions))

    # -- the round loop ---------------------------------------------------------------------

    async def run(self) -> str:
        """Run rounds until the planned number, or the strategy's stop reason; returns why it ended."""
        housekeeping = asyncio.create_task(self._housekeeping())
        try:
            while True:
                if self.open_round is None:
                    evaluation = self.is_evaluation_round(self.next_round)
                    if self.next_round > self.config.rounds and not evaluation:
                        reason = f"all {self.config.rounds} rounds completed"
                        break
                    stop = None if evaluation else await self._call(self.engine.strategy.stop_reason, self.next_round)
                    stop = stop or await self._wait_for_clients()
                    if stop:
                        reason = stop
                        break
                    await self._begin_round(self.next_round)
                await self._wait_round_end()
                await self._finish_round()
            await self._call(self._end_run, reason)
            self._round_changed()
            await self._call(self.engine.metrics.plot)
            await self._call(self.engine.metrics.close)
            log.info("run finished: %s", reason)
            await self._linger()
            return reason
        finally:
            housekeeping.cancel()
            await self._flush()

    def _end_run(self, reason: str) -> None:
        self.store.set_meta(status="finished", finish_reason=reason)
        self.engine.end_run(reason)

    async def _wait_for_clients(self) -> str | None:
        """Wait until min_clients are live; or return why no round can ever start again."""
        wanted = self.config.server.min_clients
        while True:
            # Every registration wakes this loop: clients are listed only once enough have registered.
            registered = len(self.sessions)
            live = len(self.live_clients()) if registered >= wanted else 0
            if live >= wanted:
                return None
            if ended := await self._everyone_left():
                return ended
            self.waiting_for = (f"waiting for {wanted} live clients (have {live})" if registered >= wanted else
                                f"waiting for {wanted} live clients ({registered} registered)")
            await self._wait(HOUSEKEEPING_S)

    async def _everyone_left(self) -> str | None:
        """Every enrollment token is bound to a client that has left (e.g. each retired when its
        privacy budget was spent), as fedsim stops when every client has retired. An unused token
        keeps the server waiting: that device may still join. A client still in answers it without
        reading every token from SQLite (called on each registration while the first round waits)."""
        if any(session.left is None for session in self.sessions.values()):
            return None
        clients = sorted(set((await self._call(self.store.tokens)).values()), key=str)  # None: a token not used yet
        reasons = [session.left for cid in clients
                   if cid is not None and (session := self.sessions.get(cid)) is not None and session.left]
        if not clients or len(reasons) < len(clients):
            return None
        return f"every enrolled client has left (e.g. {reasons[0]})"

    async def _begin_round(self, round: int) -> None:
        available = self.live_clients()
        deadline = time.time() + self.config.server.round_deadline_s
        self.open_round = await self._call(self._open_round, round, available, deadline, {})
        log.info("round %d: %d of %d live clients selected", round, len(self.open_round.instructions),
                 len(available))
        self._round_changed()

    def _open_round(self, round: int, available: list[str], deadline: float,
                    handed_out: dict[str, Instruction]) -> OpenRound:
        """Begin `round` in the engine and the store (engine thread); `handed_out`: asynchronous work
        from earlier rounds that clients are still doing, re-sent if a client polls for it again."""
        instructions = {**handed_out, **self.engine.begin_round(round, available, self.is_evaluation_round(round))}
        state = self.engine.current
        assert state is not None
        self.store.begin_round(round, available, sorted(state.selected), deadline)
        return OpenRound(state, deadline, instructions)

    def is_evaluation_round(self, round: int) -> bool:
        """Under federated evaluation, one round after the last: the clients evaluate the final model."""
        return self.config.evaluation.federated and round == self.config.rounds + 1

    def _next_asynchronous_round(self, finished: OpenRound) -> OpenRound | None:
        """Asynchronous mode: open the next round in the same engine step that closed `finished`, so an
        update that arrives in between is never refused for want of an open round (engine thread)."""
        round = finished.state.round + 1
        if self.engine.asynchronous is None or round > self.config.rounds or self.engine.strategy.stop_reason(round):
            return None
        held = {cid: instruction for cid, instruction in finished.instructions.items()
                if self.engine.outstanding.get(cid) == instruction.round}
        return self._open_round(round, [], time.time() + self.config.server.round_deadline_s, held)

    def quorum(self) -> int:
        """Accepted updates that close the open round once its deadline has passed."""
        selected = len(self.open_round.state.selected) if self.open_round else 0
        return math.ceil(self.config.server.quorum * selected)

    def round_can_close(self, now: float) -> bool:
        """Every selected client has been accepted or has left; or the deadline has passed and the
        quorum is in. (A client whose update was invalid may still send a valid one.)"""
        assert self.open_round is not None
        if self.engine.asynchronous is not None:
            return self.engine.buffer_full()
        state = self.open_round.state
        awaited = any(cid not in state.accepted and self.sessions[cid].left is None for cid in state.selected)
        return not awaited or (now >= self.open_round.deadline and len(state.accepted) >= self.quorum())

    async def _wait_round_end(self) -> None:
        assert self.open_round is not None
        state, deadline = self.open_round.state, self.open_round.deadline
        while not self.round_can_close(now := time.time()):
            if self.engine.asynchronous is not None:
                self.waiting_for = (f"round {state.round}: {len(state.accepted)} of "
                                    f"{self.engine.asynchronous.buffer_size} buffered updates in")
            else:
                self.waiting_for = (f"round {state.round}: {len(state.accepted)} of {len(state.selected)} updates in "
                                    f"(quorum {self.quorum()})")
            await self._wait(deadline - now if now < deadline else HOUSEKEEPING_S)

    async def _finish_round(self) -> None:
        finished = self.open_round
        assert finished is not None
        state = finished.state

        def finish() -> tuple[RoundMetrics, list[str], OpenRound | None]:
            stragglers = state.stragglers()
            metrics = self.engine.finish_round({"selected": len(state.selected), "stragglers": len(stragglers)})
            if not state.evaluate_only:  # an evaluation round leaves the model as it was
                self._checkpoint(state.round)
            self.store.complete_round(state.round, self.engine.strategy.state_dict(), metrics.model_dump(),
                                      sorted(state.accepted))
            return metrics, stragglers, self._next_asynchronous_round(finished)

        await self._flush()
        metrics, stragglers, self.open_round = await self._call(finish)
        log.info("round %d done: %d updates, %d stragglers %s, eval loss %s", state.round, metrics.clients,
                 len(stragglers), stragglers, metrics.eval_loss)
        self.next_round = state.round + 1
        self._round_changed()

    def _checkpoint(self, round: int) -> None:
        """The global model in PEFT format, swapped in atomically: a complete directory is renamed into
        place, then the `global` symlink is replaced (rename) to point at it."""
        checkpoints = self.run_dir / "checkpoints"
        target = checkpoints / f"round-{round:04d}"
        staging = checkpoints / f".round-{round:04d}.tmp"
        for stale in (staging, target):
            shutil.rmtree(stale, ignore_errors=True)
        self.engine.save_global(staging)
        os.replace(staging, target)
        link = self.run_dir / "global"
        staging_link = self.run_dir / ".global.tmp"
        staging_link.unlink(missing_ok=True)
        os.symlink(target.relative_to(self.run_dir), staging_link)
        os.replace(staging_link, link)
        for old in sorted(checkpoints.glob("round-*"))[:-KEPT_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    async def _linger(self) -> None:
        """Keep answering DONE until every client still in the run has heard it (or linger_s passes),
        including one that is reconnecting after an outage."""
        end = time.monotonic() + self.config.server.linger_s
        while time.monotonic() < end:
            if all(session.told_done or session.left is not None for session in self.sessions.values()):
                return
            await self._wait(min(0.5, end - time.monotonic()))

    async def _housekeeping(self) -> None:
        """Persist last-seen times and wake waiters whose conditions depend on the clock."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            await self._flush()
            self._changed()

    async def _flush(self) -> None:
        """Persist last-seen times and count delivered instructions' bytes in their rounds, in one step
        on the engine thread for all clients since the last flush: per client, the hop and the commit
        cost more than the work. (A crash loses at most HOUSEKEEPING_S of these: a metric, not work.)"""
        dirty, self._dirty = self._dirty, {}
        sent, self._sent = self._sent, []

        def persist() -> None:
            if dirty:
                self.store.record_activity(dirty)
            down: Counter[int] = Counter()
            for instruction, wire_bytes in sent:
                if self.engine.count_down(instruction, wire_bytes):
                    down[instruction.round] += wire_bytes
            for round, wire_bytes in down.items():
                self.store.add_bytes_down(round, wire_bytes)

        await self._call(persist)

    # -- what a transport asks --------------------------------------------------------------

    async def client_for_token(self, token_hash: str) -> str | None:
        """The client id bound to a token; Refused(UNAUTHENTICATED) for an unknown token. Tokens added
        by `fedserver init` while the server runs are picked up on first use."""
        if token_hash not in self.tokens:
            known, client_id = await self._call(self.store.token, token_hash)
            if not known:
                raise Refused(Refusal.UNAUTHENTICATED, "unknown enrollment token")
            self.tokens[token_hash] = client_id
        return self.tokens[token_hash]

    async def registered_client(self, token_hash: str) -> str:
        client_id = await self.client_for_token(token_hash)
        if client_id is None:
            raise Refused(Refusal.NOT_REGISTERED, "no client is registered with this token: call Register first")
        return client_id

    async def register(self, token_hash: str, name: str, profile: DeviceProfile) -> str:
        async with self._register_lock:
            client_id = await self.client_for_token(token_hash)
            if client_id is None:
                if name and not CLIENT_ID_PATTERN.fullmatch(name):
                    raise Refused(Refusal.MALFORMED,
                                  f"RegisterRequest.name: {name[:80]!r} must be 1-64 letters, digits, '-', '_' or '.'")
                client_id = name or f"device-{token_hash[:12]}"
                if client_id in self.sessions:
                    raise Refused(Refusal.NAME_TAKEN,
                                  f"RegisterRequest.name: {client_id!r} is already registered with another token")

            def bind() -> None:  # the strategy first: it may refuse the device (e.g. too little memory)
                self.engine.strategy.on_client_registered(client_id, profile)
                self.store.bind_client(client_id, token_hash, profile, time.time())

            await self._call(bind)
            self.tokens[token_hash] = client_id
            session = self.sessions.setdefault(client_id, ClientSession(client_id, token_hash, profile))
            session.profile, session.left, session.told_done = profile, None, False
            self.touch(client_id, "registered")
        log.info("client %s registered (%s)", client_id, profile.compute_class)
        self._changed()
        return client_id

    def answer(self, client_id: str) -> PollAnswer:
        """What `client_id` is told right now: its instruction, to wait (and why), or that the run is
        over (which marks the client as having heard it)."""
        session = self.sessions[client_id]
        rounds = self.config.rounds
        if self.done_reason is not None:
            session.told_done = True
            return PollAnswer(PollKind.DONE, rounds, reason=self.done_reason)
        if session.left is not None:
            return PollAnswer(PollKind.WAIT, rounds, reason=f"client has left ({session.left}); Register to take "
                              "part again", retry_after_s=5.0)
        open_round = self.open_round
        if open_round is None:
            return PollAnswer(PollKind.WAIT, rounds, reason=self.waiting_for)
        state = open_round.state
        if self.engine.asynchronous is not None:
            return self._asynchronous_answer(client_id, open_round)
        if not state.is_selected(client_id):
            return PollAnswer(PollKind.WAIT, rounds, round=state.round, sits_out=True,
                              reason=f"round {state.round} runs without this client")
        if client_id in state.accepted:
            return PollAnswer(PollKind.WAIT, rounds, round=state.round,
                              reason=f"update for round {state.round} accepted; waiting for the round to close")
        return PollAnswer(PollKind.INSTRUCTION, rounds, round=state.round, deadline=open_round.deadline,
                          instruction=open_round.instructions[client_id])

    def _asynchronous_answer(self, client_id: str, open_round: OpenRound) -> PollAnswer:
        rounds, state, mode = self.config.rounds, open_round.state, self.engine.asynchronous
        assert mode is not None
        held = open_round.instructions.get(client_id)
        if held is not None and self.engine.outstanding.get(client_id) == held.round:
            return PollAnswer(PollKind.INSTRUCTION, rounds, round=held.round, deadline=open_round.deadline,
                              instruction=held)
        if client_id in state.accepted:
            return PollAnswer(PollKind.WAIT, rounds, round=state.round,
                              reason=f"update in round {state.round}'s buffer; new work once that round closes")
        return PollAnswer(PollKind.WAIT, rounds, round=state.round,
                          reason=f"all asynchronous.concurrency={mode.concurrency} training slots are taken")

    async def _hand_out(self, client_id: str) -> None:
        """Asynchronous mode: give a free client the current global model if a training slot is open.
        The slot count and the handout happen on the engine thread, so concurrent polls cannot overfill it."""
        open_round, mode = self.open_round, self.engine.asynchronous
        if mode is None or open_round is None or self.sessions[client_id].left is not None:
            return
        held = open_round.instructions.get(client_id)
        if held is not None and self.engine.outstanding.get(client_id) == held.round:
            return
        live = set(self.live_clients())

        def hand_out() -> Instruction | None:
            busy = sum(1 for cid in self.engine.outstanding if cid in live and cid != client_id)
            if not self.engine.can_dispatch(client_id) or (mode.concurrency is not None and busy >= mode.concurrency):
                return None
            instruction = self.engine.dispatch(client_id)
            self.store.save_handout(client_id, instruction.round)
            return instruction

        instruction = await self._call(hand_out)
        if instruction is not None and self.open_round is open_round:
            open_round.instructions[client_id] = instruction

    async def pull(self, client_id: str, wait_s: float) -> PollAnswer:
        """Long poll: the client's instruction, DONE, or WAIT once nothing changed for `wait_s`."""
        session = self.touch(client_id, "polling")
        session.open_pulls += 1
        end = time.monotonic() + min(wait_s, self.config.server.long_poll_s)
        try:
            while True:
                await self._hand_out(client_id)
                answer = self.answer(client_id)
                remaining = end - time.monotonic()
                if answer.kind is not PollKind.WAIT or remaining <= 0:
                    if answer.kind is PollKind.WAIT and not answer.retry_after_s and wait_s <= 0:
                        answer = replace(answer, retry_after_s=1.0)  # it would not wait: not straight back either
                    return answer
                await self._wait(remaining, polling=True)
        finally:
            session.open_pulls -= 1
            self.touch(client_id)

    def instruction_sent(self, client_id: str, instruction: Instruction, wire_bytes: int) -> None:
        """Count a delivered instruction's bytes in its round, if that round is still open (at the next
        flush, at the latest when the round finishes)."""
        self.touch(client_id, "training")
        self._sent.append((instruction, wire_bytes))

    def check_upload(self, client_id: str, round: int) -> None:
        """Refuse early, before any data arrives: the engine's own decision, read from the event loop."""
        self.engine.check_upload(client_id, round)

    async def submit(self, client_id: str, update: ClientUpdate, wire_bytes: int, received_s: float = 0.0,
                     payload: Payload | None = None) -> None:
        """Decide again (the round may have closed while the payload streamed), validate with the
        strategy (via the engine) and store durably before the client hears OK. `payload`: the
        update's bytes already in a synced file (the transport received them there); from here on
        this call owns it, and removes it unless the update is accepted."""
        started = time.perf_counter()

        def accept() -> None:
            try:
                self.engine.submit(update, wire_bytes)
            except BaseException as error:
                if payload is not None:
                    self.store.discard_payload(payload)
                if isinstance(error, Refused) and error.reason in ROUND_MOVED_ON:
                    closed = f"{error} (the round closed before the upload completed)"
                    raise Refused(error.reason, closed) from error
                raise
            self.store.save_update(update, wire_bytes, payload, group=True)

        await self._call(accept)
        await self._call(self.store.commit_updates)  # queued behind the updates accepted meanwhile: one commit
        self.touch(client_id, f"uploaded round {update.round}")
        log.info("round %d: update from %s accepted (%d bytes; received in %.2f s, validated and stored in %.2f s)",
                 update.round, client_id, wire_bytes, received_s, time.perf_counter() - started)
        self._changed()

    def heartbeat(self, client_id: str, activity: str) -> HeartbeatAnswer:
        """Liveness only: a client has heard DONE when a pull told it (its heartbeat thread may be
        answered while its main loop still waits to reconnect)."""
        self.touch(client_id, activity or None)
        return HeartbeatAnswer(round=self.current_round, done=self.done_reason is not None)

    async def leave(self, client_id: str, reason: str) -> None:
        session = self.touch(client_id, "left")
        session.left = reason or "left"
        await self._call(self.store.set_left, client_id, session.left)
        log.info("client %s left: %s", client_id, session.left)
        self._changed()
