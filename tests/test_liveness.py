"""`fedserver status` tells a live server from a dead one: the liveness lock in the run dir, and --watch."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedtune.fedserver.cli import main as fedserver_main
from fedtune.fedserver.liveness import ServerLock, ServerRunning, probe
from fedtune.fedserver.store import RunStore

HOLD_LOCK = ("import sys, time; from pathlib import Path; from fedtune.fedserver.liveness import ServerLock; "
             "lock = ServerLock(Path(sys.argv[1]), heartbeat_s=0.1).acquire(); print('held', flush=True); "
             "time.sleep(600)")


def hold_lock_in_a_process(run_dir: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_the_lock_is_held_while_the_process_lives_and_freed_by_a_kill(tmp_path: Path):
    assert probe(tmp_path).alive is False and probe(tmp_path).last_seen is None  # no server ever ran here
    process = hold_lock_in_a_process(tmp_path)
    try:
        held = probe(tmp_path)
        assert held.alive and held.pid == process.pid
        with pytest.raises(ServerRunning, match=f"another fedserver \\(pid {process.pid}\\) is serving"):
            ServerLock(tmp_path).acquire()
        deadline = time.monotonic() + 30
        while probe(tmp_path).last_seen <= held.last_seen:  # the heartbeat moves on
            assert time.monotonic() < deadline, "no heartbeat in 30 s"
            time.sleep(0.05)
    finally:
        kill(process)
    gone = probe(tmp_path)
    assert not gone.alive and gone.pid == process.pid
    assert time.time() - 30 < gone.last_seen <= time.time()
    with ServerLock(tmp_path) as lock:  # a dead holder does not keep a new server out
        assert probe(tmp_path).alive and lock.path.exists()
    assert not probe(tmp_path).alive


def test_status_says_stopped_with_a_dead_server_and_running_with_a_live_one(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    assert fedserver_main(["init", "--run-dir", str(run_dir), "--clients", "1"]) == 0
    store = RunStore(run_dir / "state.sqlite")
    store.set_meta(run_id="r" * 32, status="running")  # what a server leaves behind when it is killed
    store.close()
    capsys.readouterr()
    process = hold_lock_in_a_process(run_dir)
    try:
        assert fedserver_main(["status", "--run-dir", str(run_dir), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["status"] == "running" and report["server"]["alive"] and report["server"]["pid"] == process.pid
        assert fedserver_main(["status", "--run-dir", str(run_dir)]) == 0
        assert f"running, server pid {process.pid}" in capsys.readouterr().out
    finally:
        kill(process)
    assert fedserver_main(["status", "--run-dir", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "stopped" and not report["server"]["alive"]
    assert fedserver_main(["status", "--run-dir", str(run_dir)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(rf"stopped \(last seen \d+ s ago, pid {process.pid}; the process is gone: resume with "
                     r"`fedserver start --resume`\)", text), text
    assert fedserver_main(["status", "--run-dir", str(run_dir), "--watch", "--interval", "0.1"]) == 1
    assert "the server process is gone and the run is not finished" in " ".join(capsys.readouterr().out.split())


def test_watch_follows_a_live_server_until_its_process_ends(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    assert fedserver_main(["init", "--run-dir", str(run_dir), "--clients", "1"]) == 0
    store = RunStore(run_dir / "state.sqlite")
    store.set_meta(run_id="r" * 32, status="finished", finish_reason="all 2 rounds completed")  # and lingering
    store.close()
    process = hold_lock_in_a_process(run_dir)
    codes: list[int] = []
    watcher = threading.Thread(target=lambda: codes.append(
        fedserver_main(["status", "--run-dir", str(run_dir), "--watch", "--interval", "0.05"])))
    try:
        watcher.start()
        watcher.join(timeout=1.0)
        assert watcher.is_alive()  # the server process still lives: --watch goes on
    finally:
        kill(process)
    watcher.join(timeout=30)
    assert codes == [0]
    assert "the run finished; the server process has ended" in " ".join(capsys.readouterr().out.split())


@pytest.mark.e2e
def test_status_of_a_killed_fedserver_says_the_process_is_gone(tmp_path: Path, capsys):
    from tests.test_transport import init_run, run_config, start_server, wait_until

    init_run(tmp_path / "run", 1)
    server = start_server(tmp_path, run_config("fedavg_lora"), {"min_clients": 1})
    try:
        wait_until(lambda: (server.run_dir / "endpoint.json").exists(), 120, "the server to listen", server)
        capsys.readouterr()
        assert fedserver_main(["status", "--run-dir", str(server.run_dir), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["status"] == "running" and report["server"]["pid"] == server.process.pid
    finally:
        kill(server.process)
    assert fedserver_main(["status", "--run-dir", str(server.run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "stopped" and not report["server"]["alive"]
    assert fedserver_main(["status", "--run-dir", str(server.run_dir)]) == 0
    assert "the process is gone: resume with `fedserver start --resume`" in " ".join(capsys.readouterr().out.split())
    assert fedserver_main(["status", "--run-dir", str(server.run_dir), "--watch"]) == 1
