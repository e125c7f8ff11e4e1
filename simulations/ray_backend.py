"""fedsim on a Ray cluster (`backend = "ray"`): one actor per node runs that node's share of the virtual clients.

`workers` stops at one machine's cores and memory; a Ray cluster adds machines. Each node with CPUs
gets one actor, which reserves the node's CPUs (and GPUs), runs that many torch threads, and builds
the federation itself from the run's config: the same seed gives the same frozen base model,
workspace, data partition and client halves as fedsim's own process, so the base model loads once
per node and never crosses the network. The actor then keeps only the clients pinned to it
(round-robin over the sorted ids, as `WorkerPool` does) for the whole run, so their strategy state
(ADMM duals, a DP accountant, error feedback) evolves in one place, as in the in-process loop.

The actor serves a `workers.ClientHost`, the same object a forked worker serves: per round it gets
its clients' protobuf-encoded instructions (`RoundJobs`) and streams back their encoded updates as
each client's work ends (a Ray generator, which also drives fedsim's progress line); the idle hooks
run before the stream ends. fedsim's process decodes and submits the updates in client-id order, so
bytes and the global model are those of the in-process run. On a checkpoint the actors hand over
their clients' states; on `--resume` the checkpointed states go to the actors that own them.

Every node needs the same fedtune (and Python packages) and the model and data files at the same
paths. Asynchronous rounds work as with `workers`; one actor per node means one client trains at a
time on each node.
"""

from __future__ import annotations

import logging
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import ModuleType, TracebackType
from typing import Any

from fedtune.simulations.config import ConfigError, SimulationConfig
from fedtune.simulations.runner import build_federation
from fedtune.simulations.workers import (
    ClientHost,
    ClientOutcome,
    RoundJobs,
    WorkerError,
    configure_worker_process,
    decoded_states,
    pin_clients,
    round_jobs,
    serialized_state,
)
from fedtune.strategies.api import Instruction

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 1800.0
"""How long the actors may take to be placed and to build their federation (an LLM loads in minutes)."""


def ray_module() -> ModuleType:
    """Ray, imported only when a run asks for it: fedtune works without the extra."""
    try:
        import ray
    except ImportError as error:
        raise ConfigError("backend = 'ray' needs Ray, which is not installed: pip install 'fedtune[ray]'") from error
    return ray


def check_cluster(address: str) -> None:
    """Fail before the model loads when Ray is missing or nothing listens at `address` (HOST:PORT or 'auto')."""
    ray_module()
    if address == "auto":
        return  # Ray finds the cluster this machine belongs to; RayPool says if there is none
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise ConfigError(f"ray_address: no Ray cluster head answers at {address} ({error}); start one with "
                          f"`ray start --head --port {port}` or give its address") from error


class NodeHost:
    """A Ray actor's state: its node's share of the clients, built on the node from the run's config."""

    def __init__(self, config: SimulationConfig, client_ids: list[str], threads: int, states: Mapping[str, bytes]):
        configure_worker_process(threads)
        federation = build_federation(config)
        missing = sorted(set(client_ids) - set(federation.clients))
        if missing:
            raise RuntimeError(f"the federation built on node {self.node()} lacks clients {missing[:5]}: are the "
                               "data files at the same paths the same on every node?")
        self.host = ClientHost({cid: federation.clients[cid] for cid in client_ids}, federation.workspace,
                               {cid: federation.data.clients[cid] for cid in client_ids},
                               {cid: federation.eval_data[cid] for cid in client_ids if cid in federation.eval_data})
        self.host.load_states(states)

    def node(self) -> str:
        """The id of the Ray node this actor runs on, as the actor itself sees it."""
        return str(ray_module().get_runtime_context().get_node_id())

    def work(self, jobs: RoundJobs) -> Iterator[tuple[str, ClientOutcome]]:
        """A round of this actor's clients, each outcome streamed back as its work ends (a Ray generator)."""
        yield from self.host.work(jobs)

    def states(self) -> dict[str, bytes]:
        """The owned clients' strategy states, serialized (fedsim's checkpoint)."""
        return self.host.states()


