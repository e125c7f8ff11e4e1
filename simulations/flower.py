"""fedtune strategies as a Flower app: fedsim's round loop on the server, its virtual clients on Flower's nodes.

The ServerApp runs fedsim's own synchronous loop (`runner.run_synchronous`: the strategy's server half in
the round engine, the device clock, the channel, refusals) with Flower's nodes in the place of fedsim's
worker pool. Each SuperNode is one fedtune client, picked by its `partition-id` among the run's clients;
its ClientApp builds the federation from the same config (the seeded model, data and partition) and runs
that client's half with fedsim's own client loop (`workers.client_outcomes`). Instructions and updates travel
as fedtune's protobuf messages, as bytes in a Flower ConfigRecord, so a client sees exactly what fedsim
and gRPC deliver and the run ends with fedsim's global model.

A client's strategy state lives in the node's Flower context between rounds, since the process that
serves a node may change from round to round (simulation actors) or restart (a SuperNode). A node that
fails to answer is asked again once a node for its client is back; a node whose process holds another
model version than the strategy assumed (a fresh process under FedKSeed) is registered again, as
fedserver does for a reconnecting client, and given a fresh instruction.

Not built: buffered asynchronous rounds (`[asynchronous]`) and checkpoints (`--resume`); a node reads its
client's data from the run's config (every node sees the data files), not from a file of its own.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from flwr.app import ConfigRecord, ConfigRecordValues, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from pydantic import BaseModel, ConfigDict, Field

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog, RoundMetrics
from fedtune.fedserver.tracking import tracking_for
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.convert import instruction_from_proto, instruction_to_proto
from fedtune.simulations.checkpoint import stored_config
from fedtune.simulations.config import ConfigError, SimulationConfig, load_config
from fedtune.simulations.runner import Federation, build_federation, run_synchronous
from fedtune.simulations.workers import ClientOutcome, client_outcomes, collect_outcomes
from fedtune.strategies.api import Instruction, InvalidInstruction
from fedtune.tasks.threads import apply_threads

log = logging.getLogger(__name__)

RECORD = "fedtune"
"""The RecordDict key of every message's ConfigRecord."""
STATE = "fedtune.client-state"
"""The node context's ConfigRecord holding the client strategy's state between rounds."""
CONFIG_KEY = "config"
OUT_KEY = "out-dir"
"""Run config keys (`flwr run --run-config`, or the app's pyproject): the fedsim TOML and the output folder."""


class FlowerError(RuntimeError):
    """The Flower run cannot go on; the message names the client, node or setting."""


class FlowerSettings(BaseModel):
    """How the ServerApp waits for Flower's nodes (the federation itself is the fedsim config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    node_wait_s: float = Field(300.0, gt=0, description="How long a round waits for a client's node to (re)connect.")
    reply_timeout_s: float = Field(3600.0, gt=0, description="How long one exchange waits for replies before the "
                                                             "missing ones are asked again.")
    attempts: int = Field(5, ge=1, description="Times one client's message of a round is sent before the run stops.")
    poll_s: float = Field(0.1, gt=0, description="Interval between pulls of replies and node lists.")


class NodeRequest(BaseModel):
    """What the ServerApp asks a node: who it is, a client's work for a round, or its idle hook."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["identify", "train", "idle"]
    config: str  # the run's SimulationConfig as JSON (checkpoint.stored_config)
    round: int = 0
    instruction: bytes = b""  # a serialized pb.Instruction (kind "train")


