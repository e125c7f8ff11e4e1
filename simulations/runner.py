"""Run a simulated federation: one process, one frozen base model shared by every virtual client.

Only adapters, optimizer state and data are per client, so memory grows by about one adapter per
client. Every message still goes through its protobuf encoding, so the bytes reported are the
bytes a real deployment puts on the wire and the clients see exactly what gRPC would deliver.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog, RoundMetrics
from fedtune.fedserver.tracking import tracking_for
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.convert import instruction_from_proto, instruction_to_proto, update_from_proto
from fedtune.simulations.channel import Channel
from fedtune.simulations.checkpoint import CHECKPOINT_FILE, restore, resumable, save_checkpoint, take_checkpoint
from fedtune.simulations.clock import DeviceClock
from fedtune.simulations.config import ConfigError, SimulationConfig
from fedtune.simulations.workers import ClientPool, WorkerPool, client_outcomes, collect_outcomes
from fedtune.strategies.api import (
    ClientStrategy,
    ClientUpdate,
    Instruction,
    Refused,
    RunContext,
    ServerStrategy,
    Workspace,
    hash_seed,
)
from fedtune.strategies.registry import resolve
from fedtune.tasks.data import FederatedData, TokenDataset, prepare_federated_data, require_fields
from fedtune.tasks.models import load_model
from fedtune.tasks.training import planned_steps

if TYPE_CHECKING:  # imported when a run asks for Ray (it imports this module)
    from fedtune.simulations.ray_backend import RayPool

log = logging.getLogger(__name__)


@dataclass
class Federation:
    """Everything a simulated run builds once, and the simulated time it has reached."""

    config: SimulationConfig
    workspace: Workspace
    server: ServerStrategy
    clients: dict[str, ClientStrategy]
    data: FederatedData
    clock: DeviceClock
    eval_data: dict[str, TokenDataset | None]  # each client's held-out examples for federated evaluation
    retired: set[str] = field(default_factory=set)  # clients whose privacy budget is spent
    now: float = 0.0  # simulated seconds since the run started (simulations.clock)

    def next_online(self, candidates: Iterable[str]) -> float | None:
        """The earliest simulated time from now at which one of `candidates` is online; None: never again."""
        times = [when for cid in candidates if (when := self.clock.next_online(cid, self.now)) is not None]
        return min(times, default=None)


def build_federation(config: SimulationConfig) -> Federation:
    definition = resolve(config.strategy, config.wrappers())
    strategy_config = config.strategy_config()
    context = RunContext(seed=config.seed, rounds=config.rounds, train=config.train, model_kind=config.model.kind)
    for source in filter(None, (config.data.train, config.data.eval)):  # a missing column, before the model loads
        require_fields(source, config.data, config.model.kind)
    bundle = load_model(config.model, config.seed)
    data = prepare_federated_data(
        config.data, config.partition, bundle.tokenizer, config.model.kind, config.model.max_length, config.seed
    )
    try:
        clock = DeviceClock(config.devices, sorted(data.clients), config.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    mode = config.asynchronous_mode()
    if mode is not None and mode.buffer_size > len(data.clients):
        raise ConfigError(f"asynchronous.buffer_size: {mode.buffer_size} updates per aggregation, but the run has "
                          f"{len(data.clients)} clients and each contributes at most one per aggregation")
    eval_data: dict[str, TokenDataset | None] = {}
    if config.evaluation.federated:  # each client keeps a seeded share of its examples out of training
        for client_id, dataset in data.clients.items():
            generator = torch.Generator().manual_seed(hash_seed(config.seed, client_id, "federated-evaluation"))
            data.clients[client_id], eval_data[client_id] = dataset.held_out(config.evaluation.client_fraction,
                                                                             generator)
    workspace = definition.build_workspace(bundle, strategy_config, context)
    server = definition.server(strategy_config, context)
    server.initialize(workspace)
    clients = {}
    for client_id in sorted(data.clients):
        try:
            server.on_client_registered(client_id, clock.devices[client_id].profile)
        except Refused as refusal:  # as fedserver refuses it at registration: the device takes no part
            log.warning("fedsim: %s", refusal)
            del data.clients[client_id]
            eval_data.pop(client_id, None)
            continue
        clients[client_id] = definition.client(strategy_config, context, client_id)
    if not clients:
        raise ConfigError("no client can take part: the strategy refused every device (see the warnings above)")
    return Federation(config, workspace, server, clients, data, clock, eval_data)


@dataclass(frozen=True)
class Reply:
    """One client's work on the device clock: its update as the server would receive it (None: lost on the
    way, or the client retired), when its work ends, and whether it arrives (it may go offline first)."""

    update: ClientUpdate | None
    wire_bytes: int
    done: float  # when the server knows the outcome: the update's arrival, or the client going offline
    arrives: bool


ClientProgress = Callable[[int, int, int], None]
"""Hears of a round's local work as it goes: (round, clients done, clients working), first with 0 done."""