class RayPool:
    """One `NodeHost` actor per node of the Ray cluster at `config.ray_address`, each owning a fixed share of
    the clients; `states` (a checkpoint's, on resume) go to the clients' actors. Use it as a context manager
    so the actors are stopped and this process disconnects."""

    def __init__(self, config: SimulationConfig, client_ids: Iterable[str],
                 states: Mapping[str, dict[str, Any]] | None = None):
        assert config.ray_address is not None  # the config's validation requires it with backend = "ray"
        ray = self._ray = ray_module()
        self._connected = not ray.is_initialized()
        if self._connected:
            try:
                with warnings.catch_warnings():  # its tip on GPUs and num_gpus=0: each actor reserves its node's GPUs
                    warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
                    ray.init(address=config.ray_address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError) as error:
                raise ConfigError(f"ray_address: cannot join the Ray cluster at {config.ray_address}: "
                                  f"{error}") from error
        self._actors: list[Any] = []
        try:
            self._start(config, sorted(client_ids), states or {})
        except BaseException:
            self.close()
            raise

    def _start(self, config: SimulationConfig, client_ids: list[str], states: Mapping[str, dict[str, Any]]) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self._ray
        nodes = sorted((node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1),
                       key=lambda node: node["NodeID"])
        if not nodes:
            raise ConfigError(f"ray_address: the Ray cluster at {config.ray_address} has no node with a CPU")
        self.owner = pin_clients(client_ids, len(nodes))
        actor_class = ray.remote(NodeHost)
        for index, node in enumerate(nodes):
            owned = [cid for cid in client_ids if self.owner[cid] == index]
            cpus, gpus = int(node["Resources"]["CPU"]), int(node["Resources"].get("GPU", 0))
            self._actors.append(actor_class.options(
                num_cpus=cpus, num_gpus=gpus,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            ).remote(config, owned, cpus, {cid: serialized_state(states[cid]) for cid in owned if cid in states}))
        try:
            self.nodes: list[str] = ray.get([actor.node.remote() for actor in self._actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as error:
            raise WorkerError(f"fedsim: the Ray actors were not ready within {READY_TIMEOUT_S:.0f} s; each reserves "
                              "all its node's CPUs: does another job hold them?") from error
        except ray.exceptions.RayError as error:
            raise WorkerError(f"fedsim: a Ray actor failed to start:\n{error}") from error
        log.info("fedsim: %d clients on %d Ray nodes (%s)", len(client_ids), len(nodes), ", ".join(self.nodes))

    def run(self, round: int, instructions: Mapping[str, Instruction],
            on_trained: Callable[[str], None] | None = None) -> dict[str, ClientOutcome]:
        """Every actor does its clients' round (fits and idle hooks) in parallel; `on_trained` hears of each
        client as its work ends, on whichever node."""
        ray = self._ray
        jobs = round_jobs(round, instructions, self.owner, len(self._actors))
        streams = {actor.work.remote(share): index for index, (actor, share) in enumerate(zip(self._actors, jobs,
                                                                                               strict=True))}
        outcomes: dict[str, ClientOutcome] = {}
        while streams:
            ready, _ = ray.wait(list(streams), num_returns=1)
            for stream in ready:
                try:
                    client_id, outcome = ray.get(next(stream))
                except StopIteration:  # the actor's round is over, idle hooks included
                    del streams[stream]
                    continue
                except ray.exceptions.RayError as error:
                    actor = streams[stream]
                    raise WorkerError(f"fedsim Ray actor {actor} (node {self.nodes[actor]}) failed in round "
                                      f"{round}:\n{error}") from error
                outcomes[client_id] = outcome
                if on_trained is not None:
                    on_trained(client_id)
        return outcomes

    def client_states(self) -> dict[str, dict[str, Any]]:
        """Every client's strategy state, from the actor that owns it."""
        ray = self._ray
        try:
            replies = ray.get([actor.states.remote() for actor in self._actors])
        except ray.exceptions.RayError as error:
            raise WorkerError(f"fedsim: a Ray actor failed to report its clients' states:\n{error}") from error
        return {cid: state for reply in replies for cid, state in decoded_states(reply).items()}

    def close(self) -> None:
        """Stop the actors and disconnect from the cluster (which keeps running)."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._connected:
            self._ray.shutdown()
            self._connected = False

    def __enter__(self) -> RayPool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
