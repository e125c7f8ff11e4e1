"""fedclient's defaults: one state file per client identity, and giving up on an unreachable server."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from fedtune.fedclient.connection import FatalError
from fedtune.fedclient.state import default_state_file
from tests.test_transport import BIN, ENV, finish, free_port, init_run, run_config, start_server

SERVER = "fed.example.org:50051"


def test_default_state_file_is_one_per_client_identity(tmp_path: Path):
    by_token = [default_state_file(SERVER, "", token, tmp_path) for token in ("ftk_a", "ftk_b")]
    assert by_token[0] != by_token[1]
    digest = hashlib.sha256(b"ftk_a").hexdigest()[:12]  # the id the server gives an unnamed client
    assert by_token[0] == tmp_path / ".fedtune" / f"client-fed.example.org-50051-device-{digest}.pt"
    named = default_state_file(SERVER, "client-007", "ftk_a", tmp_path)
    assert named == tmp_path / ".fedtune" / "client-fed.example.org-50051-client-007.pt"
    assert default_state_file(SERVER, f"device-{digest}", None, tmp_path) == by_token[0]


def test_a_rejoin_without_name_or_token_takes_the_one_state_file_for_that_server(tmp_path: Path):
    with pytest.raises(FatalError, match="pass --token"):
        default_state_file(SERVER, "", None, tmp_path)
    first = default_state_file(SERVER, "", "ftk_a", tmp_path)
    first.parent.mkdir()
    first.touch()
    (tmp_path / ".fedtune" / "client-other.example.org-50051-x.pt").touch()
    assert default_state_file(SERVER, "", None, tmp_path) == first
    default_state_file(SERVER, "", "ftk_b", tmp_path).touch()
    with pytest.raises(FatalError, match="2 client state files .* pass --name or --token"):
        default_state_file(SERVER, "", None, tmp_path)


@pytest.mark.e2e  # a real fedserver and two fedclient processes on loopback
def test_two_clients_on_one_host_with_default_state_files_complete_a_run(tmp_path: Path):
    home = tmp_path / "home"
    tokens = init_run(tmp_path / "run", 2)
    server = start_server(tmp_path, run_config("fedavg_lora"), {"min_clients": 2, "insecure": True})
    command = [str(BIN / "fedclient"), "join", "--server", server.address, "--data", "builtin:ops", "--insecure",
               "--max-backoff", "2", "--quiet"]
    clients = [subprocess.Popen([*command, "--token", token], stdout=(tmp_path / f"client-{i}.log").open("w"),
                                stderr=subprocess.STDOUT, env={**ENV, "HOME": str(home)})
               for i, token in enumerate(tokens)]
    try:
        finish(clients, tmp_path)
        assert server.wait(60) == 0, server.output()[-3000:]
    finally:
        for process in [*clients, server.process]:
            if process.poll() is None:
                process.kill()
    assert [row["clients"] for row in server.metrics()] == [0, 2, 2]
    digests = sorted(hashlib.sha256(token.encode()).hexdigest()[:12] for token in tokens)
    assert sorted(path.name for path in (home / ".fedtune").iterdir()) == [
        f"client-localhost-{server.port}-device-{digest}.pt" for digest in digests]


@pytest.mark.e2e  # a connection attempt on a loopback port
def test_a_client_pointed_at_a_dead_port_gives_up_with_a_clear_message(tmp_path: Path):
    address = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [str(BIN / "fedclient"), "join", "--server", address, "--data", "builtin:ops", "--insecure", "--token", "t",
         "--state", str(tmp_path / "client.pt"), "--give-up-after", "1", "--max-backoff", "0.2", "--quiet"],
        capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 1, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"fedclient: Register: server {address} unreachable for"), last_line
    assert "giving up" in last_line and "--give-up-after" in last_line


def test_an_upload_retried_after_a_whole_attempt_gets_a_new_progress_bar():
    """Regression: the bar was removed when an attempt had sent everything, and the retry's first callback then
    raised KeyError inside the request stream, so every retry failed (found killing a server on netns hosts)."""
    from rich.progress import Progress

    from fedtune.fedclient.cli import transfer_bar

    progress = Progress(disable=True)
    update = transfer_bar(progress, "round 1: upload")
    for _attempt in range(2):  # the first attempt sends everything, then the call fails and is retried
        update(512, 1024)
        update(1024, 1024)
    assert progress.task_ids == []
