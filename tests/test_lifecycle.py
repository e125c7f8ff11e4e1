"""The round lifecycle without a transport: the upload decision, quorum and deadline, stragglers,
poll answers and resume, on a one-tensor stub strategy, in-process (no sockets, no model)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import pytest
import torch

from fedtune.fedserver import coordinator as coordinator_module
from fedtune.fedserver.config import ServerConfig
from fedtune.fedserver.coordinator import Coordinator, PollAnswer, PollKind
from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog
from fedtune.fedserver.service import STATUS_CODES, heartbeat_activity, pull_status, refusal_status
from fedtune.fedserver.store import RunStore
from fedtune.protos import fedtune_pb2 as pb
from fedtune.strategies.api import (
    ClientUpdate,
    DeviceProfile,
    Instruction,
    Refusal,
    Refused,
    RunContext,
    ServerStrategy,
    StrategyConfig,
    TensorSpec,
    weighted_mean,
)
from fedtune.tasks.config import TrainConfig

CLOSED = "(the round closed before the upload completed)"


class Mean(ServerStrategy):
    """One global tensor `w`, replaced by the weighted mean of each round's replies."""

    def initialize(self, workspace) -> None:
        self.w = torch.zeros(2)

    def instruction(self, round: int, client_id: str) -> Instruction:
        return Instruction(round=round, tensors={"w": self.w})

    def update_specs(self) -> dict[str, TensorSpec]:
        return {"w": TensorSpec(shape=(2,), dtype=torch.float32)}

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        self.w = weighted_mean([u.tensors["w"] for u in updates], [u.num_examples for u in updates])

    def load_global_into(self, workspace) -> None:
        workspace.w = self.w

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}

    def load_state_dict(self, state) -> None:
        self.w = state["w"]


class Folder:
    """A workspace whose saved model is one file."""

    model = torch.nn.Identity()
    w = torch.zeros(2)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "w.json").write_text(json.dumps(self.w.tolist()))


def mean_engine(out_dir: Path, clients_per_round: int | None = None) -> RoundEngine:
    context = RunContext(seed=0, rounds=2, train=TrainConfig(), model_kind="causal_lm")
    strategy = Mean(StrategyConfig(clients_per_round=clients_per_round), context)
    workspace = Folder()
    strategy.initialize(workspace)
    return RoundEngine(strategy, workspace, None, 8, MetricsLog(out_dir))


def update(client_id: str, round: int, value: float = 1.0, num_examples: int = 1) -> ClientUpdate:
    return ClientUpdate(client_id=client_id, round=round, num_examples=num_examples,
                        tensors={"w": torch.full((2,), value)})


def refusal(call: Callable[[], object]) -> tuple[Refusal, str]:
    with pytest.raises(Refused) as caught:
        call()
    return caught.value.reason, str(caught.value)


# -- the one upload decision, in the engine fedsim and fedserver share ------------------------


def test_each_refusal_reason_is_decided_by_the_engine_before_and_at_submit(tmp_path: Path):
    engine = mean_engine(tmp_path)
    assert refusal(lambda: engine.check_upload("a", 1)) == (
        Refusal.NO_ROUND, "ClientUpdate.round: 1, but no round is in progress (it may have closed)")
    engine.begin_round(1, ["a", "b"])
    engine.check_upload("a", 1)  # acceptable
    wrong_round = (Refusal.WRONG_ROUND, "ClientUpdate.round: 2 is not the current round 1")
    assert refusal(lambda: engine.check_upload("a", 2)) == wrong_round
    assert refusal(lambda: engine.submit(update("a", 2))) == wrong_round  # the same decision at commit
    not_selected = (Refusal.NOT_SELECTED, "client 'mallory' is not selected for round 1")
    assert refusal(lambda: engine.check_upload("mallory", 1)) == not_selected
    assert refusal(lambda: engine.submit(update("mallory", 1))) == not_selected
    misshapen = update("a", 1).model_copy(update={"tensors": {"w": torch.ones(3)}})
    reason, message = refusal(lambda: engine.submit(misshapen))
    assert reason is Refusal.INVALID_UPDATE and "tensor 'w' has shape (3,)" in message
    engine.submit(update("a", 1))
    duplicate = (Refusal.DUPLICATE, "an update from 'a' for round 1 was already accepted")
    assert refusal(lambda: engine.check_upload("a", 1)) == refusal(lambda: engine.submit(update("a", 1))) == duplicate
    state = engine.current
    assert state is not None and sorted(state.accepted) == ["a"] and state.stragglers() == ["b"]
    assert list(state.rejected) == []  # an invalid reply counts until its client's corrected one is accepted
    engine.finish_round()
    engine.end_run("all 1 rounds completed")
    assert refusal(lambda: engine.check_upload("a", 1)) == (Refusal.RUN_OVER, "the run is over; no update is taken")