class NodeReply(BaseModel):
    """A node's answer: its client id and, for work, the encoded update, or why it retired or cannot act."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    client_id: str
    update: bytes = b""  # a serialized pb.ClientUpdate
    retired: str = ""  # the ClientRetired message
    invalid: str = ""  # the InvalidInstruction message


MESSAGE_TYPES = {"identify": "query", "train": "train", "idle": "train.idle"}


def to_record(model: BaseModel) -> RecordDict:
    """A message model as one ConfigRecord (its fields as typed entries; bytes stay bytes)."""
    return RecordDict({RECORD: ConfigRecord(model.model_dump())})


M = TypeVar("M", bound=BaseModel)


def from_record(kind: type[M], content: RecordDict) -> M:
    """The message model in `content`; a missing record or a bad field is named."""
    if RECORD not in content.config_records:
        raise FlowerError(f"message has no {RECORD!r} ConfigRecord (records: {sorted(content)})")
    return kind.model_validate(dict(content.config_records[RECORD]))


# -- server ------------------------------------------------------------------------------------------


class FlowerClients:
    """The run's clients as Flower nodes: fedsim's worker-pool contract (`run` one round's local work,
    `client_states`) over a Flower Grid."""

    def __init__(self, grid: Grid, federation: Federation, settings: FlowerSettings):
        self.grid = grid
        self.federation = federation
        self.settings = settings
        self.config_json = json.dumps(stored_config(federation.config))
        self.nodes: dict[str, int] = {}  # client id -> its node now (online, answering)
        self.last_node: dict[str, int] = {}  # client id -> the node it last had (another one now: a restart)

    def run(self, round: int, instructions: Mapping[str, Instruction],
            on_trained: Callable[[str], None] | None = None) -> dict[str, ClientOutcome]:
        """The instructed clients' work, then every other client's idle hook, as fedsim's workers do it;
        a message without a usable reply is sent again (up to `attempts` times) once its client has a node."""
        requests = {cid: NodeRequest(kind="idle", config=self.config_json, round=round)
                    for cid in self.federation.clients if cid not in instructions}
        requests.update({cid: self._train(round, instruction) for cid, instruction in instructions.items()})
        outcomes: dict[str, ClientOutcome] = {}
        failures: dict[str, list[str]] = {cid: [] for cid in requests}
        while requests:
            for cid, reply in self._exchange(requests, failures).items():
                if reply.invalid and requests[cid].kind == "train" and len(failures[cid]) < self.settings.attempts:
                    # the node's process holds another global model than the strategy assumed: register it again
                    log.info("flower: client %s cannot act on its instruction (%s); registering it again", cid,
                             reply.invalid)
                    failures[cid].append(f"cannot act on the instruction: {reply.invalid}")
                    self.federation.server.on_client_registered(cid, self.federation.clock.devices[cid].profile)
                    requests[cid] = self._train(round, instructions[cid])
                    continue
                if reply.invalid:
                    raise FlowerError(f"client {cid!r}, round {round}: {reply.invalid}")
                request = requests.pop(cid)
                if request.kind == "train":
                    outcomes[cid] = ClientOutcome(update=reply.update or None, retired=reply.retired or None)
                    if on_trained is not None:
                        on_trained(cid)
        return outcomes

    def client_states(self) -> dict[str, dict[str, Any]]:
        """Clients' states stay on their nodes (a Flower run is not checkpointed)."""
        raise FlowerError("a Flower run keeps client states on the nodes; it cannot be checkpointed")

    def _train(self, round: int, instruction: Instruction) -> NodeRequest:
        return NodeRequest(kind="train", config=self.config_json, round=round,
                           instruction=instruction_to_proto(instruction).SerializeToString())

    def _exchange(self, requests: Mapping[str, NodeRequest],
                  failures: dict[str, list[str]]) -> dict[str, NodeReply]:
        """Send each request to its client's node and collect the replies that come; a failed one is noted
        in `failures` (the run stops at `attempts` of them) and its node forgotten until it identifies again."""
        self.connect(set(requests))
        messages = [Message(to_record(request), self.nodes[cid], MESSAGE_TYPES[request.kind],
                            group_id=str(request.round)) for cid, request in requests.items()]
        sent = dict(zip(self.grid.push_messages(messages), requests, strict=True))
        replies: dict[str, NodeReply] = {}
        deadline = time.monotonic() + self.settings.reply_timeout_s
        while sent and time.monotonic() < deadline:
            for message in self.grid.pull_messages(set(sent)):
                cid = sent.pop(message.metadata.reply_to_message_id)
                if message.has_error():
                    self._failed(cid, f"node {self.nodes.get(cid)}: {message.error.reason}", failures)
                else:
                    replies[cid] = from_record(NodeReply, message.content)
            if sent:
                time.sleep(self.settings.poll_s)
        for cid in sent.values():
            self._failed(cid, f"no reply within {self.settings.reply_timeout_s} s", failures)
        return replies

    def _failed(self, client_id: str, why: str, failures: dict[str, list[str]]) -> None:
        log.warning("flower: client %s: %s; asking again", client_id, why)
        failures[client_id].append(why.strip().splitlines()[-1])  # a ClientApp's error ends with what it raised
        if len(failures[client_id]) >= self.settings.attempts:
            raise FlowerError(f"client {client_id!r}: {len(failures[client_id])} attempts failed: "
                              + "; ".join(failures[client_id]))
        self.nodes.pop(client_id, None)

    def connect(self, wanted: set[str]) -> None:
        """Wait until each wanted client has a node: new nodes are asked who they are. A client that comes
        back on a new node is registered again with the strategy (its process starts from the initial model)."""
        deadline = time.monotonic() + self.settings.node_wait_s
        while True:
            online = set(self.grid.get_node_ids())
            self.nodes = {cid: node for cid, node in self.nodes.items() if node in online}
            unknown = online - set(self.nodes.values())
            if unknown and wanted - set(self.nodes):
                self._identify(unknown)
            missing = wanted - set(self.nodes)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise FlowerError(f"no Flower node for client(s) {sorted(missing)} after {self.settings.node_wait_s} "
                                  f"s ({len(online)} nodes online; each needs node_config partition-id)")
            time.sleep(self.settings.poll_s)

    def _identify(self, node_ids: set[int]) -> None:
        """Ask `node_ids` which client each is; a node that does not answer within `reply_timeout_s` (one that
        died but is still listed) is asked again on a later call, if the SuperLink still lists it."""
        request = to_record(NodeRequest(kind="identify", config=self.config_json))
        messages = [Message(request, node, MESSAGE_TYPES["identify"]) for node in sorted(node_ids)]
        for message in self.grid.send_and_receive(messages, timeout=self.settings.reply_timeout_s):
            if message.has_error():
                log.warning("flower: a node did not identify: %s", message.error.reason)
                continue
            cid = from_record(NodeReply, message.content).client_id
            node = message.metadata.src_node_id
            if cid not in self.federation.clients:
                raise FlowerError(f"node {node} says it is client {cid!r}, not in this run")
            if self.nodes.get(cid, node) != node:
                raise FlowerError(f"nodes {self.nodes[cid]} and {node} both say they are client {cid!r} "
                                  "(the same node_config partition-id)")
            if self.last_node.get(cid, node) != node:
                self.federation.server.on_client_registered(cid, self.federation.clock.devices[cid].profile)
            self.nodes[cid] = self.last_node[cid] = node


