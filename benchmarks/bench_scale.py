"""Scale benchmark: N concurrent light clients complete R rounds against one fedserver on loopback.

    .venv/bin/python benchmarks/bench_scale.py [--clients 100 1000] [--rounds 1]

The server is the real `fedserver` process (fedavg_lora, LoRA rank 1 on the tiny model: an 8.5 KiB
update). Each light client speaks the protocol as a device does, minus the model: Register, long-poll
PullInstruction, PushUpdate (the instruction's tensors sent back: a valid update, no training),
then poll until DONE. The light clients are coroutines on one grpc.aio event loop in this process,
each with its own channel and its own TCP connection (gRPC would otherwise share one connection
among all channels of a process with the same target), so the harness stays cheap; at most
REGISTERING of them connect and register at once. Reported per N: wall time from the first Register
to the last client hearing DONE, the server's CPU time (and its system part) and peak RSS, retried
RPCs and failed clients; with --rounds > 1 also the server's RSS as each round ended and its growth
from round 2 to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import resource
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import psutil
from bench_transport import BIN, RssSampler  # run as a script: benchmarks/ is on sys.path

from fedtune.fedclient.connection import RETRYABLE, FederationStub
from fedtune.fedserver.cli import main as fedserver_main
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.limits import Limits
from fedtune.protos.payload import PROTOCOL_VERSION, PayloadReader, instruction_from_stream, update_messages
from fedtune.strategies.api import ClientUpdate

MiB = 1 << 20
REGISTERING = 500  # the harness's limit: 10,000 TCP handshakes at once overflow the listen backlog (SYN retries)


def server_config(run_dir: Path, port: int, clients: int, rounds: int) -> str:
    return f"""strategy = "fedavg_lora"
