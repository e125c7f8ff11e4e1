"""Run a simulated federation: one process, one frozen base model shared by every virtual client.

Only adapters, optimizer state and data are per client, so memory grows by about one adapter per
client. Every message still goes through its protobuf encoding, so the bytes reported are the
bytes a real deployment puts on the wire and the clients see exactly what gRPC would deliver.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog, RoundMetrics
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.convert import instruction_from_proto, instruction_to_proto, update_from_proto
from fedtune.simulations.channel import Channel
from fedtune.simulations.config import ConfigError, SimulationConfig
from fedtune.simulations.workers import WorkerPool, run_clients
from fedtune.strategies.api import ClientStrategy, Instruction, Refused, RunContext, ServerStrategy, Workspace
from fedtune.strategies.registry import resolve
from fedtune.tasks.data import FederatedData, prepare_federated_data
from fedtune.tasks.models import load_model

log = logging.getLogger(__name__)


@dataclass
class Federation:
    """Everything a simulated run builds once."""

    config: SimulationConfig
    workspace: Workspace
    server: ServerStrategy
    clients: dict[str, ClientStrategy]
    data: FederatedData
    retired: set[str] = field(default_factory=set)  # clients whose privacy budget is spent


def build_federation(config: SimulationConfig) -> Federation:
    definition = resolve(config.strategy, config.wrappers())
    strategy_config = config.strategy_config()
    context = RunContext(seed=config.seed, rounds=config.rounds, train=config.train, model_kind=config.model.kind)
    bundle = load_model(config.model, config.seed)
    data = prepare_federated_data(
        config.data, config.partition, bundle.tokenizer, config.model.kind, config.model.max_length, config.seed
    )
    workspace = definition.build_workspace(bundle, strategy_config, context)
    server = definition.server(strategy_config, context)
    server.initialize(workspace)
    clients = {cid: definition.client(strategy_config, context, cid) for cid in data.clients}
    for client_id in clients:
        server.on_client_registered(client_id, config.device_profile(client_id))
    unknown = sorted(set(config.devices) - set(clients))
    if unknown:
        raise ConfigError(f"devices: unknown client id(s) {unknown}; this run's clients are {sorted(clients)}")
    return Federation(config, workspace, server, clients, data)


def run_round(federation: Federation, engine: RoundEngine, round: int, pool: WorkerPool | None = None) -> RoundMetrics:
    """One round: instructions down, local training, updates up, aggregation, evaluation.

    Decoded messages pass through the configured channel (noise, loss: a lost instruction means the
    client sits the round out, a lost update is never submitted); every client that did not train
    this round gets its strategy's `idle` hook. Updates are taken or refused by the same decision
    (`RoundEngine.submit`) as fedserver's. Local work runs here or, given a `pool`, in its
    workers; updates are submitted in client-id order either way.
    """
    channel = Channel(federation.config.channel, federation.config.seed)
    available = [cid for cid in federation.clients if cid not in federation.retired]
    received: dict[str, Instruction] = {}
    for client_id, instruction in engine.begin_round(round, available).items():
        encoded_instruction = instruction_to_proto(instruction)
        engine.count_down(instruction, encoded_instruction.ByteSize())
        delivered_instruction = channel.downlink(instruction_from_proto(encoded_instruction), client_id)
        if delivered_instruction is not None:
            received[client_id] = delivered_instruction
    if pool is None:
        outcomes = run_clients(federation.clients, federation.workspace, federation.data.clients, round, received)
    else:
        outcomes = pool.run(round, received)
    for client_id in sorted(outcomes):
        outcome = outcomes.pop(client_id)  # drop each encoded update once decoded: one copy per client, not two
        if outcome.update is None:
            federation.retired.add(client_id)
            log.warning("fedsim: %s", outcome.retired)
            continue
        encoded_update = pb.ClientUpdate.FromString(outcome.update)
        delivered = channel.uplink(update_from_proto(encoded_update))
        if delivered is None:
            continue
        try:
            engine.submit(delivered, encoded_update.ByteSize())
        except Refused:  # left out of the round, which goes on
            continue
    return engine.finish_round()


def run_simulation(config: SimulationConfig, out_dir: Path, show_progress: bool = True) -> list[RoundMetrics]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    federation = build_federation(config)
    # Fork before anything else runs (evaluation threads, the progress bar): workers share the base model.
    pool = None
    if config.workers > 1:
        pool = WorkerPool(federation.clients, federation.workspace, federation.data.clients, config.workers)
    engine = RoundEngine(
        federation.server, federation.workspace, federation.data.eval, config.train.eval_batch_size, MetricsLog(out_dir)
    )
    history = [engine.record_baseline()]
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with pool or nullcontext(), Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task(f"fedsim {config.strategy}", total=config.rounds, status=_status(history[-1]))
        for round in range(1, config.rounds + 1):
            reason = federation.server.stop_reason(round)
            if federation.retired and federation.retired == set(federation.clients):
                reason = "every client has retired (privacy budget spent)"
            if reason:
                progress.console.print(f"[yellow]fedsim: stopping before round {round}: {reason}")
                break
            history.append(run_round(federation, engine, round, pool))
            progress.update(task, advance=1, status=_status(history[-1]))
    engine.save_global(out_dir / "global")
    engine.metrics.plot()
    return history


def _status(metrics: RoundMetrics) -> str:
    if metrics.eval_accuracy is None:
        return ""
    return f"eval acc {metrics.eval_accuracy:.3f}  loss {metrics.eval_loss:.3f}"
