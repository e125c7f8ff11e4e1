"""A device in a federation: register, pull instructions, train with the strategy's client half, push updates.

The client builds its workspace and strategy half from the run spec the server sends, exactly as
fedsim builds a virtual client (`resolve`, `build_workspace`, `definition.client`), so a round
gives the same update here as in simulation. It survives server restarts and network drops: every
call retries with backoff, the client re-registers (same token, same identity) after an outage,
and its local state file keeps the strategy state and any unacknowledged update across its own
restarts.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from transformers import PreTrainedTokenizerBase

from fedtune.fedclient.connection import Connection, ConnectionSettings, FatalError, describe
from fedtune.fedclient.probe import time_training_step
from fedtune.fedclient.state import ClientState
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.convert import profile_to_proto
from fedtune.protos.limits import Limits
from fedtune.protos.payload import (
    PROTOCOL_VERSION,
    PayloadError,
    PayloadReader,
    ProgressCallback,
    instruction_from_stream,
    update_messages,
)
from fedtune.protos.runspec import RunSpec
from fedtune.strategies.api import (
    ClientRetired,
    ClientStrategy,
    ClientUpdate,
    DeviceProfile,
    Instruction,
    InvalidInstruction,
    Workspace,
    hash_seed,
)
from fedtune.tasks.data import DataError, TokenDataset, encode, load_records, require_fields
from fedtune.tasks.models import ModelLoadError, load_model
from fedtune.tasks.progress import observe_steps
from fedtune.tasks.training import planned_steps

log = logging.getLogger(__name__)
DATA_LOSS_RETRIES = 3


@dataclass(frozen=True)
class ClientSettings:
    connection: ConnectionSettings
    data: Path
    state_file: Path
    name: str = ""
    model_path: str | None = None
    device: str | None = None  # model.device here; None: the run's
    profile: DeviceProfile = DeviceProfile()
    probe: bool = False  # time one training step on the run's model and report it (DeviceProfile.step_ms)
    max_instruction_bytes: int = 16 << 30
    eval_data: Path | None = None  # federated evaluation's examples; None: a held-out share of `data`


class Reporter:
    """Where the client says what it is doing (the CLI shows it with rich; tests stay quiet)."""

    def status(self, text: str) -> None:
        log.info("%s", text)

    def round_done(self, round: int, rounds: int) -> None:
        del round, rounds

    def training_step(self, round: int, steps: int, planned: int) -> None:
        """`steps` local optimizer steps of round `round` are done, of the `planned` ones (a time budget may
        stop the loop before them)."""
        del round, steps, planned

    def transfer(self, what: str) -> ProgressCallback | None:
        del what
        return None


class FederatedClient:
    def __init__(self, settings: ClientSettings, reporter: Reporter | None = None):
        self.settings = settings
        self.reporter = reporter or Reporter()
        self.state = ClientState.load(settings.state_file)
        if self.state.server and self.state.server != settings.connection.server:
            log.warning("state file %s was for server %s; now %s", settings.state_file, self.state.server,
                        settings.connection.server)
        token = settings.connection.token or self.state.token
        self.connection = Connection(ConnectionSettings(**{**settings.connection.__dict__, "token": token}))
        self.state.server, self.state.token = settings.connection.server, token
        self.spec: RunSpec | None = None
        self.profile = settings.profile
        self.limits = Limits()
        self.client_id = ""
        self.workspace: Workspace | None = None
        self.strategy: ClientStrategy | None = None
        self.data: TokenDataset | None = None
        self.eval_data: TokenDataset | None = None
        self._activity = ("registering", 0, 0.0)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._outages_seen = 0

    # -- protocol steps ---------------------------------------------------------------------

    def _register_call(self) -> pb.RegisterReply:
        request = pb.RegisterRequest(protocol_version=PROTOCOL_VERSION, name=self.settings.name or self.state.client_id,
                                     profile=profile_to_proto(self.profile))
        try:
            return self.connection.call("Register", lambda: self.connection.stub.Register(
                request, metadata=self.connection.metadata, timeout=30))
        except grpc.RpcError as error:
            raise FatalError(f"the server refused to register this client: {describe(error)}") from error

    def register(self) -> pb.RegisterReply:
        """Join (or rejoin as the same client); builds the workspace on the first call of a run, and with
        `settings.probe` times a training step on it and registers again to report that (step_ms)."""
        reply = self._register_call()
        self._outages_seen = self.connection.outages
        spec = RunSpec.model_validate_json(reply.run_spec_json)
        self.limits = Limits.from_proto(reply.limits)
        if reply.run_id != self.state.run_id:
            if self.state.run_id:
                log.warning("the server runs a new run (%s, was %s): local strategy state dropped",
                            reply.run_id[:8], self.state.run_id[:8])
            self.state.start_run(reply.run_id)
        self.state.client_id = self.client_id = reply.client_id
        self.state.save(self.settings.state_file)  # the identity first: a restart rejoins as this client
        if self.spec != spec or self.strategy is None:
            self._build(spec)
            if self.settings.probe and not self.profile.step_ms:
                assert self.workspace is not None and self.data is not None
                step_ms = time_training_step(self.workspace.model, self.data, spec.train)
                self.profile = self.profile.model_copy(update={"step_ms": step_ms})
                self._register_call()
        self._start_heartbeat(reply.heartbeat_interval_ms / 1000)
        self.reporter.status(f"registered as {reply.client_id} (run {reply.run_id[:8]}, {spec.strategy}, "
                             f"{spec.rounds} rounds)")
        return reply

    def _build(self, spec: RunSpec) -> None:
        """The same construction as fedsim's virtual clients, from the server's run spec."""
        self.reporter.status(f"building {spec.strategy} workspace on {spec.model.path}")
        local = {"path": self.settings.model_path, "device": self.settings.device}
        model_config = spec.model.model_copy(update={key: value for key, value in local.items() if value is not None})
        definition = spec.definition()
        try:
            definition.check_task(spec.model_copy(update={"model": model_config}))
        except ValueError as error:
            raise FatalError(f"this device cannot take part as configured: {error}") from error
        options = spec.strategy_config()
        context = spec.context()
        try:
            require_fields(str(self.settings.data), spec.data, spec.model.kind)  # a missing column before the model
            bundle = load_model(model_config, spec.seed)
        except (DataError, ModelLoadError) as error:
            raise FatalError(str(error)) from error
        self.workspace = definition.build_workspace(bundle, options, context)
        self.strategy = definition.client(options, context, self.client_id)
        if self.state.strategy_state:
            self.strategy.load_state_dict(self.state.strategy_state)
        rows = load_records(str(self.settings.data))
        self.data = encode(rows, bundle.tokenizer, spec.data, spec.model.kind, spec.model.max_length)
        if spec.evaluation.federated:
            self.eval_data = self._evaluation_data(spec, bundle.tokenizer)
        self.spec = spec
        self.reporter.status(f"{len(self.data)} local examples from {self.settings.data}")

    def _evaluation_data(self, spec: RunSpec, tokenizer: PreTrainedTokenizerBase) -> TokenDataset | None:
        """The device's evaluation file, else the seeded share of its data that fedsim would hold out
        (same seed, same client id: the same split), which is then kept out of training."""
        assert self.data is not None
        if self.settings.eval_data is not None:
            rows = load_records(str(self.settings.eval_data))
            return encode(rows, tokenizer, spec.data, spec.model.kind, spec.model.max_length)
        generator = torch.Generator().manual_seed(hash_seed(spec.seed, self.client_id, "federated-evaluation"))
        self.data, held_out = self.data.held_out(spec.evaluation.client_fraction, generator)
        return held_out

    def pull(self) -> tuple[pb.PullStatus, Instruction | None]:
        """One long poll; the instruction is reassembled and checked before it is returned."""
        def attempt() -> tuple[pb.PullStatus, Instruction | None]:
            stream = self.connection.stub.PullInstruction(
                pb.PullRequest(wait_ms=30_000), metadata=self.connection.metadata)
            status = next(stream).status
            if status.kind != pb.PullStatus.INSTRUCTION:
                stream.cancel()
                return status, None
            reader = PayloadReader("Instruction", self.limits, self.settings.max_instruction_bytes)
            for message in stream:
                reader.feed(message)
            return status, instruction_from_stream(reader)

        for _ in range(DATA_LOSS_RETRIES):
            try:
                return self.connection.call("PullInstruction", attempt)
            except PayloadError as error:
                log.warning("instruction stream unusable, pulling again: %s", error)
        raise FatalError(f"PullInstruction: {DATA_LOSS_RETRIES} broken instruction streams in a row")

    def train(self, instruction: Instruction) -> ClientUpdate:
        assert self.strategy is not None and self.workspace is not None and self.data is not None
        self._activity = ("training", instruction.round, 0.0)
        with observe_steps(self._step_taken):
            update = self.strategy.respond(self.workspace, instruction, self.data, self.eval_data)
        self.state.strategy_state = self.strategy.state_dict()
        self.state.pending = update
        self.state.save(self.settings.state_file)
        return update

    def _step_taken(self, steps: int) -> None:
        """A local step is done: the reporter shows it, the next heartbeat tells the server how far along we are."""
        assert self.spec is not None and self.data is not None
        _, round, _ = self._activity
        planned = planned_steps(len(self.data), self.spec.train)
        self._activity = ("training", round, min(steps / planned, 1.0))
        self.reporter.training_step(round, steps, planned)

    def push(self, update: ClientUpdate) -> bool:
        """Upload; True once the server holds the update (accepted now or earlier)."""
        self._activity = ("uploading", update.round, 0.0)
        progress = self.reporter.transfer(f"round {update.round} upload")

        def attempt() -> pb.PushReply:
            messages = update_messages(update, self.limits.chunk_bytes, progress)
            return self.connection.stub.PushUpdate(messages, metadata=self.connection.metadata)

        for _ in range(DATA_LOSS_RETRIES):
            try:
                self.connection.call("PushUpdate", attempt)
                return self._acknowledged(update.round)
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.ALREADY_EXISTS:
                    log.info("round %d: the server already holds this update", update.round)
                    return self._acknowledged(update.round)
                if code == grpc.StatusCode.DATA_LOSS:
                    log.warning("round %d upload damaged on the way, sending again: %s", update.round, describe(error))
                    continue
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND):
                    raise
                log.error("round %d: update not taken: %s", update.round, describe(error))
                self.state.pending = None
                self.state.save(self.settings.state_file)
                return False
        raise FatalError(f"PushUpdate: {DATA_LOSS_RETRIES} damaged uploads in a row for round {update.round}")

    def _acknowledged(self, round: int) -> bool:
        self.state.pending, self.state.last_round = None, round
        self.state.save(self.settings.state_file)
        return True

    def idle(self, round: int) -> None:
        """A round that runs without this client: the strategy's idle step, once per round."""
        assert self.strategy is not None and self.workspace is not None and self.data is not None
        if round in self.state.idle_rounds:
            return
        self.strategy.idle(self.workspace, round, self.data)
        self.state.strategy_state = self.strategy.state_dict()
        self.state.idle_rounds = [*self.state.idle_rounds[-63:], round]
        self.state.save(self.settings.state_file)

    def leave(self, reason: str) -> None:
        try:
            self.connection.stub.Leave(pb.LeaveRequest(reason=reason), metadata=self.connection.metadata, timeout=10)
        except grpc.RpcError as error:
            log.warning("Leave: %s", describe(error))

    # -- the whole life of a client ---------------------------------------------------------

    def run(self) -> str:
        """Take part until the server says the run is over; returns its reason."""
        try:
            self.register()
            rounds = self.spec.rounds if self.spec else 0
            while True:
                if self.connection.outages != self._outages_seen:
                    self.register()  # the server may have restarted: rejoin, check the run id
                if self.state.pending is not None:
                    self.push(self.state.pending)
                try:
                    status, instruction = self.pull()
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        self.register()
                        continue
                    raise FatalError(f"PullInstruction refused: {describe(error)}") from error
                if status.kind == pb.PullStatus.DONE:
                    self.reporter.status(f"run over: {status.reason}")
                    return status.reason
                if status.kind == pb.PullStatus.WAIT:
                    self._activity = ("waiting", status.round, 0.0)
                    if status.sits_out and status.round:
                        self.idle(status.round)
                    self._stop.wait(status.retry_after_ms / 1000)
                    continue
                assert instruction is not None
                self.reporter.status(f"round {status.round}/{rounds}: training")
                try:
                    update = self.train(instruction)
                except ClientRetired as retired:
                    self.leave(f"retired: {retired}")
                    self.reporter.status(f"leaving the run: {retired}")
                    return f"retired: {retired}"
                except InvalidInstruction as error:
                    self.leave(f"cannot act on the instruction: {error}")
                    raise FatalError(f"round {status.round}: {error}") from error
                self.reporter.status(f"round {status.round}/{rounds}: uploading")
                if self.push(update):
                    self.reporter.status(f"round {status.round}/{rounds}: update accepted")
                    self.reporter.round_done(status.round, rounds)
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        self.connection.close()

    # -- heartbeats -------------------------------------------------------------------------

    def _start_heartbeat(self, interval_s: float) -> None:
        if self._heartbeat is not None:
            return

        def beat() -> None:
            while not self._stop.wait(interval_s):
                activity, round, progress = self._activity
                try:
                    self.connection.stub.Heartbeat(
                        pb.HeartbeatRequest(activity=activity, round=round, progress=progress),
                        metadata=self.connection.metadata, timeout=max(interval_s, 5.0))
                except grpc.RpcError as error:
                    log.debug("Heartbeat: %s", describe(error))

        self._heartbeat = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._heartbeat.start()

