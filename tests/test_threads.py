"""Thread counts (issue 15): a default that never oversubscribes the machine, applied before torch works."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from fedtune.fedclient import cli as fedclient_cli
from fedtune.fedserver.config import ServerConfig
from fedtune.simulations import cli as fedsim_cli
from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.workers import _serve
from fedtune.strategies.runconfig import ConfigError, parse_run_config
from fedtune.tasks import threads
from fedtune.tasks.threads import THREAD_VARIABLES, apply_threads, default_threads


@pytest.fixture
def restored_threads(monkeypatch):
    """Whatever a test sets, the session goes on with its own torch threads and environment."""
    before = torch.get_num_threads()
    for variable in THREAD_VARIABLES:
        monkeypatch.setenv(variable, os.environ.get(variable, ""))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def six_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_the_default_shares_the_affine_cores_among_the_processes(six_cores):
    assert [default_threads(workers) for workers in (1, 2, 4, 6, 12)] == [6, 3, 1, 1, 1]
    assert SimulationConfig(workers=2).process_threads() == 3
    assert SimulationConfig(workers=2, threads=5).process_threads() == 5


def test_an_omp_num_threads_the_user_set_is_the_default(six_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert SimulationConfig(workers=2).process_threads() == 1
    assert SimulationConfig(threads=4).process_threads() == 4


def test_applying_sets_torch_and_the_environment_of_child_processes(restored_threads):
    apply_threads(3)
    assert torch.get_num_threads() == 3
    assert all(os.environ[variable] == "3" for variable in THREAD_VARIABLES)


def test_a_forked_worker_applies_its_share(restored_threads):
    parent, child = multiprocessing.Pipe()
    parent.send(None)  # stop at once: only the start-up runs
    _serve(child, {}, None, {}, {}, 3)
    assert torch.get_num_threads() == 3


def test_fedsim_applies_its_threads_before_the_run_starts(restored_threads, monkeypatch, six_cores):
    seen = []

    def record(*args, **kwargs):
        seen.append((torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]))
        raise ConfigError("stopped by the test")

    monkeypatch.setattr("fedtune.simulations.runner.run_simulation", record)
    assert fedsim_cli.main(["run", "--quiet", "--set", "workers=3"]) == 2
    assert fedsim_cli.main(["run", "--quiet", "--set", "threads=1"]) == 2
    assert seen == [(2, "2"), (1, "1")]


@pytest.mark.parametrize(("config_class", "raw", "field"), [
    (SimulationConfig, {"threads": 0}, "threads"),
    (ServerConfig, {"server": {"threads": 0}}, "server.threads"),
])
def test_a_thread_count_below_one_is_an_error_naming_the_field(config_class, raw, field):
    with pytest.raises(ConfigError, match=field):
        parse_run_config(config_class, raw, "run.toml", None)


def test_fedclient_refuses_a_thread_count_below_one(capsys):
    with pytest.raises(SystemExit):
        fedclient_cli.main(["join", "--server", "localhost:1", "--data", "x.jsonl", "--threads", "0"])
    assert "--threads must be at least 1" in capsys.readouterr().err
