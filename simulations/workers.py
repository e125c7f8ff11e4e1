"""Run virtual clients' local work, in this process or in forked workers sharing one base model.

`fedsim` with `workers = N > 1` builds the whole federation (frozen base model, workspace, data,
client halves) in the parent and only then forks N processes. Forked pages are shared
copy-on-write and nobody writes the frozen base weights, so N workers cost one model plus, per
worker, the adapter, optimizer state, activations and the bits of heap it touches, not one model
per worker (which is what an actor-per-worker simulation such as Flower's pays). Each worker runs
one torch thread: OpenMP's thread pool (libgomp) does not survive fork, so a forked process that asks
for a parallel region after its parent has run one waits forever for threads that were never copied
(torch's DataLoader workers run one thread for the same reason). N single-thread workers are also the
fastest use of N cores; raise `workers`, not threads, to use more of them.

Client state: every client id is pinned to one worker for the whole run (round-robin over the
sorted ids), so its ClientStrategy object (ADMM duals, a DP accountant, error feedback) lives in
exactly one process and evolves exactly as in the in-process loop; the parent's copies are never
used once the workers run. Per round each worker gets the protobuf bytes of its clients'
instructions and sends back the protobuf bytes of their updates; the parent submits them in
client-id order, so a deterministic strategy gives the same global model whatever N is. Meanwhile
a worker says as each client's work ends (`ClientTrained`, for fedsim's progress line), and it
hands over its clients' strategy states when asked (`StateRequest`, for fedsim's checkpoint).
The worker's side of this is a `ClientHost`, which `simulations.ray_backend`'s actors serve too.

Memory: workers map large allocations (activations) separately and hand freed memory back to the
OS after each fit, and the parent does so before each round, so that what a worker holds between
fits is its share of the inherited pages plus its clients' adapter-sized state.
"""

from __future__ import annotations

import ctypes
import gc
import io
import multiprocessing
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict

from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.convert import instruction_from_proto, instruction_to_proto, update_to_proto
from fedtune.strategies.api import ClientRetired, ClientStrategy, Instruction, Workspace
from fedtune.tasks.data import TokenDataset
from fedtune.tasks.threads import apply_threads

WORKER_THREADS = 1
"""torch threads in a forked worker: any more and it can hang in OpenMP (module docstring)."""


class ClientOutcome(BaseModel):
    """One client's result for a round: its encoded update, or why it retired instead."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    update: bytes | None = None  # a serialized pb.ClientUpdate
    retired: str | None = None  # the ClientRetired message (e.g. its privacy budget is spent)


class RoundJobs(BaseModel):
    """What the parent sends one worker for one round: its clients' encoded instructions."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    round: int
    instructions: dict[str, bytes]


