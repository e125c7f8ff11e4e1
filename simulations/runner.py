"""Run a simulated federation: one process, one frozen base model shared by every virtual client.

Only adapters, optimizer state and data are per client, so memory grows by about one adapter per
client. Every message still goes through its protobuf encoding, so the bytes reported are the
bytes a real deployment puts on the wire and the clients see exactly what gRPC would deliver.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedserver.engine import RoundEngine
from fedserver.metrics import MetricsLog, RoundMetrics
from protos.convert import instruction_from_proto, instruction_to_proto, update_from_proto, update_to_proto
from simulations.channel import Channel
from simulations.config import ConfigError, SimulationConfig
from strategies.api import ClientStrategy, InvalidUpdate, RunContext, ServerStrategy, Workspace
from strategies.registry import resolve
from tasks.data import FederatedData, prepare_federated_data
from tasks.models import load_model


@dataclass
class Federation:
    """Everything a simulated run builds once."""

    config: SimulationConfig
    workspace: Workspace
    server: ServerStrategy
    clients: dict[str, ClientStrategy]
    data: FederatedData


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


def run_round(federation: Federation, engine: RoundEngine, round: int) -> RoundMetrics:
    """One round: instructions down, local training, updates up, aggregation, evaluation.

    Decoded messages pass through the configured channel (noise, loss: a lost instruction means the
    client sits the round out, a lost update is never submitted); every client that did not train
    this round gets its strategy's `idle` hook.
    """
    channel = Channel(federation.config.channel, federation.config.seed)
    instructions = engine.begin_round(round, list(federation.clients))
    trained: set[str] = set()
    for client_id, instruction in instructions.items():
        encoded_instruction = instruction_to_proto(instruction)
        engine.count_down(instruction, encoded_instruction.ByteSize())
        received = channel.downlink(instruction_from_proto(encoded_instruction), client_id)
        if received is None:
            continue
        update = federation.clients[client_id].fit(federation.workspace, received, federation.data.clients[client_id])
        trained.add(client_id)
        encoded_update = update_to_proto(update)
        delivered = channel.uplink(update_from_proto(encoded_update))
        if delivered is None:
            continue
        try:
            engine.submit(delivered, encoded_update.ByteSize())
        except InvalidUpdate:
            continue
    for client_id, client in federation.clients.items():
        if client_id not in trained:
            client.idle(federation.workspace, round, federation.data.clients[client_id])
    return engine.finish_round()


def run_simulation(config: SimulationConfig, out_dir: Path, show_progress: bool = True) -> list[RoundMetrics]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    federation = build_federation(config)
    engine = RoundEngine(
        federation.server, federation.workspace, federation.data.eval, config.train.eval_batch_size, MetricsLog(out_dir)
    )
    history = [engine.record_baseline()]
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task(f"fedsim {config.strategy}", total=config.rounds, status=_status(history[-1]))
        for round in range(1, config.rounds + 1):
            reason = federation.server.stop_reason(round)
            if reason:
                progress.console.print(f"[yellow]fedsim: stopping before round {round}: {reason}")
                break
            history.append(run_round(federation, engine, round))
            progress.update(task, advance=1, status=_status(history[-1]))
    engine.save_global(out_dir / "global")
    engine.metrics.plot()
    return history


def _status(metrics: RoundMetrics) -> str:
    if metrics.eval_accuracy is None:
        return ""
    return f"eval acc {metrics.eval_accuracy:.3f}  loss {metrics.eval_loss:.3f}"