def test_a_client_whose_reply_was_rejected_is_not_a_straggler(tmp_path: Path):
    engine = mean_engine(tmp_path)
    engine.begin_round(1, ["a", "b", "c"])
    refusal(lambda: engine.submit(update("b", 1, value=float("nan"))))
    engine.submit(update("a", 1))
    assert engine.current is not None and engine.current.stragglers() == ["c"]
    assert engine.finish_round().rejected == 1


def test_the_rounds_train_loss_is_weighted_over_the_updates_that_report_one(tmp_path: Path):
    engine = mean_engine(tmp_path)
    engine.begin_round(1, ["a", "b", "c"])
    engine.submit(update("a", 1, num_examples=1).model_copy(update={"metrics": {"train_loss": 2.0}}))
    engine.submit(update("b", 1, num_examples=3).model_copy(update={"metrics": {"train_loss": 4.0}}))
    engine.submit(update("c", 1, num_examples=100))  # no train_loss: not in its mean
    assert engine.finish_round().train_loss == (2.0 * 1 + 4.0 * 3) / 4


def test_a_client_name_is_matched_in_full(tmp_path: Path):
    async def test() -> None:
        coordinator = await started(server_config(tmp_path), [], joining_later=["x"])
        reason, message = await refused(coordinator.register("token-x", "client-1\n", DeviceProfile()))
        assert reason is Refusal.MALFORMED and "RegisterRequest.name" in message
        assert await coordinator.register("token-x", "client-1", DeviceProfile()) == "client-1"

    scenario(test)


async def refused(call: Awaitable[object]) -> tuple[Refusal, str]:
    with pytest.raises(Refused) as caught:
        await call
    return caught.value.reason, str(caught.value)


# -- the coordinator's lifecycle --------------------------------------------------------------


def server_config(tmp_path: Path, rounds: int = 1, **server: object) -> ServerConfig:
    return ServerConfig.model_validate({"rounds": rounds, "server": {
        "run_dir": str(tmp_path / "run"), "round_deadline_s": 60.0, "linger_s": 0.0, **server}})


async def started(config: ServerConfig, clients: Sequence[str], resume: bool = False,
                  clients_per_round: int | None = None, joining_later: Sequence[str] = ()) -> Coordinator:
    """A prepared coordinator over a stub strategy with `clients` registered (token `token-<id>`)."""
    store = RunStore(config.run_dir() / "state.sqlite")
    if not resume:
        store.add_tokens([(f"token-{cid}", cid) for cid in [*clients, *joining_later]])
    coordinator = Coordinator(config, store)
    await coordinator.prepare(resume, build=lambda config: mean_engine(config.run_dir(), clients_per_round))
    for client_id in clients:
        await coordinator.register(f"token-{client_id}", client_id, DeviceProfile())
    return coordinator


async def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def stop(run: asyncio.Task) -> None:
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await run


def scenario(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 120))


