"""Defaults for real deployments: mutual TLS, the CA key outside the run dir, the token kept out of argv,
and no plaintext server on an address other machines reach."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.fedclient import cli as fedclient_cli
from fedtune.fedclient.connection import FatalError
from fedtune.fedserver.cli import main as fedserver_main
from fedtune.fedserver.store import RunStore
from tests.test_transport import (  # noqa: F401 (no_leftover_processes: an autouse fixture, active once imported)
    BIN,
    ENV,
    finish,
    in_process_client,
    init_run,
    no_leftover_processes,
    run_config,
    start_server,
    stored,
    wait_until,
)

TOKENS_FILE = "enrollment-tokens.txt"


def init_mtls_run(run_dir: Path, clients: int, *options: str) -> list[str]:
    """`fedserver init --mtls`: tokens, and a client certificate per token in RUN_DIR/clients."""
    assert fedserver_main(["init", "--run-dir", str(run_dir), "--clients", str(clients), "--mtls", *options]) == 0
    return [line.split("\t")[1] for line in (run_dir / TOKENS_FILE).read_text().splitlines()]


def private_keys(directory: Path) -> dict[Path, bytes]:
    """Every PEM private key under `directory`, as the DER of its public key."""
    keys = {}
    for path in directory.rglob("*"):
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            keys[path] = key.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    return keys


def public_key_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- the CA key and client certificates (`fedserver init`) -------------------------------------


def test_init_leaves_no_ca_key_in_the_run_dir_and_says_where_it_went(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    init_mtls_run(run_dir, 2)
    ca_cert = x509.load_pem_x509_certificate((run_dir / "tls" / "ca.pem").read_bytes())
    in_run_dir = private_keys(run_dir)
    assert public_key_der(ca_cert) not in in_run_dir.values()
    assert sorted(path.relative_to(run_dir).as_posix() for path in in_run_dir) == [
        "clients/token-0001.key", "clients/token-0002.key", "tls/server.key"]
    ca_dir = tmp_path / "run.ca"
    assert private_keys(ca_dir) == {ca_dir / "ca.key": public_key_der(ca_cert)}
    assert mode(ca_dir) == 0o700 and mode(ca_dir / "ca.key") == 0o600
    assert f"the CA's private key is in {ca_dir / 'ca.key'}" in " ".join(capsys.readouterr().out.split())


def test_init_moves_the_ca_key_an_older_init_left_in_the_run_dir(tmp_path: Path):
    run_dir = tmp_path / "run"
    init_run(run_dir, 1)
    (tmp_path / "run.ca" / "ca.key").rename(run_dir / "tls" / "ca.key")  # where it used to be
    init_run(run_dir, 1)
    assert not (run_dir / "tls" / "ca.key").exists()
    assert mode(tmp_path / "run.ca" / "ca.key") == 0o600


def test_mtls_init_issues_a_client_certificate_per_token_signed_by_the_runs_ca(tmp_path: Path):
    run_dir, ca_dir = tmp_path / "run", tmp_path / "offline" / "ca"
    init_mtls_run(run_dir, 2, "--ca-dir", str(ca_dir))
    init_mtls_run(run_dir, 1, "--ca-dir", str(ca_dir))  # later tokens get theirs from the same CA
    ca_cert = x509.load_pem_x509_certificate((run_dir / "tls" / "ca.pem").read_bytes())
    for label in ("token-0001", "token-0002", "token-0003"):
        cert = x509.load_pem_x509_certificate((run_dir / "clients" / f"{label}.pem").read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == label
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH]
        key = run_dir / "clients" / f"{label}.key"
        assert mode(key) == 0o600 and private_keys(key.parent)[key] == public_key_der(cert)


def test_mtls_init_needs_the_ca_key_and_keeps_it_outside_the_run_dir(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    init_run(run_dir, 1)
    assert fedserver_main(["init", "--run-dir", str(run_dir), "--clients", "1", "--mtls",
                           "--ca-dir", str(tmp_path / "elsewhere")]) == 2
    assert "needs the CA's private key" in capsys.readouterr().err
    assert fedserver_main(["init", "--run-dir", str(run_dir), "--clients", "1", "--ca-dir", str(run_dir / "ca")]) == 2
    assert "inside the run dir" in capsys.readouterr().err
    assert stored(run_dir, RunStore.token_count) == 1  # neither added a token


# -- the token: a file or FEDTUNE_TOKEN rather than argv -----------------------------------------


@pytest.fixture
def joined(monkeypatch) -> list[str | None]:
    """The token `fedclient join` would join with (the join itself is replaced)."""
    tokens: list[str | None] = []

    def join(args: argparse.Namespace, token: str | None) -> int:
        tokens.append(token)
        return 0

    monkeypatch.setattr(fedclient_cli, "_join", join)
    monkeypatch.delenv(fedclient_cli.TOKEN_VARIABLE, raising=False)
    return tokens


JOIN = ["join", "--server", "fed.example.org:50051", "--data", "builtin:ops", "--insecure"]


def test_a_token_on_the_command_line_works_with_a_warning(joined: list[str | None], capsys):
    assert fedclient_cli.main([*JOIN, "--token", "ftk_argv"]) == 0
    assert joined == ["ftk_argv"]
    warning = " ".join(capsys.readouterr().err.split())
    assert "other users of this machine can read (ps)" in warning
    assert "--token-file" in warning and "FEDTUNE_TOKEN" in warning


def test_the_token_comes_from_a_file_or_fedtune_token_without_a_warning(joined: list[str | None], tmp_path: Path,
                                                                        monkeypatch, capsys):
    monkeypatch.setenv("FEDTUNE_TOKEN", "ftk_environment")
    assert fedclient_cli.main(JOIN) == 0
    (tmp_path / "token").write_text("ftk_file\n")
    assert fedclient_cli.main([*JOIN, "--token-file", str(tmp_path / "token")]) == 0
    assert joined == ["ftk_environment", "ftk_file"]
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        fedclient_cli.main([*JOIN, "--token-file", str(tmp_path / "token"), "--token", "ftk_argv"])


def test_a_client_certificate_needs_its_key_and_tls(joined: list[str | None], capsys):
    with pytest.raises(SystemExit):
        fedclient_cli.main([*JOIN, "--cert", "client.pem"])
    assert "--cert and --key go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fedclient_cli.main([*JOIN, "--cert", "client.pem", "--key", "client.key"])
    assert "exclude --insecure" in capsys.readouterr().err
    assert joined == []


# -- plaintext only on loopback, unless asked twice -----------------------------------------------


def start_refusal(tmp_path: Path, capsys, *options: str) -> str:
    """`fedserver start` with no run initialised: the error it stops at (a config or address check comes first)."""
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nrun_dir = "{tmp_path / "run"}"\n')
    assert fedserver_main(["start", "--config", str(config), *options]) == 2
    return " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "fed.example.org"])
def test_plaintext_on_an_address_other_machines_reach_needs_a_second_flag(host: str, tmp_path: Path, capsys):
    error = start_refusal(tmp_path, capsys, "--insecure", "--host", host)
    assert f"server.host {host} is reachable from other machines" in error
    assert "--insecure-any-host (server.allow_insecure_remote = true)" in error
    assert "no enrollment tokens" in start_refusal(tmp_path, capsys, "--insecure", "--host", host,
                                                   "--insecure-any-host")
    assert "no enrollment tokens" in start_refusal(tmp_path, capsys, "--host", host)  # TLS: fine anywhere


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_plaintext_on_loopback_starts_as_before(host: str, tmp_path: Path, capsys):
    assert "no enrollment tokens" in start_refusal(tmp_path, capsys, "--insecure", "--host", host)


def test_mtls_and_plaintext_exclude_each_other(tmp_path: Path, capsys):
    error = start_refusal(tmp_path, capsys, "--insecure", "--host", "127.0.0.1", "--set", "server.mtls=true")
    assert "server.mtls needs TLS" in error


@pytest.mark.e2e  # a real fedserver process
def test_a_plaintext_server_listens_on_every_interface_when_asked_to(tmp_path: Path):
    init_run(tmp_path / "run", 1)
    server = start_server(tmp_path, run_config("fedavg_lora"), {"insecure": True, "host": "0.0.0.0",
                                                                "allow_insecure_remote": True})
    wait_until(lambda: "listening on 0.0.0.0:" in server.output(), 120, "the server to listen", server)
    assert "plaintext" in server.output()


# -- mutual TLS over real gRPC ----------------------------------------------------------------------


@pytest.mark.e2e  # a real fedserver and fedclient on loopback
def test_mtls_server_refuses_clients_without_the_runs_certificate_and_serves_one_with_it(tmp_path: Path):
    tokens = init_mtls_run(tmp_path / "run", 2)
    init_mtls_run(tmp_path / "other", 1)
    server = start_server(tmp_path, run_config("fedavg_lora", rounds=1), {"min_clients": 1, "mtls": True})
    data = Path("builtin:ops")
    no_cert = in_process_client(server, tmp_path, "no-cert", data, tokens[1])
    with pytest.raises(FatalError, match="requires a client certificate .*pass --cert and --key"):
        no_cert.register()
    other = tmp_path / "other" / "clients"
    other_ca = in_process_client(server, tmp_path, "other-ca", data, tokens[1], cert=other / "token-0001.pem",
                                 key=other / "token-0001.key")
    with pytest.raises(FatalError, match="refused the client certificate .*signed"):
        other_ca.register()

    clients = tmp_path / "run" / "clients"
    client = subprocess.Popen(
        [str(BIN / "fedclient"), "join", "--server", server.address, "--data", str(data), "--name", "client-000",
         "--state", str(tmp_path / "client.state"), "--ca", str(server.run_dir / "tls" / "ca.pem"),
         "--cert", str(clients / "token-0001.pem"), "--key", str(clients / "token-0001.key"), "--quiet",
         "--max-backoff", "2"],
        stdout=(tmp_path / "client.log").open("w"), stderr=subprocess.STDOUT,
        env={**ENV, "FEDTUNE_TOKEN": tokens[0]})
    try:
        finish([client], tmp_path)
        assert server.wait(60) == 0, server.output()[-3000:]
    finally:
        client.kill()
    assert "--token puts" not in (tmp_path / "client.log").read_text()  # FEDTUNE_TOKEN: nothing to warn about
    assert [c.client_id for c in stored(server.run_dir, RunStore.clients)] == ["client-000"]
    assert [row["clients"] for row in server.metrics()] == [0, 1]