def check_runnable(config: SimulationConfig) -> None:
    """Refuse, naming the field, what the Flower run cannot do; before any engine starts."""
    if config.asynchronous_mode() is not None:
        raise ConfigError("asynchronous: buffered asynchronous rounds do not run on Flower (use fedsim or fedserver)")


def serve(grid: Grid, config: SimulationConfig, out_dir: Path,
          settings: FlowerSettings | None = None) -> list[RoundMetrics]:
    """fedsim's run of `config` into `out_dir` (metrics.jsonl, global/), its clients on the grid's nodes."""
    check_runnable(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    apply_threads(config.process_threads())
    federation = build_federation(config)
    clients = FlowerClients(grid, federation, settings or FlowerSettings())
    metrics_log = MetricsLog(out_dir, tracking_for(config, out_dir))
    engine = RoundEngine(federation.server, federation.workspace,
                         federation.data.eval if config.evaluation.central else None,
                         config.train.eval_batch_size, metrics_log, None, config.evaluation.federated)
    engine.record_baseline()
    reason = run_synchronous(federation, engine, clients, lambda metrics: log.info("flower: %s", metrics))
    if reason:
        log.warning("flower: stopping early: %s", reason)
    engine.save_global(out_dir / "global")
    metrics_log.plot()
    metrics_log.close()
    return [RoundMetrics.model_validate(row) for row in metrics_log.rows()]


def make_server_app(config: SimulationConfig | None = None, out_dir: Path | None = None,
                    settings: FlowerSettings | None = None) -> ServerApp:
    """A ServerApp for one fedsim config; without arguments it reads the run config (the app's pyproject, or
    `flwr run --run-config`): `config` and `out-dir` (paths, relative ones to the SuperLink's folder) and
    FlowerSettings' fields (`node-wait-s`, `reply-timeout-s`, `attempts`, `poll-s`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = context.run_config
        for key in (CONFIG_KEY, OUT_KEY):
            if config is None and not run.get(key):
                raise ConfigError(f"run config {key!r} is missing or empty: pass it with "
                                  f"flwr run --run-config \"{key}='...'\"")
        chosen = settings or FlowerSettings.model_validate(
            {field: run[field.replace("_", "-")] for field in FlowerSettings.model_fields
             if field.replace("_", "-") in run})
        serve(grid, config or load_config(Path(str(run[CONFIG_KEY]))), out_dir or Path(str(run[OUT_KEY])), chosen)

    return app


server_app = make_server_app()
"""The ServerApp `flwr run` loads (an app's pyproject names `fedtune.simulations.flower:server_app`)."""


# -- clients -----------------------------------------------------------------------------------------

_federations: dict[str, Federation] = {}  # per process: the federation of the run config last seen


def _federation(config_json: str) -> Federation:
    """The run's federation, built once per process (the model and data are seeded: every node builds the same)."""
    if config_json not in _federations:
        _federations.clear()
        config = SimulationConfig.model_validate(json.loads(config_json))
        apply_threads(config.process_threads())
        _federations[config_json] = build_federation(config)
    return _federations[config_json]


def _client_id(federation: Federation, context: Context) -> str:
    clients = sorted(federation.clients)
    partition = context.node_config.get("partition-id")
    if not isinstance(partition, int) or not 0 <= partition < len(clients):
        raise FlowerError(f"node_config partition-id: {partition!r}; this run's {len(clients)} clients need "
                          f"0..{len(clients) - 1} (one SuperNode each)")
    return clients[partition]


def _local_work(message: Message, context: Context) -> Message:
    """One client's round on this node: fedsim's `client_outcomes` for it alone, its state kept in the context."""
    request = from_record(NodeRequest, message.content)
    federation = _federation(request.config)
    client_id = _client_id(federation, context)
    if request.kind == "identify":
        return Message(to_record(NodeReply(client_id=client_id)), reply_to=message)
    client = federation.clients[client_id]
    if STATE in context.state.config_records:
        state = context.state.config_records[STATE]["state"]
        if not isinstance(state, bytes):
            raise FlowerError(f"node context {STATE!r}: the client state is {type(state).__name__}, not bytes")
        client.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    instructions = {}
    if request.kind == "train":
        instructions[client_id] = instruction_from_proto(pb.Instruction.FromString(request.instruction))
    try:
        outcomes = collect_outcomes(client_outcomes({client_id: client}, federation.workspace,
                                                    federation.data.clients, request.round, instructions,
                                                    eval_data=federation.eval_data))
        outcome = outcomes.get(client_id, ClientOutcome())
    except InvalidInstruction as error:
        return Message(to_record(NodeReply(client_id=client_id, invalid=str(error))), reply_to=message)
    buffer = io.BytesIO()
    torch.save(client.state_dict(), buffer)
    context.state[STATE] = ConfigRecord({"state": buffer.getvalue()})
    reply = NodeReply(client_id=client_id, update=outcome.update or b"", retired=outcome.retired or "")
    return Message(to_record(reply), reply_to=message)


def make_client_app(mods: list[Mod] | None = None) -> ClientApp:
    """The ClientApp, with Flower `mods` around its work (e.g. a test's injected fault)."""
    app = ClientApp(mods=mods)
    app.query()(_local_work)
    app.train()(_local_work)
    app.train("idle")(_local_work)
    return app


client_app = make_client_app()
"""The ClientApp `flwr run` loads (an app's pyproject names `fedtune.simulations.flower:client_app`)."""


def run_flower_simulation(config: SimulationConfig, out_dir: Path, num_cpus: int = 2,
                          settings: FlowerSettings | None = None, app: ClientApp | None = None) -> list[RoundMetrics]:
    """`config` in Flower's simulation engine (Ray): one virtual SuperNode per client, `num_cpus` actors of one
    CPU each, running `app` (default `client_app`); returns the metrics fedsim would (out_dir/metrics.jsonl)."""
    check_runnable(config)
    if config.partition.scheme == "natural":
        raise ConfigError("partition.scheme: a Flower simulation needs its number of clients up front "
                          "(iid or dirichlet with num_clients); 'natural' knows it only once the data is read")
    init_args: dict[str, ConfigRecordValues] = {"num_cpus": num_cpus, "num_gpus": 0, "logging_level": "WARNING",
                                                "include_dashboard": False}
    run_simulation(server_app=make_server_app(config, out_dir, settings), client_app=app or client_app,
                   num_supernodes=config.partition.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args})
    return [RoundMetrics.model_validate_json(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    """`python -m fedtune.simulations.flower CONFIG --out DIR`: a fedsim config in Flower's simulation engine."""
    parser = argparse.ArgumentParser(prog="python -m fedtune.simulations.flower", description=main.__doc__)
    parser.add_argument("config", type=Path, help="a fedsim TOML config (iid or dirichlet partition)")
    parser.add_argument("--out", type=Path, required=True, help="metrics.jsonl and global/ go here")
    parser.add_argument("--num-cpus", type=int, default=2, help="Ray's CPUs: actors of one CPU each (default 2)")
    args = parser.parse_args(argv)
    # The apps' functions must be this module's, importable by name in Ray's actors, not __main__'s copies.
    from fedtune.simulations import flower

    try:
        history = flower.run_flower_simulation(load_config(args.config), args.out, args.num_cpus)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"eval accuracy by round: {[row.eval_accuracy for row in history]}; global model in {args.out / 'global'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