def test_a_round_closes_on_quorum_after_the_deadline_and_counts_those_who_never_replied(tmp_path: Path):
    async def test() -> None:
        config = server_config(tmp_path, min_clients=3, quorum=0.6)
        coordinator = await started(config, ["a", "b", "c"])
        run = asyncio.create_task(coordinator.run())
        await until(lambda: coordinator.current_round == 1, "round 1")
        open_round = coordinator.open_round
        assert open_round is not None and coordinator.quorum() == 2
        deadline = open_round.deadline
        assert not coordinator.round_can_close(deadline)  # past the deadline, but no quorum
        await coordinator.submit("a", update("a", 1, 1.0, 1), 100)
        await coordinator.submit("b", update("b", 1, 4.0, 2), 100)
        assert not coordinator.round_can_close(deadline - 1)  # quorum in, c still awaited before the deadline
        assert coordinator.round_can_close(deadline)
        await coordinator.leave("c", "gone")  # nobody is awaited any more: the round closes now
        assert await run == "all 1 rounds completed"
        [_, row] = coordinator.engine.metrics.rows()
        assert (row["clients"], row["selected"], row["stragglers"], row["bytes_up"]) == (2, 3, 1, 200)
        assert torch.equal(coordinator.engine.strategy.state_dict()["w"], torch.full((2,), 3.0))
        assert json.loads((config.run_dir() / "global" / "w.json").read_text()) == [3.0, 3.0]
        assert [(r.round, r.status) for r in coordinator.store.rounds()] == [(1, "done")]
        assert coordinator.store.accepted_count(1) == 0  # the committed state replaced the updates

    scenario(test)


def test_an_upload_that_outlives_its_round_is_refused_saying_so(tmp_path: Path):
    async def test() -> None:
        config = server_config(tmp_path, rounds=2, min_clients=2, quorum=0.5, round_deadline_s=0.2)
        coordinator = await started(config, ["a", "b"])
        run = asyncio.create_task(coordinator.run())
        await until(lambda: coordinator.current_round == 1, "round 1")
        coordinator.check_upload("b", 1)  # b's header is fine: the round is open
        await coordinator.submit("a", update("a", 1), 10)
        await until(lambda: coordinator.current_round == 2, "round 2 (round 1 closed on quorum)")
        with pytest.raises(Refused) as caught:
            await coordinator.submit("b", update("b", 1), 10)
        assert caught.value.reason is Refusal.WRONG_ROUND
        assert str(caught.value) == f"ClientUpdate.round: 1 is not the current round 2 {CLOSED}"
        await coordinator.submit("b", update("b", 2), 10)
        assert await run == "all 2 rounds completed"
        with pytest.raises(Refused) as caught:
            await coordinator.submit("a", update("a", 2), 10)
        assert caught.value.reason is Refusal.RUN_OVER
        assert str(caught.value) == f"the run is over; no update is taken {CLOSED}"
        rows = [(row["round"], row["clients"], row.get("stragglers")) for row in coordinator.engine.metrics.rows()]
        assert rows == [(0, 0, None), (1, 1, 1), (2, 1, 1)]

    scenario(test)


def test_each_client_hears_what_its_part_in_the_round_is(tmp_path: Path):
    async def test() -> None:
        config = server_config(tmp_path, min_clients=3)
        coordinator = await started(config, ["a", "b"], clients_per_round=2, joining_later=["c"])
        waiting = await coordinator.pull("a", 0.0)
        assert (waiting.kind, waiting.round, waiting.retry_after_s) == (PollKind.WAIT, 0, 1.0)
        run = asyncio.create_task(coordinator.run())
        await coordinator.register("token-c", "c", DeviceProfile())
        await until(lambda: coordinator.current_round == 1, "round 1")
        assert coordinator.open_round is not None
        selected = list(coordinator.open_round.state.selected)
        [sitting] = sorted({"a", "b", "c"} - set(selected))
        first, second = selected

        told = await coordinator.pull(first, 5.0)
        assert (told.kind, told.round, told.rounds, told.deadline) == (
            PollKind.INSTRUCTION, 1, 1, coordinator.open_round.deadline)
        assert told.instruction is not None and told.instruction.round == 1
        sits_out = coordinator.answer(sitting)
        assert (sits_out.kind, sits_out.round, sits_out.sits_out, sits_out.reason) == (
            PollKind.WAIT, 1, True, "round 1 runs without this client")
        await coordinator.submit(first, update(first, 1), 10)
        with pytest.raises(Refused) as caught:  # sent twice: refused, but not because the round closed
            await coordinator.submit(first, update(first, 1), 10)
        assert caught.value.reason is Refusal.DUPLICATE and CLOSED not in str(caught.value)
        accepted = coordinator.answer(first)
        assert (accepted.kind, accepted.round, accepted.sits_out, accepted.reason) == (
            PollKind.WAIT, 1, False, "update for round 1 accepted; waiting for the round to close")
        assert (coordinator.heartbeat(first, "waiting").round, coordinator.heartbeat(first, "").done) == (1, False)

        await coordinator.leave(second, "retired: budget spent")
        left = coordinator.answer(second)
        assert (left.kind, left.retry_after_s) == (PollKind.WAIT, 5.0)
        assert left.reason == "client has left (retired: budget spent); Register to take part again"
        assert await run == "all 1 rounds completed"
        done = coordinator.answer(sitting)
        assert (done.kind, done.reason) == (PollKind.DONE, "all 1 rounds completed")
        assert coordinator.sessions[sitting].told_done and coordinator.heartbeat(sitting, "").done

    scenario(test)