rounds = {rounds}
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
    """The protocol without training: what a device does, minus the model. Coroutines on one event
    loop (grpc.aio), each with its own channel, so the harness is not what limits the server."""

    def __init__(self, address: str, token: str, name: str):
        self.address = address
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.name = name
        self.retried: Counter[str] = Counter()  # "<method> <status> (<details>)" -> retries
        self.error: str | None = None

    async def _retrying(self, method: str, call):
        for attempt in range(20):
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE or attempt == 19:
                    raise
                self.retried[f"{method} {error.code().name} ({error.details()[:60]})"] += 1
                await asyncio.sleep(min(2.0, 0.1 * 2 ** attempt))

    async def run(self, start: asyncio.Event, registering: asyncio.Semaphore) -> None:
        # A channel of its own is not a connection of its own: gRPC shares one subchannel (one TCP connection)
        # among all channels of a process with the same target and arguments, unless each has a local pool.
        options = [("grpc.max_receive_message_length", 16 * MiB), ("grpc.max_send_message_length", 16 * MiB),
                   ("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(self.address, options=options) as channel:
            stub = FederationStub(channel)  # fedclient's payload-stream encoding, on a grpc.aio channel
            try:
                await start.wait()
                async with registering:  # connects on this first call
                    reply = await self._retrying("Register", lambda: stub.Register(
                        pb.RegisterRequest(protocol_version=PROTOCOL_VERSION, name=self.name),
                        metadata=self.metadata))
                limits = Limits.from_proto(reply.limits)
                while True:
                    status, instruction = await self._retrying("PullInstruction", lambda: self._pull(stub, limits))
                    if status.kind == pb.PullStatus.DONE:
                        return
                    if instruction is not None:
                        update = ClientUpdate(client_id=reply.client_id, round=status.round, num_examples=1,
                                              tensors=instruction.tensors)
                        await self._retrying("PushUpdate", functools.partial(self._push, stub, update, limits))
            except Exception as error:  # noqa: BLE001 - a failed client is counted, not fatal
                self.error = f"{type(error).__name__}: {error}"

    async def _pull(self, stub, limits: Limits):
        stream = stub.PullInstruction(pb.PullRequest(wait_ms=20_000), metadata=self.metadata)
        status = (await stream.read()).status
        if status.kind != pb.PullStatus.INSTRUCTION:
            stream.cancel()
            return status, None
        reader = PayloadReader("Instruction", limits, 1 << 30)
        while (message := await stream.read()) is not grpc.aio.EOF:
            reader.feed(message)
        return status, instruction_from_stream(reader)

    async def _push(self, stub, update: ClientUpdate, limits: Limits):
        return await stub.PushUpdate(_aiter(update_messages(update, limits.chunk_bytes)), metadata=self.metadata)


async def _aiter(items):
    for item in items:
        yield item


async def run_clients(clients: list[LightClient]) -> float:
    start = asyncio.Event()
    registering = asyncio.Semaphore(REGISTERING)
    tasks = [asyncio.create_task(client.run(start, registering)) for client in clients]
    await asyncio.sleep(0.5)  # every channel created and waiting
    began = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return time.perf_counter() - began


class RoundWatcher:
    """The server's RSS each time a round's metrics row appears (a thread polling metrics.jsonl)."""

    def __init__(self, pid: int, metrics: Path):
        self.process = psutil.Process(pid)
        self.metrics = metrics
        self.rss: list[int] = []  # after round 1, 2, ...
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rows = len(self.metrics.read_text().splitlines()) if self.metrics.exists() else 0
            while len(self.rss) < rows - 1:  # row 0 is the baseline before round 1
                try:
                    self.rss.append(self.process.memory_info().rss)
                except psutil.Error:
                    return

    def __enter__(self) -> RoundWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bench(clients: int, rounds: int, tmp: Path) -> dict[str, Any]:
    run_dir = tmp / f"run-{clients}"
    fedserver_main(["init", "--run-dir", str(run_dir), "--clients", str(clients)])
    tokens = [line.split("\t")[1] for line in (run_dir / "enrollment-tokens.txt").read_text().splitlines()]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp / f"server-{clients}.toml"
    config.write_text(server_config(run_dir, port, clients, rounds))
    server = subprocess.Popen([str(BIN / "fedserver"), "start", "--config", str(config)],
                              stdout=(tmp / f"server-{clients}.log").open("w"), stderr=subprocess.STDOUT)
    try:
        while not (run_dir / "endpoint.json").exists():
            if server.poll() is not None:
                raise RuntimeError((tmp / f"server-{clients}.log").read_text())
            time.sleep(0.2)
        light = [LightClient(f"127.0.0.1:{port}", token, f"light-{i:04d}") for i, token in enumerate(tokens)]
        server_cpu = psutil.Process(server.pid)
        with RssSampler(server.pid) as rss, RoundWatcher(server.pid, run_dir / "metrics.jsonl") as watcher:
            user_before, system_before = server_cpu.cpu_times()[:2]
            wall = asyncio.run(run_clients(light))
            user_after, system_after = server_cpu.cpu_times()[:2]
        failed = [c.error for c in light if c.error]
        if len(failed) == clients:
            raise RuntimeError(f"every client failed, e.g. {failed[0]}")
        server.wait(timeout=120)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {"wall": wall, "server_cpu": user_after + system_after - user_before - system_before,
                "server_system": system_after - system_before, "rss_peak": rss.peak,
                "retried": sum((c.retried for c in light), Counter()),
                "failed": sum(c.error is not None for c in light), "accepted": [row["clients"] for row in metrics[1:]],
                "rss_rounds": watcher.rss,
                "errors": [c.error for c in light if c.error][:3]}
    finally:
        if server.poll() is None:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per client here and in the server
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < max(args.clients) + 1000:
        print(f"warning: RLIMIT_NOFILE hard limit {hard} may be too low for {max(args.clients)} clients")
    with tempfile.TemporaryDirectory() as tmp_name:
        for clients in args.clients:
            result = bench(clients, args.rounds, Path(tmp_name))
            print(f"{clients:5d} clients: {args.rounds} round(s) in {result['wall']:6.1f} s wall, updates aggregated "
                  f"per round {sorted(set(result['accepted']))}, server CPU {result['server_cpu']:.1f} s "
                  f"({result['server_system']:.1f} s system), server peak RSS {result['rss_peak'] / MiB:.0f} MiB, "
                  f"retried RPCs {result['retried'].total()} {dict(result['retried'])}, "
                  f"failed clients {result['failed']}"
                  + (f" (e.g. {result['errors']})" if result["errors"] else ""), flush=True)
            if args.rounds > 1 and len(result["rss_rounds"]) >= 2:
                second, last = result["rss_rounds"][1], result["rss_rounds"][-1]
                print(f"       server RSS after each round (MiB): {[round(r / MiB) for r in result['rss_rounds']]}; "
                      f"round 2 -> {len(result['rss_rounds'])}: {(last - second) / second:+.1%}", flush=True)


if __name__ == "__main__":
    main()