class ClientTrained(BaseModel):
    """A worker's word, mid-round, that one client's work is done (the parent shows progress)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    client_id: str


class StateRequest(BaseModel):
    """The parent asks a worker for its clients' strategy states (fedsim's checkpoint)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class WorkerFailure(BaseModel):
    """A worker's exception, sent back so the parent fails with the worker's traceback."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    traceback: str


class WorkerError(RuntimeError):
    """A worker raised or died; the message names the worker and carries its traceback or exit code."""


def client_outcomes(
    clients: Mapping[str, ClientStrategy],
    workspace: Workspace,
    data: Mapping[str, TokenDataset],
    round: int,
    instructions: Mapping[str, Instruction],
    release_memory: bool = False,
    eval_data: Mapping[str, TokenDataset | None] | None = None,
) -> Iterator[tuple[str, ClientOutcome]]:
    """Local work of `clients` for one round, yielding each instructed client's outcome as its work ends:
    `respond` (fit, and evaluation on the client's `eval_data` when asked) for those with an instruction,
    then, once the last is yielded, the `idle` hook for every other one (also those that retired), as a
    device would do it. Exhaust it: the idle hooks are part of the round. `release_memory` hands the freed
    activations back to the OS after each fit. A generator, so that each transport (this process, a forked
    worker's pipe, a Ray actor's stream) passes outcomes on as they come."""
    trained: set[str] = set()
    for client_id in sorted(instructions):
        try:
            update = clients[client_id].respond(workspace, instructions[client_id], data[client_id],
                                                (eval_data or {}).get(client_id))
        except ClientRetired as retired:
            yield client_id, ClientOutcome(retired=str(retired))
        else:
            trained.add(client_id)
            outcome = ClientOutcome(update=update_to_proto(update).SerializeToString())
            if release_memory:
                _trim_heap()
            yield client_id, outcome
    for client_id, client in clients.items():
        if client_id not in trained:
            client.idle(workspace, round, data[client_id])


def collect_outcomes(
    outcomes: Iterable[tuple[str, ClientOutcome]], on_trained: Callable[[str], None] | None = None
) -> dict[str, ClientOutcome]:
    """Every client's outcome for the round (from `client_outcomes`); `on_trained(client_id)` hears of each
    instructed client as its work ends (progress)."""
    collected: dict[str, ClientOutcome] = {}
    for client_id, outcome in outcomes:
        collected[client_id] = outcome
        if on_trained is not None:
            on_trained(client_id)
    return collected


class ClientHost:
    """The clients one worker owns and what they share, behind the messages a pool exchanges with it.

    The worker side of every pool: a forked worker (`WorkerPool`) and a Ray actor
    (`simulations.ray_backend`) are two transports for this one object, so both decode the same
    protobuf instructions, run the same client loop and encode the same updates and states.
    """

    def __init__(
        self,
        clients: Mapping[str, ClientStrategy],
        workspace: Workspace,
        data: Mapping[str, TokenDataset],
        eval_data: Mapping[str, TokenDataset | None],
    ):
        self.clients, self.workspace, self.data, self.eval_data = clients, workspace, data, eval_data

    def work(self, jobs: RoundJobs) -> Iterator[tuple[str, ClientOutcome]]:
        """The round's outcomes of this worker's clients, as each client's work ends (`client_outcomes`)."""
        instructions = {
            cid: instruction_from_proto(pb.Instruction.FromString(encoded))
            for cid, encoded in jobs.instructions.items()
        }
        return client_outcomes(self.clients, self.workspace, self.data, jobs.round, instructions,
                               release_memory=True, eval_data=self.eval_data)

    def states(self) -> dict[str, bytes]:
        """Every owned client's strategy state, serialized to cross a process boundary as data."""
        return {cid: serialized_state(client.state_dict()) for cid, client in self.clients.items()}

    def load_states(self, states: Mapping[str, bytes]) -> None:
        """Put serialized states (`states`, e.g. a checkpoint's) back into the owned clients."""
        for cid, state in decoded_states(states).items():
            self.clients[cid].load_state_dict(state)


def pin_clients(client_ids: Iterable[str], workers: int) -> dict[str, int]:
    """Each client's worker for the whole run: round-robin over the sorted ids."""
    return {client_id: index % workers for index, client_id in enumerate(sorted(client_ids))}


def round_jobs(round: int, instructions: Mapping[str, Instruction], owner: Mapping[str, int],
               workers: int) -> list[RoundJobs]:
    """Each worker's share of a round's instructions, protobuf-encoded as they would go on the wire."""
    encoded: list[dict[str, bytes]] = [{} for _ in range(workers)]
    for cid, instruction in instructions.items():
        encoded[owner[cid]][cid] = instruction_to_proto(instruction).SerializeToString()
    return [RoundJobs(round=round, instructions=jobs) for jobs in encoded]


def decoded_states(states: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """Strategy states as `ClientHost.states` serialized them."""
    return {cid: torch.load(io.BytesIO(state), weights_only=True) for cid, state in states.items()}


class ClientPool(Protocol):
    """Where fedsim's round loop runs clients when not in its own process: forked workers (`WorkerPool`), a Ray
    cluster's actors (`simulations.ray_backend.RayPool`)."""

    def run(self, round: int, instructions: Mapping[str, Instruction],
            on_trained: Callable[[str], None] | None = None) -> dict[str, ClientOutcome]:
        """Every client's round (fits and idle hooks); `on_trained` hears of each client as its work ends."""
        ...

    def client_states(self) -> dict[str, dict[str, Any]]:
        """Every client's strategy state, from wherever it lives (fedsim's checkpoint)."""
        ...


class WorkerPool:
    """`workers` forked processes, each owning a fixed share of the virtual clients.

    Create it right after the federation is built (before any thread, e.g. a progress bar,
    starts) and use it as a context manager so the workers are always stopped.
    """

    def __init__(
        self,
        clients: Mapping[str, ClientStrategy],
        workspace: Workspace,
        data: Mapping[str, TokenDataset],
        workers: int,
        eval_data: Mapping[str, TokenDataset | None] | None = None,
    ):
        if workers < 2:
            raise ValueError(f"workers: a pool needs at least 2 workers, got {workers}")
        context = multiprocessing.get_context("fork")
        # Objects the workers inherit stay out of their garbage collections, which would otherwise
        # write to every inherited object and so copy its page (Python's advice for fork without exec).
        gc.collect()
        gc.freeze()
        self.owner = pin_clients(clients, workers)
        self._links: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for worker in range(workers):
            owned = {cid: client for cid, client in clients.items() if self.owner[cid] == worker}
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_serve, args=(child_end, owned, workspace, data, eval_data or {}),
                name=f"fedsim-worker-{worker}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self._links.append(parent_end)
            self._processes.append(process)
        gc.unfreeze()

    def run(self, round: int, instructions: Mapping[str, Instruction],
            on_trained: Callable[[str], None] | None = None) -> dict[str, ClientOutcome]:
        """Every worker does its clients' round (fits and idle hooks) in parallel; `on_trained` hears of each
        client as its work ends, in whichever worker."""
        _trim_heap()  # the parent idles meanwhile: return what its evaluation freed before the workers peak
        for link, jobs in zip(self._links, round_jobs(round, instructions, self.owner, len(self._links)), strict=True):
            link.send(jobs)
        outcomes: dict[str, ClientOutcome] = {}
        working = dict(enumerate(self._links))
        while working:
            ready = wait(list(working.values()))
            for worker, link in [(worker, link) for worker, link in working.items() if link in ready]:
                reply = self._receive(worker, link)
                if isinstance(reply, ClientTrained):
                    if on_trained is not None:
                        on_trained(reply.client_id)
                    continue
                if isinstance(reply, WorkerFailure):
                    raise WorkerError(f"fedsim worker {worker} failed in round {round}:\n{reply.traceback}")
                outcomes.update(reply)
                del working[worker]
        return outcomes

    def client_states(self) -> dict[str, dict[str, Any]]:
        """Every client's strategy state, from the worker that owns it."""
        for link in self._links:
            link.send(StateRequest())
        states: dict[str, dict[str, Any]] = {}
        for worker, link in enumerate(self._links):
            reply = self._receive(worker, link)
            if isinstance(reply, WorkerFailure):
                raise WorkerError(f"fedsim worker {worker} failed to report its clients' states:\n{reply.traceback}")
            states.update(decoded_states(reply))
        return states

    def _receive(self, worker: int, link: Connection) -> Any:
        try:
            return link.recv()
        except EOFError as error:
            process = self._processes[worker]
            process.join(timeout=5)
            raise WorkerError(f"fedsim worker {worker} died (exit code {process.exitcode})") from error

    def close(self) -> None:
        for link in self._links:
            try:
                link.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
        for link in self._links:
            link.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h


def _trim_heap() -> None:
    """glibc keeps freed memory in the heap (a fit's activations, hundreds of MB for a BERT
    batch) and fragments it across fits of different sequence lengths: give it back, so that a
    worker's memory does not creep up with the number of clients it serves."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _map_large_allocations() -> None:
    """Serve allocations of 1 MiB and more (activations) from their own mappings, returned to the
    OS when freed. glibc's default raises that threshold as big blocks are freed, so a fit's
    activations of varying sequence lengths end up fragmenting the heap: measured on MiniLM
    (batch 16 x 64 tokens), this lowers two workers' peak by about 180 MB at the same speed."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def configure_worker_process(threads: int) -> None:
    """What a process that runs clients sets first, before torch does any work: its threads, and memory that
    goes back to the OS after each fit."""
    apply_threads(threads)
    _map_large_allocations()


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def _serve(
    link: Connection,
    clients: Mapping[str, ClientStrategy],
    workspace: Workspace,
    data: Mapping[str, TokenDataset],
    eval_data: Mapping[str, TokenDataset | None],
) -> None:
    """A worker's loop: decode the round's instructions, run its clients, send encoded outcomes."""
    configure_worker_process(WORKER_THREADS)
    host = ClientHost(clients, workspace, data, eval_data)
    while (jobs := link.recv()) is not None:
        try:
            if isinstance(jobs, StateRequest):
                link.send(host.states())
                continue
            outcomes: dict[str, ClientOutcome] = {}
            for client_id, outcome in host.work(jobs):
                outcomes[client_id] = outcome
                link.send(ClientTrained(client_id=client_id))
            link.send(outcomes)
        except Exception:  # noqa: BLE001 - any failure goes back to the parent, which stops the run
            link.send(WorkerFailure(traceback=traceback.format_exc()))
    link.close()


def serialized_state(state: dict[str, Any]) -> bytes:
    """A strategy state as torch.save bytes: its tensors cross the pipe as data, not as shared-memory handles."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