def work(federation: Federation, engine: RoundEngine, channel: Channel, round: int,
         instructions: Mapping[str, Instruction], pool: ClientPool | None,
         on_trained: ClientProgress | None = None) -> dict[str, Reply]:
    """Send `instructions` through the channel, run the clients' local work (here or in the pool's
    workers) and time each on the device clock from `federation.now`. Every message goes through its
    protobuf encoding, so bytes and timings are those of the wire."""
    start = federation.now
    received: dict[str, Instruction] = {}
    bytes_down: dict[str, int] = {}
    for client_id, instruction in instructions.items():
        encoded_instruction = instruction_to_proto(instruction)
        bytes_down[client_id] = encoded_instruction.ByteSize()
        engine.count_down(instruction, bytes_down[client_id])
        delivered_instruction = channel.downlink(instruction_from_proto(encoded_instruction), client_id)
        if delivered_instruction is not None:
            received[client_id] = delivered_instruction
    trained = None if on_trained is None else _counted(on_trained, round, len(received))
    if pool is None:
        outcomes = collect_outcomes(client_outcomes(federation.clients, federation.workspace, federation.data.clients,
                                                    round, received, eval_data=federation.eval_data), trained)
    else:
        outcomes = pool.run(round, received, trained)
    replies = {cid: Reply(None, 0, start, False) for cid in instructions}  # a lost instruction: no reply
    for client_id in sorted(outcomes):
        outcome = outcomes.pop(client_id)  # drop each encoded update once decoded: one copy per client, not two
        if outcome.update is None:
            federation.retired.add(client_id)
            log.warning("fedsim: %s", outcome.retired)
            continue
        encoded_update = pb.ClientUpdate.FromString(outcome.update)
        update = update_from_proto(encoded_update)
        steps = update.metrics.get("local_steps", planned_steps(len(federation.data.clients[client_id]),
                                                                federation.config.train))
        finish = start + federation.clock.work_seconds(client_id, start, steps, bytes_down[client_id],
                                                       encoded_update.ByteSize())
        offline = federation.clock.online_until(client_id, start)
        replies[client_id] = Reply(channel.uplink(update), encoded_update.ByteSize(), min(finish, offline),
                                   arrives=finish <= offline)
    return replies


def _counted(on_trained: ClientProgress, round: int, working: int) -> Callable[[str], None]:
    """`on_trained` as the clients' loop calls it, once per client whose work ends; it hears of the start first."""
    on_trained(round, 0, working)
    done = itertools.count(1)
    return lambda _client_id: on_trained(round, next(done), working)


def close_time(start: float, replies: Mapping[str, Reply], deadline_s: float | None, quorum: float) -> float:
    """When fedserver's rule would close the round on the simulated clock: once every selected client
    has replied or gone, or, after the deadline, once the quorum of updates is in."""
    everyone = max((reply.done for reply in replies.values()), default=start)
    if deadline_s is None:
        return everyone
    arrivals = sorted(reply.done for reply in replies.values() if reply.arrives and reply.update is not None)
    needed = math.ceil(quorum * len(replies))
    quorum_at = arrivals[needed - 1] if needed <= len(arrivals) else math.inf
    return min(everyone, max(start + deadline_s, quorum_at))


def submit(engine: RoundEngine, update: ClientUpdate, wire_bytes: int) -> None:
    """Hand one delivered update to the engine; a refused one is left out and the run goes on."""
    try:
        engine.submit(update, wire_bytes)
    except Refused as refused:
        log.info("fedsim: update from %s refused: %s", update.client_id, refused)


