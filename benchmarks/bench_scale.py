"""Scale benchmark: N concurrent light clients complete one round against one fedserver on loopback.

    .venv/bin/python -m benchmarks.bench_scale [--clients 100 1000]

The server is the real `fedserver` process (fedavg_lora, LoRA rank 1 on the tiny model: an 8.5 KiB
update). Each light client is a thread with its own gRPC channel (its own TCP connection) speaking
the protocol through the fedclient library's Connection and payload streams: Register, long-poll
PullInstruction, PushUpdate (the instruction's tensors sent back: a valid update, no training),
then poll until DONE. Reported per N: wall time from the first Register to the last client hearing
DONE, the server's peak RSS, retried RPCs and failed clients.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from benchmarks.bench_transport import BIN, RssSampler
from fedclient.connection import Connection, ConnectionSettings
from fedserver.cli import main as fedserver_main
from protos import fedtune_pb2 as pb
from protos.payload import PROTOCOL_VERSION, Limits, PayloadReader, instruction_from_stream, update_messages
from strategies.api import ClientUpdate

MiB = 1 << 20


def server_config(run_dir: Path, port: int, clients: int) -> str:
    return f"""strategy = "fedavg_lora"
rounds = 1
seed = 0
[options]
rank = 1
[model]
path = "builtin:tiny-llama"
max_length = 32
[data]
train = "builtin:ops"
max_train_examples = 200
max_eval_examples = 16
[server]
run_dir = "{run_dir}"
host = "127.0.0.1"
port = {port}
insecure = true
min_clients = {clients}
client_timeout_s = 300
heartbeat_interval_s = 30
long_poll_s = 20
round_deadline_s = 600
linger_s = 60
"""


class LightClient:
    """The protocol without training: what a device does, minus the model."""

    def __init__(self, address: str, token: str, name: str):
        self.name = name
        self.connection = Connection(ConnectionSettings(server=address, token=token, ca=None, insecure=True,
                                                        max_message_bytes=16 * MiB, give_up_after_s=300,
                                                        max_backoff_s=2))
        self.error: str | None = None

    def pull(self, limits: Limits):
        def attempt():
            stream = self.connection.stub.PullInstruction(pb.PullRequest(wait_ms=20_000),
                                                          metadata=self.connection.metadata)
            status = next(stream).status
            if status.kind != pb.PullStatus.INSTRUCTION:
                stream.cancel()
                return status, None
            reader = PayloadReader("Instruction", limits, 1 << 30)
            for message in stream:
                reader.feed(message)
            return status, instruction_from_stream(reader)
        return self.connection.call("PullInstruction", attempt)

    def run(self, start: threading.Barrier) -> None:
        stub, metadata = self.connection.stub, self.connection.metadata
        try:
            start.wait()
            reply = self.connection.call("Register", lambda: stub.Register(
                pb.RegisterRequest(protocol_version=PROTOCOL_VERSION, name=self.name), metadata=metadata, timeout=120))
            limits = Limits.from_proto(reply.limits)
            while True:
                status, instruction = self.pull(limits)
                if status.kind == pb.PullStatus.DONE:
                    return
                if instruction is not None:
                    update = ClientUpdate(client_id=reply.client_id, round=status.round, num_examples=1,
                                          tensors=instruction.tensors)
                    self.connection.call("PushUpdate", lambda: stub.PushUpdate(
                        update_messages(update, limits.chunk_bytes), metadata=metadata, timeout=120))
        except (grpc.RpcError, Exception) as error:  # noqa: BLE001 - a failed client is counted, not fatal
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.connection.close()


def bench(clients: int, tmp: Path) -> dict[str, float]:
    run_dir = tmp / f"run-{clients}"
    fedserver_main(["init", "--run-dir", str(run_dir), "--clients", str(clients)])
    tokens = [line.split("\t")[1] for line in (run_dir / "enrollment-tokens.txt").read_text().splitlines()]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp / f"server-{clients}.toml"
    config.write_text(server_config(run_dir, port, clients))
    server = subprocess.Popen([str(BIN / "fedserver"), "start", "--config", str(config)],
                              stdout=(tmp / f"server-{clients}.log").open("w"), stderr=subprocess.STDOUT)
    try:
        while not (run_dir / "endpoint.json").exists():
            if server.poll() is not None:
                raise RuntimeError((tmp / f"server-{clients}.log").read_text())
            time.sleep(0.2)
        start = threading.Barrier(clients + 1)
        light = [LightClient(f"127.0.0.1:{port}", token, f"light-{i:04d}") for i, token in enumerate(tokens)]
        threads = [threading.Thread(target=c.run, args=(start,), daemon=True) for c in light]
        for thread in threads:
            thread.start()
        with RssSampler(server.pid) as rss:
            start.wait()
            began = time.perf_counter()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - began
        server.wait(timeout=120)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {"wall": wall, "rss_peak": rss.peak, "retried": sum(c.connection.outages for c in light),
                "failed": sum(c.error is not None for c in light), "accepted": metrics[-1]["clients"],
                "errors": [c.error for c in light if c.error][:3]}
    finally:
        if server.poll() is None:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    threading.stack_size(512 * 1024)
    with tempfile.TemporaryDirectory() as tmp_name:
        for clients in args.clients:
            result = bench(clients, Path(tmp_name))
            print(f"{clients:5d} clients: one round in {result['wall']:6.1f} s wall, {result['accepted']} updates "
                  f"aggregated, server peak RSS {result['rss_peak'] / MiB:.0f} MiB, retried RPCs "
                  f"{result['retried']}, failed clients {result['failed']}"
                  + (f" (e.g. {result['errors']})" if result["errors"] else ""), flush=True)


if __name__ == "__main__":
    main()
