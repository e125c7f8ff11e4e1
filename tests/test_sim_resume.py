"""`fedsim run --resume`: an interrupted simulation continues from its last completed round and ends with
the unbroken run's adapter, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedtune.simulations import runner
from fedtune.simulations.checkpoint import CHECKPOINT_FILE, resumable, save_checkpoint, take_checkpoint
from fedtune.simulations.config import ConfigError
from fedtune.simulations.runner import build_federation, run_simulation
from tests.helpers import assert_same_outputs, tiny_config

CASES: dict[str, dict[str, Any]] = {
    # client state (local models, duals) that even idle clients change, held in forked workers
    "admm, 2 workers": {"strategy": "admm", "workers": 2, "threads": 1,
                        "partition": {"scheme": "iid", "num_clients": 4},
                        "options": {"clients_per_round": 2, "continual": True}},
    # server state: the accountant and the noise stream
    "fedavg_lora+client_dp": {"dp": {"level": "client", "clipping_norm": 0.05, "noise_multiplier": 0.5,
                                     "noise_seed": 7}},
}


class Interrupted(Exception):
    """The injected fault."""


@pytest.mark.parametrize("case", CASES)
def test_a_run_resumed_after_a_fault_ends_with_the_unbroken_runs_adapter(case: str, tmp_path: Path, monkeypatch):
    config = tiny_config(rounds=3, **CASES[case])
    run_simulation(config, tmp_path / "unbroken", show_progress=False)

    original_round = runner.run_round

    def failing_round(federation, engine, round, *args, **kwargs):
        if round == 3:
            raise Interrupted("fault injected before round 3")
        return original_round(federation, engine, round, *args, **kwargs)

    broken = tmp_path / "broken"
    with monkeypatch.context() as patch:
        patch.setattr(runner, "run_round", failing_round)
        with pytest.raises(Interrupted):
            run_simulation(config, broken, show_progress=False)
    assert not (broken / "global").exists()
    assert [json.loads(line)["round"] for line in (broken / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    history = run_simulation(config, broken, show_progress=False, resume=True)
    assert [row.round for row in history] == [0, 1, 2, 3]
    assert_same_outputs(broken, tmp_path / "unbroken")


def test_resume_refuses_a_different_config_naming_each_differing_field(tmp_path: Path):
    config = tiny_config(rounds=3)
    federation = build_federation(config)
    save_checkpoint(tmp_path, take_checkpoint(federation, None, 1, []))
    changed = tiny_config(rounds=4, train={"local_steps": 5}, tracking={"tensorboard": True})
    with pytest.raises(ConfigError, match=r"--resume: the config's rounds, train.local_steps differ from the "
                                          r"interrupted run's"):
        resumable(changed, tmp_path)
    assert resumable(config.model_copy(update={"tracking": changed.tracking}), tmp_path).round == 1  # output only
    with pytest.raises(ConfigError, match=f"--resume: no checkpoint in {tmp_path / 'elsewhere'}"):
        resumable(config, tmp_path / "elsewhere")


def test_asynchronous_runs_refuse_resume_saying_why(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"asynchronous rounds \(\[asynchronous\]\) are not checkpointed"):
        run_simulation(tiny_config(asynchronous={"buffer_size": 2}), tmp_path, show_progress=False, resume=True)


@pytest.mark.e2e
def test_fedsim_killed_after_round_two_resumes_from_the_command_line(tmp_path: Path):
    """A real kill (SIGKILL, at any point after round 2's metrics row) and `fedsim run --out DIR --resume`
    without the config file: the checkpointed config is used."""
    config = tiny_config(rounds=3, threads=1)
    run_simulation(config, tmp_path / "unbroken", show_progress=False)  # conftest: one torch thread, as threads=1
    path = tmp_path / "run.toml"
    path.write_text(f"rounds = 3\nthreads = 1\n{toml_sections(config)}")
    out = tmp_path / "killed"
    fedsim = str(Path(sys.executable).parent / "fedsim")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([fedsim, "run", str(path), "--out", str(out), "--quiet"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "fedsim did not reach round 2"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / CHECKPOINT_FILE).exists() and not (out / "global").exists()
    resumed = subprocess.run([fedsim, "run", "--out", str(out), "--resume", "--quiet"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_outputs(out, tmp_path / "unbroken")


def toml_sections(config) -> str:
    """The test config's model, data and train tables as TOML (the rest are defaults)."""
    dumped = config.model_dump(mode="json")
    return "".join(f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n"
                                              for key, value in dumped[section].items() if value is not None)
                   for section in ("model", "data", "train"))