def run_round(federation: Federation, engine: RoundEngine, round: int, pool: ClientPool | None = None,
              evaluate_only: bool = False, on_trained: ClientProgress | None = None) -> RoundMetrics:
    """One synchronous round at simulated time `federation.now`: instructions down to the online clients
    the strategy samples, local work, updates up, aggregation, evaluation.

    Decoded messages pass through the configured channel (noise, loss: a lost instruction means the
    client sits the round out, a lost update is never submitted); every client that did not train
    this round gets its strategy's `idle` hook. The round closes on the device clock by fedserver's
    rule (`close_time`); updates that arrive later are stragglers' and are dropped. Updates are taken
    or refused by the same decision (`RoundEngine.submit`) as fedserver's, in client-id order.
    """
    config = federation.config
    channel = Channel(config.channel, config.seed)
    start = federation.now
    available = [cid for cid in federation.clients
                 if cid not in federation.retired and federation.clock.online(cid, start)]
    replies = work(federation, engine, channel, round, engine.begin_round(round, available, evaluate_only), pool,
                   on_trained)
    closed = close_time(start, replies, config.round_deadline_s, config.quorum)
    for _, reply in sorted(replies.items()):  # in client-id order, as fedserver replays them
        if reply.arrives and reply.update is not None and reply.done <= closed:
            submit(engine, reply.update, reply.wire_bytes)
    federation.now = closed
    state = engine.current
    assert state is not None
    return engine.finish_round({"selected": len(state.selected), "stragglers": len(state.stragglers()),
                                "sim_time_s": closed, "sim_round_s": closed - start})


def run_synchronous(federation: Federation, engine: RoundEngine, pool: ClientPool | None,
                    on_round: Callable[[RoundMetrics], None], first_round: int = 1,
                    on_trained: ClientProgress | None = None) -> str | None:
    """Rounds first_round..rounds (a resumed run starts after its checkpoint), each starting when a client is
    online; returns why the run stopped early, or None."""
    for round in range(first_round, federation.config.rounds + 1):
        if reason := federation.server.stop_reason(round):
            return reason
        remaining = [cid for cid in federation.clients if cid not in federation.retired]
        if not remaining:
            return "every client has retired (privacy budget spent)"
        wake = federation.next_online(remaining)
        if wake is None:
            return "no client is online again (devices.trace)"
        federation.now = wake
        on_round(run_round(federation, engine, round, pool, on_trained=on_trained))
    if federation.config.evaluation.federated:  # the clients evaluate the final model too
        run_round(federation, engine, federation.config.rounds + 1, pool, evaluate_only=True, on_trained=on_trained)
    return None


def run_asynchronous(federation: Federation, engine: RoundEngine, pool: ClientPool | None,
                     on_round: Callable[[RoundMetrics], None], on_trained: ClientProgress | None = None) -> str | None:
    """Buffered asynchronous rounds (strategies.fedbuff) on the device clock: whenever a client is free
    and online it is handed the current global model (up to `concurrency` at once); updates are taken
    in the order they arrive on the clock (ties by client id) and every `buffer_size` accepted ones make
    a round. Returns why the run stopped early, or None."""
    config, mode = federation.config, engine.asynchronous
    assert mode is not None
    channel = Channel(config.channel, config.seed)
    in_flight: dict[str, Reply] = {}
    handouts = 0
    engine.begin_round(1, [])
    while True:
        state = engine.current
        assert state is not None
        if reason := federation.server.stop_reason(state.round):
            return reason
        free = [cid for cid in sorted(federation.clients) if cid not in in_flight and cid not in federation.retired
                and engine.can_dispatch(cid)]
        online = [cid for cid in free if federation.clock.online(cid, federation.now)]
        slots = len(online) if mode.concurrency is None else max(0, mode.concurrency - len(in_flight))
        if slots and online:
            chosen = random.Random(f"{config.seed}:handout:{handouts}").sample(online, min(slots, len(online)))
            handouts += 1
            instructions = {cid: engine.dispatch(cid) for cid in sorted(chosen)}
            in_flight.update(work(federation, engine, channel, state.round, instructions, pool, on_trained))
        if not in_flight:
            wake = federation.next_online(free)
            if wake is None or wake <= federation.now:
                return f"round {state.round} cannot fill its buffer: no client can take work again"
            federation.now = wake
            continue
        client_id = min(in_flight, key=lambda cid: (in_flight[cid].done, cid))
        reply = in_flight.pop(client_id)
        federation.now = reply.done
        if reply.arrives and reply.update is not None:
            submit(engine, reply.update, reply.wire_bytes)
        if engine.buffer_full():
            on_round(engine.finish_round({"sim_time_s": federation.now}))
            if state.round == config.rounds:
                return None
            engine.begin_round(state.round + 1, [])


