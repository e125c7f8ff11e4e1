"""Thread counts (issue 15): a default that never oversubscribes the machine, applied before torch works."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

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


def test_applying_sets_torch_and_the_environment_of_child_processes():
    apply_threads(3)
    assert torch.get_num_threads() == 3
    assert all(os.environ[variable] == "3" for variable in THREAD_VARIABLES)


def test_a_forked_worker_runs_one_thread():
    apply_threads(2)
    parent, child = multiprocessing.Pipe()
    parent.send(None)  # stop at once: only the start-up runs
    _serve(child, {}, None, {}, {})
    assert torch.get_num_threads() == 1


FORK_AFTER_PARALLEL_WORK = """
import torch
from pathlib import Path
from fedtune.simulations.runner import run_simulation
from tests.helpers import tiny_config
square = torch.randn(1000, 1000)
(square @ square).cos()  # OpenMP's pool now has two threads, which a fork does not copy
run_simulation(tiny_config(rounds=1, workers=2), Path({out!r}), show_progress=False)
"""


@pytest.mark.e2e
def test_workers_forked_after_multithreaded_work_finish(tmp_path):
    """Regression: with OMP_NUM_THREADS=2 set, workers forked from a process that had run two-thread work asked
    OpenMP for two threads and hung for ever in their first forward pass."""
    environment = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).parents[1])}
    script = FORK_AFTER_PARALLEL_WORK.format(out=str(tmp_path / "run"))
    finished = subprocess.run([sys.executable, "-c", script], env=environment, timeout=300, capture_output=True,
                              text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert (tmp_path / "run" / "global" / "adapter_model.safetensors").exists()


def test_fedsim_applies_its_threads_before_the_run_starts(monkeypatch, six_cores):
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
