"""fedsim `backend = "ray"`: a real two-node Ray cluster (a head and a worker node, separate processes on this
machine) gives the in-process run's global adapter, bit for bit, with its clients on both nodes; and a run
that cannot use Ray says why before the model loads.

The cluster is this module's own (tests/ray_cluster.py): its teardown ends the process groups it started
(and anything else running from the cluster's temporary directory), never other Ray instances on the
machine, as `ray stop` would."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedtune.simulations import runner
from fedtune.simulations.cli import main as fedsim_main
from fedtune.simulations.config import ConfigError, load_config
from fedtune.simulations.runner import build_federation, run_simulation
from tests.helpers import assert_same_outputs, tiny_config
from tests.ray_cluster import LocalRayCluster, free_ports

# Client state that even unsampled clients change (local models and duals, in `idle`): lost or misplaced state
# on any node would change the global adapter.
ADMM = {"strategy": "admm", "rounds": 3, "options": {"clients_per_round": 2, "continual": True},
        "partition": {"scheme": "iid", "num_clients": 4}}
CASES: dict[str, dict[str, Any]] = {"fedavg_lora": {"partition": {"scheme": "iid", "num_clients": 5}},
                                    "admm, continual": ADMM}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A head and a worker node, one CPU each (tests/ray_cluster.py); yields the head's address."""
    pytest.importorskip("ray")
    with LocalRayCluster(nodes=2, cpus=1) as cluster:
        yield cluster.address


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES)
def test_ray_backend_gives_the_in_process_global_adapter(case: str, ray_cluster: str, tmp_path: Path):
    run_simulation(tiny_config(**CASES[case]), tmp_path / "in-process", show_progress=False)
    run_simulation(tiny_config(backend="ray", ray_address=ray_cluster, **CASES[case]), tmp_path / "ray",
                   show_progress=False)
    assert_same_outputs(tmp_path / "ray", tmp_path / "in-process")


@pytest.mark.e2e
def test_ray_actors_hold_their_clients_on_both_nodes(ray_cluster: str):
    """One actor per node, each reporting its own node id; clients round-robin over them; a round's outcomes
    stream back from both, every client heard of as its work ends; the states come back from their owners."""
    from fedtune.simulations.ray_backend import RayPool

    config = tiny_config(backend="ray", ray_address=ray_cluster, partition={"scheme": "iid", "num_clients": 5})
    federation = build_federation(config)
    instructions = {cid: federation.server.instruction(1, cid) for cid in federation.clients}
    heard: list[str] = []
    with RayPool(config, federation.clients) as pool:
        assert len(set(pool.nodes)) == 2
        assert pool.owner == {"client-000": 0, "client-001": 1, "client-002": 0, "client-003": 1, "client-004": 0}
        assert {pool.nodes[pool.owner[cid]] for cid in federation.clients} == set(pool.nodes)
        outcomes = pool.run(1, instructions, heard.append)
        states = pool.client_states()
    assert sorted(heard) == sorted(outcomes) == sorted(federation.clients)
    assert all(outcome.update for outcome in outcomes.values())
    assert states.keys() == federation.clients.keys()


@pytest.mark.e2e
def test_a_ray_actor_killed_mid_run_stops_it_naming_the_actor_and_its_node(ray_cluster: str):
    import ray

    from fedtune.simulations.ray_backend import RayPool
    from fedtune.simulations.workers import WorkerError

    config = tiny_config(backend="ray", ray_address=ray_cluster)
    federation = build_federation(config)
    instructions = {cid: federation.server.instruction(1, cid) for cid in federation.clients}
    with RayPool(config, federation.clients) as pool:
        ray.kill(pool._actors[1])  # the fault: a node's actor dies (as when its node goes)
        with pytest.raises(WorkerError, match=f"fedsim Ray actor 1 \\(node {pool.nodes[1]}\\) failed in round 1"):
            pool.run(1, instructions)


class Interrupted(Exception):
    """The injected fault."""


@pytest.mark.e2e
def test_ray_run_resumed_after_a_fault_ends_with_the_in_process_adapter(ray_cluster: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """The checkpoint takes the clients' states from the actors, and --resume hands them to new actors."""
    run_simulation(tiny_config(**ADMM), tmp_path / "in-process", show_progress=False)
    config = tiny_config(backend="ray", ray_address=ray_cluster, **ADMM)
    original_round = runner.run_round

    def failing_round(federation, engine, round, *args, **kwargs):
        if round == 3:
            raise Interrupted("fault injected before round 3")
        return original_round(federation, engine, round, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "run_round", failing_round)
        with pytest.raises(Interrupted):
            run_simulation(config, tmp_path / "ray", show_progress=False)
    run_simulation(config, tmp_path / "ray", show_progress=False, resume=True)
    assert_same_outputs(tmp_path / "ray", tmp_path / "in-process")


def test_ray_backend_without_ray_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # the injected fault: `import ray` fails
    with pytest.raises(ConfigError, match=r"backend = 'ray' needs Ray, which is not installed: "
                                          r"pip install 'fedtune\[ray\]'"):
        run_simulation(tiny_config(backend="ray", ray_address="127.0.0.1:6379"), tmp_path / "out",
                       show_progress=False)
    assert not (tmp_path / "out").exists()  # before anything loads or is written


def test_ray_address_with_no_cluster_there_is_named_before_the_model_loads(tmp_path: Path, capsys):
    pytest.importorskip("ray")
    (port,) = free_ports(1)  # nothing listens there
    with pytest.raises(ConfigError, match=f"ray_address: no Ray cluster head answers at 127.0.0.1:{port}"):
        run_simulation(tiny_config(backend="ray", ray_address=f"127.0.0.1:{port}"), tmp_path / "out",
                       show_progress=False)
    assert not (tmp_path / "out").exists()
    assert fedsim_main(["run", "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "cli"), "--quiet"]) == 2
    assert f"no Ray cluster head answers at 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize(("toml", "message"), [
    ('backend = "ray"', "backend = 'ray' needs ray_address"),
    ('ray_address = "127.0.0.1:6379"', "ray_address is only used with backend = 'ray'"),
    ('backend = "ray"\nray_address = "head-node"', "ray_address(.|\n)*'head-node' is not HOST:PORT"),
    ('backend = "ray"\nray_address = "ray://head:10001"', "Ray Client's ray:// addresses are not supported"),
    ('backend = "ray"\nray_address = "auto"\nworkers = 2', "with backend = 'ray' each node of the cluster runs one"),
    ('backend = "spark"', "backend"),
])
def test_ray_config_errors_name_the_field(toml: str, message: str, tmp_path: Path):
    path = tmp_path / "run.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert load_config(None, {"backend": "ray", "ray_address": "10.0.0.1:6379"}).ray_address == "10.0.0.1:6379"
