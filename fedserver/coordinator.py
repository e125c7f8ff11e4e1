"""The coordinator: one run's round loop over the shared RoundEngine, and the answers the transport gives.

It builds the run exactly as fedsim does (`resolve`, `build_workspace`, `definition.server`,
`RoundEngine`), so the strategy objects, validation and metrics are the same; only clients are
real. Every engine and SQLite call runs on one worker thread (`_call`), in order, so the event
loop that serves gRPC never blocks on aggregation, evaluation or disk, and the strategy is never
touched by two threads. The loop keeps its own view of the round (`selected`, `accepted`) for
answering polls without reaching into the engine from another thread.

Round life: wait for `min_clients` live clients -> `begin_round` (strategy samples, instructions)
-> persist -> wait until every selected client has replied, or the deadline has passed and the
quorum is in -> `finish_round` -> checkpoint (atomic) and commit the new strategy state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from fedtune.fedserver.config import ServerConfig
from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog, RoundMetrics
from fedtune.fedserver.store import RunStore
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.payload import CLIENT_ID_PATTERN
from fedtune.strategies.api import ClientUpdate, DeviceProfile, Instruction, InvalidUpdate, ServerStrategy, Workspace
from fedtune.tasks.data import TokenDataset, encode, load_records, split_holdout
from fedtune.tasks.models import load_model

log = logging.getLogger(__name__)
T = TypeVar("T")
KEPT_CHECKPOINTS = 2
HOUSEKEEPING_S = 2.0


class Refusal(Exception):
    """A request the server refuses; `code` is the gRPC status the client gets, the message names why."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


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


@dataclass
class RoundView:
    """The event loop's view of the round in progress (round 0 = none)."""

    round: int = 0
    selected: set[str] = field(default_factory=set)
    accepted: set[str] = field(default_factory=set)
    deadline: float = 0.0  # wall clock, as persisted


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


def upload_refusal(client_id: str, round: int, view: RoundView, done: bool) -> Refusal | None:
    """Why an update from `client_id` for `round` cannot be taken now, or None."""
    if done:
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION, "the run is over; no update is taken")
    if view.round == 0:
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                       f"ClientUpdate.round: {round}, but no round is in progress (it may have closed)")
    if round != view.round:
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                       f"ClientUpdate.round: {round} is not the current round {view.round}")
    if client_id not in view.selected:
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                       f"client {client_id!r} is not selected for round {view.round}")
    if client_id in view.accepted:
        return Refusal(grpc.StatusCode.ALREADY_EXISTS,
                       f"an update from {client_id!r} for round {view.round} was already accepted")
    return None