def run_simulation(config: SimulationConfig, out_dir: Path, show_progress: bool = True,
                   resume: bool = False) -> list[RoundMetrics]:
    """Run `config` into `out_dir`, checkpointing after every synchronous round; `resume` continues the run
    checkpointed there after its last completed round (`simulations.checkpoint`)."""
    checkpoint = resumable(config, out_dir) if resume else None
    if config.ray_address is not None:  # Ray missing or no cluster there: say so before the model loads
        from fedtune.simulations.ray_backend import check_cluster

        check_cluster(config.ray_address)
    out_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        for stale in ("metrics.jsonl", CHECKPOINT_FILE):
            (out_dir / stale).unlink(missing_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    federation = build_federation(config)
    if checkpoint is not None:
        restore(federation, checkpoint)
    # Fork before anything else runs (evaluation threads, the progress bar): workers share the base model.
    pool: WorkerPool | RayPool | None = None
    if config.backend == "ray":
        from fedtune.simulations.ray_backend import RayPool

        pool = RayPool(config, federation.clients, None if checkpoint is None else checkpoint.clients)
    elif config.workers > 1:
        pool = WorkerPool(federation.clients, federation.workspace, federation.data.clients, config.workers,
                          federation.eval_data)
    central_data = federation.data.eval if config.evaluation.central else None
    metrics_log = MetricsLog(out_dir, tracking_for(config, out_dir))
    engine = RoundEngine(federation.server, federation.workspace, central_data, config.train.eval_batch_size,
                         metrics_log, config.asynchronous_mode(), config.evaluation.federated)
    if checkpoint is None:
        engine.record_baseline()
    else:
        metrics_log.restore(checkpoint.rows)
    history = [RoundMetrics.model_validate(row) for row in metrics_log.rows()]
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with pool or nullcontext(), Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task(f"fedsim {config.strategy}", total=config.rounds, completed=len(history) - 1,
                                 status=_status(history[-1]))
        clients_task = progress.add_task("", total=None, status="clients trained", visible=False)

        def on_round(metrics: RoundMetrics) -> None:
            history.append(metrics)
            progress.update(task, advance=1, status=_status(metrics))
            if engine.asynchronous is None:
                save_checkpoint(out_dir, take_checkpoint(federation, pool, metrics.round, metrics_log.rows()))

        def on_trained(round: int, done: int, working: int) -> None:
            if done == 0:  # a round's work starts: its own count and clock
                progress.reset(clients_task, total=working, description=f"round {round}", visible=True)
            else:
                progress.update(clients_task, completed=done)

        progress_hook = on_trained if show_progress else None
        if engine.asynchronous is not None:
            reason = run_asynchronous(federation, engine, pool, on_round, progress_hook)
        else:
            first_round = 1 if checkpoint is None else checkpoint.round + 1
            reason = run_synchronous(federation, engine, pool, on_round, first_round, progress_hook)
        if reason:
            progress.console.print(f"[yellow]fedsim: stopping after round {len(history) - 1}: {reason}")
    engine.save_global(out_dir / "global")
    metrics_log.plot()
    metrics_log.close()
    return [RoundMetrics.model_validate(row) for row in metrics_log.rows()]  # with federated evaluation's additions


def _status(metrics: RoundMetrics) -> str:
    if metrics.eval_accuracy is None:
        return ""
    return f"eval acc {metrics.eval_accuracy:.3f}  loss {metrics.eval_loss:.3f}"