def test_a_resumed_round_keeps_the_updates_and_bytes_it_had(tmp_path: Path):
    config = server_config(tmp_path, min_clients=2)

    async def crashed() -> None:
        coordinator = await started(config, ["a", "b"])
        run = asyncio.create_task(coordinator.run())
        await until(lambda: coordinator.current_round == 1, "round 1")
        told = await coordinator.pull("a", 0.0)
        assert told.instruction is not None
        coordinator.instruction_sent("a", told.instruction, 123)
        await coordinator.submit("a", update("a", 1, 2.0, 3), 50)
        await stop(run)  # the server dies mid-round
        coordinator.store.close()

    async def resumed() -> None:
        coordinator = await started(config, [], resume=True)
        open_round = coordinator.open_round
        assert open_round is not None
        state = open_round.state
        assert (state.round, sorted(state.accepted), state.bytes_down, state.bytes_up) == (1, ["a"], 123, 50)
        assert state is coordinator.engine.current  # one round state, not a copy
        assert coordinator.answer("a").reason == "update for round 1 accepted; waiting for the round to close"
        assert coordinator.answer("b").kind is PollKind.INSTRUCTION
        run = asyncio.create_task(coordinator.run())
        await coordinator.submit("b", update("b", 1, 6.0, 1), 50)
        assert await run == "all 1 rounds completed"
        assert torch.equal(coordinator.engine.strategy.state_dict()["w"], torch.full((2,), 3.0))
        [_, row] = coordinator.engine.metrics.rows()
        assert (row["clients"], row["bytes_down"], row["bytes_up"], row["stragglers"]) == (2, 123, 100, 0)

    scenario(crashed)
    scenario(resumed)


def test_the_lifecycle_imports_no_transport():
    tree = ast.parse(Path(coordinator_module.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [name for name in modules if name.startswith(("grpc", "fedtune.protos", "google.protobuf"))]


# -- the gRPC face only maps: every refusal and answer has its wire form -----------------------


def test_every_refusal_reason_and_poll_answer_has_its_grpc_form():
    assert set(STATUS_CODES) == set(Refusal)
    assert refusal_status(Refused(Refusal.NOT_SELECTED, "x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert refusal_status(ValueError("unexpected")) is None  # answered with INTERNAL
    assert pull_status(PollAnswer(PollKind.WAIT, 3, round=2, reason="r", retry_after_s=5.0, sits_out=True)) == (
        pb.PullStatus(kind=pb.PullStatus.WAIT, rounds=3, round=2, reason="r", retry_after_ms=5000, sits_out=True))
    told = pull_status(PollAnswer(PollKind.INSTRUCTION, 3, round=1, deadline=1_700_000_000.1234))
    assert (told.kind, told.deadline_unix_ms, told.retry_after_ms) == (pb.PullStatus.INSTRUCTION, 1_700_000_000_123, 0)


@pytest.mark.parametrize("request_fields, shown", [
    ({"activity": "training", "round": 3, "progress": 0.4}, "training round 3 40%"),
    ({"activity": "waiting", "round": 0, "progress": 0.0}, "waiting"),
    ({"activity": "training\n[fake] log", "round": 1, "progress": float("nan")}, "training[fake] log round 1"),
    ({"activity": "x" * 500, "round": 2, "progress": 7.0}, "x" * 64 + " round 2"),
])
def test_fedserver_status_shows_a_heartbeats_round_and_progress_and_nothing_unbounded(request_fields, shown):
    assert heartbeat_activity(pb.HeartbeatRequest(**request_fields)) == shown