class Coordinator:
    def __init__(self, config: ServerConfig, store: RunStore):
        self.config = config
        self.store = store
        self.run_dir = config.run_dir()
        self.view = RoundView()
        self.sessions: dict[str, ClientSession] = {}
        self.tokens: dict[str, str | None] = {}
        self.run_id = ""
        self.next_round = 1
        self.done_reason: str | None = None
        self.waiting_for = "starting"
        self._instructions: dict[str, Instruction] = {}
        self._event = asyncio.Event()
        self._poll_event = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._register_lock = asyncio.Lock()
        self._dirty: dict[str, tuple[float, str]] = {}
        self.strategy: ServerStrategy
        self.workspace: Workspace
        self.engine: RoundEngine

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
        event = self._poll_event if polling else self._event
        try:
            await asyncio.wait_for(event.wait(), max(timeout, 0.0))
        except TimeoutError:
            pass

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

    async def prepare(self, resume: bool) -> None:
        await self._call(self._build)
        await self._call(self._restore if resume else self._start_fresh)
        self.tokens = await self._call(self.store.tokens)

    def _build(self) -> None:
        config = self.config
        definition = config.run_spec().definition()
        strategy_config = config.run_spec().strategy_config()
        context = config.run_spec().context()
        bundle = load_model(config.model, config.seed)
        self.workspace = definition.build_workspace(bundle, strategy_config, context)
        self.strategy = definition.server(strategy_config, context)
        self.strategy.initialize(self.workspace)
        self.engine = RoundEngine(self.strategy, self.workspace, eval_dataset(config, bundle.tokenizer),
                                  config.train.eval_batch_size, MetricsLog(self.run_dir))

    def _start_fresh(self) -> None:
        self.run_id = uuid.uuid4().hex
        self.store.set_meta(run_id=self.run_id, config=self.config.model_dump_json(), status="running",
                            created=str(time.time()))
        self.store.save_initial_state(self.strategy.state_dict())
        self.engine.metrics.jsonl.unlink(missing_ok=True)
        self.engine.record_baseline()
        self.next_round = 1

    def _restore(self) -> None:
        """Continue after the last committed round; replay the interrupted round's accepted updates."""
        self.run_id = self.store.get_meta("run_id") or ""
        for record in self.store.clients():
            self.strategy.on_client_registered(record.client_id, record.profile)
            self.sessions[record.client_id] = ClientSession(record.client_id, record.token_hash, record.profile,
                                                            left=record.left_reason)
        last, state = self.store.latest_state()
        self.strategy.load_state_dict(state)
        self.engine.metrics.truncate(last)
        self.next_round = last + 1
        interrupted = next((r for r in self.store.rounds() if r.round == last + 1 and r.status == "running"), None)
        if interrupted is None:
            return
        self._instructions = self.engine.begin_round(interrupted.round, interrupted.available)
        if sorted(self._instructions) != sorted(interrupted.selected):
            log.warning("resume: round %d now selects %s, the interrupted run had selected %s (the strategy's "
                        "sampling is not deterministic)", interrupted.round, sorted(self._instructions),
                        interrupted.selected)
        assert self.engine.current is not None
        self.engine.current.bytes_down = interrupted.bytes_down
        accepted = set()
        for update, wire_bytes in self.store.load_updates(interrupted.round):
            try:
                self.engine.submit(update, wire_bytes)
                accepted.add(update.client_id)
            except InvalidUpdate as error:
                log.warning("resume: stored update no longer valid, dropped: %s", error)
        self.view = RoundView(interrupted.round, set(self._instructions), accepted, interrupted.deadline)
        log.info("resume: round %d continues with %d of %d updates already accepted", interrupted.round,
                 len(accepted), len(self._instructions))

    # -- the round loop ---------------------------------------------------------------------

    async def run(self) -> str:
        """Run rounds until the planned number, or the strategy's stop reason; returns why it ended."""
        housekeeping = asyncio.create_task(self._housekeeping())
        try:
            while True:
                if self.view.round == 0:
                    if self.next_round > self.config.rounds:
                        reason = f"all {self.config.rounds} rounds completed"
                        break
                    stop = await self._call(self.strategy.stop_reason, self.next_round) or await self._wait_for_clients()
                    if stop:
                        reason = stop
                        break
                    await self._begin_round(self.next_round)
                await self._wait_round_end()
                await self._finish_round()
            self.done_reason = reason
            await self._call(self.store.set_meta, status="finished", finish_reason=reason)
            self._round_changed()
            await self._call(self.engine.metrics.plot)
            log.info("run finished: %s", reason)
            await self._linger()
            return reason
        finally:
            housekeeping.cancel()
            await self._call(self._flush_activity)

    async def _wait_for_clients(self) -> str | None:
        """Wait until min_clients are live; or return why no round can ever start again."""
        wanted = self.config.server.min_clients
        while len(live := self.live_clients()) < wanted:
            if ended := await self._everyone_left():
                return ended
            self.waiting_for = f"waiting for {wanted} live clients (have {len(live)})"
            await self._wait(HOUSEKEEPING_S)
        return None

    async def _everyone_left(self) -> str | None:
        """Every enrollment token is bound to a client that has left (e.g. each retired when its
        privacy budget was spent), as fedsim stops when every client has retired. An unused token
        keeps the server waiting: that device may still join."""
        clients = set((await self._call(self.store.tokens)).values())  # None: a token not used yet
        sessions = [self.sessions.get(cid) if cid is not None else None for cid in sorted(clients, key=str)]
        if not sessions or not all(session is not None and session.left for session in sessions):
            return None
        return f"every enrolled client has left (e.g. {sessions[0].left})"

    async def _begin_round(self, round: int) -> None:
        available = self.live_clients()
        deadline = time.time() + self.config.server.round_deadline_s

        def begin() -> dict[str, Instruction]:
            instructions = self.engine.begin_round(round, available)
            self.store.begin_round(round, available, sorted(instructions), deadline)
            return instructions

        self._instructions = await self._call(begin)
        self.view = RoundView(round, set(self._instructions), set(), deadline)
        log.info("round %d: %d of %d live clients selected", round, len(self._instructions), len(available))
        self._round_changed()

    def quorum(self) -> int:
        return math.ceil(self.config.server.quorum * len(self.view.selected))

    async def _wait_round_end(self) -> None:
        view = self.view
        while True:
            gone = {cid for cid in view.selected if self.sessions[cid].left is not None}
            awaited = view.selected - view.accepted - gone
            if not awaited:
                return
            now = time.time()
            if now >= view.deadline and len(view.accepted) >= self.quorum():
                return
            self.waiting_for = (f"round {view.round}: {len(view.accepted)} of {len(view.selected)} updates in "
                                f"(quorum {self.quorum()})")
            await self._wait(view.deadline - now if now < view.deadline else HOUSEKEEPING_S)

    async def _finish_round(self) -> None:
        view = self.view

        def finish() -> tuple[RoundMetrics, list[str]]:
            state = self.engine.current
            assert state is not None
            stragglers = sorted(set(state.selected) - set(state.accepted) - set(state.rejected))
            participants = sorted(state.accepted)
            metrics = self.engine.finish_round({"selected": len(state.selected), "stragglers": len(stragglers)})
            self._checkpoint(view.round)
            self.store.complete_round(view.round, self.strategy.state_dict(), metrics.model_dump(), participants)
            return metrics, stragglers

        metrics, stragglers = await self._call(finish)
        log.info("round %d done: %d updates, %d stragglers %s, eval loss %s", view.round, metrics.clients,
                 len(stragglers), stragglers, metrics.eval_loss)
        self.next_round = view.round + 1
        self.view = RoundView()
        self._instructions = {}
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
            await self._call(self._flush_activity)
            self._changed()

    def _flush_activity(self) -> None:
        dirty, self._dirty = self._dirty, {}
        if dirty:
            self.store.record_activity(dirty)

    # -- what the transport asks ------------------------------------------------------------

    async def client_for_token(self, token_hash: str) -> str | None:
        """The client id bound to a token; Refusal(UNAUTHENTICATED) for an unknown token. Tokens added
        by `fedserver init` while the server runs are picked up on first use."""
        if token_hash not in self.tokens:
            known, client_id = await self._call(self.store.token, token_hash)
            if not known:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown enrollment token")
            self.tokens[token_hash] = client_id
        return self.tokens[token_hash]

    async def registered_client(self, token_hash: str) -> str:
        client_id = await self.client_for_token(token_hash)
        if client_id is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, "no client is registered with this token: call Register first")
        return client_id

    async def register(self, token_hash: str, name: str, profile: DeviceProfile) -> str:
        async with self._register_lock:
            client_id = await self.client_for_token(token_hash)
            if client_id is None:
                if name and not CLIENT_ID_PATTERN.match(name):
                    raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"RegisterRequest.name: {name[:80]!r} must be 1-64 letters, digits, '-', '_' or '.'")
                client_id = name or f"device-{token_hash[:12]}"
                if client_id in self.sessions:
                    raise Refusal(grpc.StatusCode.ALREADY_EXISTS,
                                  f"RegisterRequest.name: {client_id!r} is already registered with another token")

            def bind() -> None:
                self.store.bind_client(client_id, token_hash, profile, time.time())
                self.strategy.on_client_registered(client_id, profile)

            await self._call(bind)
            self.tokens[token_hash] = client_id
            session = self.sessions.setdefault(client_id, ClientSession(client_id, token_hash, profile))
            session.profile, session.left, session.told_done = profile, None, False
            self.touch(client_id, "registered")
        log.info("client %s registered (%s)", client_id, profile.compute_class)
        self._changed()
        return client_id

    def _answer(self, client_id: str) -> tuple[pb.PullStatus, Instruction | None]:
        session = self.sessions[client_id]
        view = self.view
        common = {"rounds": self.config.rounds}
        if self.done_reason is not None:
            session.told_done = True
            return pb.PullStatus(kind=pb.PullStatus.DONE, reason=self.done_reason, **common), None
        if session.left is not None:
            return pb.PullStatus(kind=pb.PullStatus.WAIT, reason=f"client has left ({session.left}); Register to "
                                 "take part again", retry_after_ms=5000, **common), None
        if view.round and client_id in view.selected and client_id not in view.accepted:
            return pb.PullStatus(kind=pb.PullStatus.INSTRUCTION, round=view.round,
                                 deadline_unix_ms=int(view.deadline * 1000), **common), self._instructions[client_id]
        if view.round and client_id in view.selected:
            return pb.PullStatus(kind=pb.PullStatus.WAIT, round=view.round, reason=f"update for round {view.round} "
                                 "accepted; waiting for the round to close", **common), None
        if view.round:
            return pb.PullStatus(kind=pb.PullStatus.WAIT, round=view.round, sits_out=True,
                                 reason=f"round {view.round} runs without this client", **common), None
        return pb.PullStatus(kind=pb.PullStatus.WAIT, reason=self.waiting_for, **common), None

    async def pull(self, client_id: str, wait_s: float) -> tuple[pb.PullStatus, Instruction | None]:
        """Long poll: the client's instruction, DONE, or WAIT once nothing changed for `wait_s`."""
        session = self.touch(client_id, "polling")
        session.open_pulls += 1
        end = time.monotonic() + min(wait_s, self.config.server.long_poll_s)
        try:
            while True:
                status, instruction = self._answer(client_id)
                remaining = end - time.monotonic()
                if status.kind != pb.PullStatus.WAIT or remaining <= 0:
                    if status.kind == pb.PullStatus.WAIT and not status.retry_after_ms:
                        status.retry_after_ms = 0 if wait_s > 0 else 1000
                    return status, instruction
                await self._wait(remaining, polling=True)
        finally:
            session.open_pulls -= 1
            self.touch(client_id)

    async def instruction_sent(self, client_id: str, round: int, wire_bytes: int) -> None:
        """Count a delivered instruction's bytes in the round it belongs to."""
        def count() -> None:
            current = self.engine.current
            if current is not None and current.round == round:
                current.bytes_down += wire_bytes
                self.store.add_bytes_down(round, wire_bytes)

        self.touch(client_id, "training")
        await self._call(count)

    def check_upload(self, client_id: str, round: int) -> None:
        """Refuse early (on the stream header, before any data): wrong round, not selected, duplicate."""
        refusal = upload_refusal(client_id, round, self.view, self.done_reason is not None)
        if refusal is not None:
            raise refusal

    async def submit(self, client_id: str, update: ClientUpdate, wire_bytes: int, received_s: float = 0.0) -> None:
        """Validate with the strategy (via the engine) and store durably before the client hears OK."""
        view = self.view
        started = time.perf_counter()

        def accept() -> None:
            current = self.engine.current
            engine_view = RoundView(current.round, set(current.selected), set(current.accepted)) if current else RoundView()
            refusal = upload_refusal(client_id, update.round, engine_view, self.done_reason is not None)
            if refusal is not None:
                if refusal.code == grpc.StatusCode.FAILED_PRECONDITION:
                    refusal = Refusal(refusal.code, f"{refusal} (the round closed before the upload completed)")
                raise refusal
            try:
                self.engine.submit(update, wire_bytes)
            except InvalidUpdate as error:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error
            self.store.save_update(update, wire_bytes)

        await self._call(accept)
        if view is self.view:
            view.accepted.add(client_id)
        self.touch(client_id, f"uploaded round {update.round}")
        log.info("round %d: update from %s accepted (%d bytes; received in %.2f s, validated and stored in %.2f s)",
                 update.round, client_id, wire_bytes, received_s, time.perf_counter() - started)
        self._changed()

    def heartbeat(self, client_id: str, activity: str) -> pb.HeartbeatReply:
        """Liveness only: a client has heard DONE when a pull told it (its heartbeat thread may be
        answered while its main loop still waits to reconnect)."""
        self.touch(client_id, activity or None)
        return pb.HeartbeatReply(current_round=self.view.round, done=self.done_reason is not None)

    async def leave(self, client_id: str, reason: str) -> None:
        session = self.touch(client_id, "left")
        session.left = reason or "left"
        await self._call(self.store.set_left, client_id, session.left)
        log.info("client %s left: %s", client_id, session.left)
        self._changed()
