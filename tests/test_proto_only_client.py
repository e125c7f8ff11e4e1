"""A client built from protos/fedtune.proto alone finishes real runs: the wire contract is enough.

`tests/proto_only_client.py` imports only grpc, numpy and the generated stubs. It runs in its own
process against a real fedserver (TLS, loopback) and answers every round from the instruction's
ReplyContract; the server accepts every reply and the run completes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_transport import ENV, init_run, run_config, start_server

CLIENT = Path(__file__).with_name("proto_only_client.py")
FEDTUNE_CODE = ("torch", "fedtune.strategies", "fedtune.tasks", "fedtune.fedclient", "fedtune.fedserver")
CASES = {
    "fedavg_lora": run_config("fedavg_lora"),
    "ffa_lora": run_config("ffa_lora"),
    "fedkseed": run_config("fedkseed", options={}),
    "fedavg_lora+int8": run_config("fedavg_lora", compression={"codec": "int8"}),
    "admm": run_config("admm"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES)
def test_a_client_built_from_the_proto_alone_completes_the_run(case: str, tmp_path: Path):
    token, = init_run(tmp_path / "run", 1)
    server = start_server(tmp_path, CASES[case], {"min_clients": 1})
    client = subprocess.run(
        [sys.executable, str(CLIENT), "--server", server.address, "--token", token, "--name", "vendor-device",
         "--ca", str(server.run_dir / "tls" / "ca.pem")],
        capture_output=True, text=True, timeout=180, env=ENV,
    )
    assert client.returncode == 0, client.stderr[-3000:] + server.output()[-3000:]
    report = json.loads(client.stdout.splitlines()[-1])
    assert report["rounds"] == [1, 2]
    assert report["client_timeout_ms"] == 5000  # start_server's client_timeout_s, as the proto says
    assert not [module for module in report["modules"] if module.startswith(FEDTUNE_CODE)]
    assert server.wait(60) == 0, server.output()[-3000:]
    rounds = server.metrics()[1:]
    assert [(row["clients"], row["rejected"]) for row in rounds] == [(1, 0), (1, 0)]
