"""Transport benchmark: large updates through fedclient -> fedserver vs a raw grpcio stream of the same bytes.

    .venv/bin/python benchmarks/bench_transport.py [--mib 256] [--clients 1] [--repeats 2]

Both paths run on loopback in the same session, with 2 MiB chunks, first in plaintext, then both with
TLS (the certificates `fedserver init` makes with fedserver.security.create_tls, for the raw server too):
  fedtune  a fedserver process (fedavg_lora on the tiny model, LoRA rank chosen so the adapter is
           --mib MiB, min_clients = --clients); this process registers that many clients with the
           fedclient library, each pulls its instruction, then each pushes an update of that size,
           one after the other. The first push is timed from the first byte to the server's OK, which
           includes SHA-256 on both ends, writing the payload file and its fsync, the strategy's
           validation and the SQLite commit of the update's metadata.
  raw      a bare grpcio server process with one client-streaming method that appends each chunk into
           a preallocated buffer; the client streams the same bytes.
  disk     the same bytes written to a file beside the run dir and fsync'd (no network): what storing
           the update durably costs on this disk alone.
Reported: throughput of each, the ratio fedtune/raw in plaintext and with TLS (goal >= 0.8 in both) and
fedtune/disk, each server's RSS
increase while receiving as a multiple of the update (goal < 2x), the fedserver's peak RSS over the
whole round (all pushes, aggregation, evaluation, checkpoint, commit) above its RSS once the
instructions went out (goal <= 3x one update), also without file-backed pages (mapped payload
files), and its peak over the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil
import torch

from fedtune.fedserver.security import TlsFiles

BIN = Path(sys.executable).parent
MiB = 1 << 20
CHUNK = 2 * MiB
FLOATS_PER_RANK = 2176  # LoRA floats per unit of rank on builtin:tiny-llama (all-linear targets)
RAW_METHOD = "/bench.Raw/Upload"


class RssSampler:
    """Peak resident memory of a process, sampled every few milliseconds in a thread: all of it, and the
    part that is not file-backed (RSS minus shared pages: the heap, not mapped payload files that the
    kernel can drop and read again)."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self.peak_anonymous = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                info = self.process.memory_info()
            except psutil.Error:
                return
            self.peak = max(self.peak, info.rss)
            self.peak_anonymous = max(self.peak_anonymous, info.rss - info.shared)
            time.sleep(0.005)

    def now(self) -> int:
        return self.process.memory_info().rss

    def now_anonymous(self) -> int:
        info = self.process.memory_info()
        return info.rss - info.shared

    def __enter__(self) -> RssSampler:
        self.peak = self.now()
        self.peak_anonymous = self.now_anonymous()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- raw grpcio baseline ----------------------------------------------------------------------


def raw_server(total: int, port_file: Path, tls: Path | None) -> None:
    """A bare client-streaming method that copies every chunk into one preallocated buffer; with `tls` (a
    run's tls directory), behind that run's server certificate."""
    buffer = bytearray(total)

    def upload(request_iterator, context):
        offset = 0
        for chunk in request_iterator:
            buffer[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        return offset.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler("bench.Raw", {
        "Upload": grpc.stream_unary_rpc_method_handler(upload, request_deserializer=None, response_serializer=None)})
    options = [("grpc.max_receive_message_length", 8 * MiB), ("grpc.max_send_message_length", 8 * MiB)]
    server = grpc.server(futures.ThreadPoolExecutor(4), options=options)
    server.add_generic_rpc_handlers((handler,))
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        files = TlsFiles(tls)
        credentials = grpc.ssl_server_credentials([(files.server_key.read_bytes(), files.server_cert.read_bytes())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    port_file.write_text(str(port))
    server.wait_for_termination()


def bench_raw(payload: bytes, tmp: Path, tls: Path | None) -> dict[str, float]:
    port_file = tmp / "raw.port"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, __file__, "--raw-server", str(len(payload)),
                                "--port-file", str(port_file), *(["--tls", str(tls)] if tls else [])])
    try:
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
        address, options = f"127.0.0.1:{port_file.read_text()}", [("grpc.max_send_message_length", 8 * MiB)]
        channel = (grpc.insecure_channel(address, options=options) if tls is None else grpc.secure_channel(
            address, grpc.ssl_channel_credentials(TlsFiles(tls).ca_cert.read_bytes()), options=options))
        upload = channel.stream_unary(RAW_METHOD, request_serializer=None, response_deserializer=None)
        view = memoryview(payload)
        upload(iter([b"warm-up"]), timeout=60)
        with RssSampler(process.pid) as rss:
            before = rss.now()
            start = time.perf_counter()
            received = upload((bytes(view[i : i + CHUNK]) for i in range(0, len(payload), CHUNK)), timeout=600)
            seconds = time.perf_counter() - start
        assert int.from_bytes(received, "little") == len(payload)
        channel.close()
        return {"seconds": seconds, "rss_increase": rss.peak - before, "rss_peak": rss.peak}
    finally:
        process.kill()


# -- fedclient -> fedserver -------------------------------------------------------------------


def server_config(run_dir: Path, rank: int, port: int, clients: int, tls: bool) -> str:
    return f"""strategy = "fedavg_lora"
rounds = 1
seed = 0
[options]
rank = {rank}
[model]
path = "builtin:tiny-llama"
max_length = 32
[data]
train = "builtin:ops"
max_train_examples = 200
max_eval_examples = 8
[server]
run_dir = "{run_dir}"
host = "127.0.0.1"
port = {port}
insecure = {str(not tls).lower()}
min_clients = {clients}
linger_s = 5
[limits]
max_update_bytes = {4 << 30}
"""


def bench_fedtune(mib: int, clients: int, tmp: Path, tls: bool) -> tuple[dict[str, Any], bytes]:
    """One round of `clients` updates of `mib` MiB (the same tensors from each client), pushed one after
    the other; the first push is the one timed. With `tls`, the server and clients use the run's
    certificates (`fedserver init`); its tls directory is `tmp`/run/tls."""
    from fedtune.fedclient.client import ClientSettings, FederatedClient
    from fedtune.fedclient.connection import ConnectionSettings
    from fedtune.fedserver.cli import main as fedserver_main
    from fedtune.protos import fedtune_pb2 as pb
    from fedtune.protos.payload import tensor_bytes
    from fedtune.strategies.api import ClientUpdate
    from fedtune.tasks.data import load_records

    rank = math.ceil(mib * MiB / 4 / FLOATS_PER_RANK)
    run_dir = tmp / "run"
    fedserver_main(["init", "--run-dir", str(run_dir), "--clients", str(clients)])
    tokens = [line.split("\t")[1].strip() for line in (run_dir / "enrollment-tokens.txt").read_text().splitlines()]
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp / "server.toml").write_text(server_config(run_dir, rank, port, clients, tls))
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in load_records("builtin:ops", 0, 50)))
    server = subprocess.Popen([str(BIN / "fedserver"), "start", "--config", str(tmp / "server.toml")],
                              stdout=(tmp / "server.log").open("w"), stderr=subprocess.STDOUT)
    try:
        with RssSampler(server.pid) as whole_run:
            devices = [FederatedClient(ClientSettings(
                connection=ConnectionSettings(server=f"127.0.0.1:{port}", token=token, insecure=not tls,
                                              ca=TlsFiles(run_dir / "tls").ca_cert if tls else None,
                                              max_message_bytes=16 * MiB, give_up_after_s=300, max_backoff_s=1),
                data=data, state_file=tmp / f"client-{i}.state", name=f"client-{i:03d}"))
                for i, token in enumerate(tokens)]
            for device in devices:
                device.register()
            tensors: dict[str, torch.Tensor] = {}
            for device in devices:
                while True:
                    status, instruction = device.pull()
                    if status.kind == pb.PullStatus.INSTRUCTION:
                        break
                generator = torch.Generator().manual_seed(0)
                tensors = tensors or {name: torch.randn(t.shape, generator=generator)
                                      for name, t in instruction.tensors.items()}
                del instruction
                device.workspace = None  # the bench needs only the connection from here on
            payload_bytes = sum(t.numel() * 4 for t in tensors.values())
            time.sleep(1.0)  # let the server settle after streaming the instructions
            with RssSampler(server.pid) as rss:
                before, before_anonymous = rss.now(), rss.now_anonymous()
                start = time.perf_counter()
                assert devices[0].push(ClientUpdate(client_id=devices[0].client_id, round=1, num_examples=1,
                                                    tensors=tensors))
                seconds = time.perf_counter() - start
                receiving = rss.peak - before
                for device in devices[1:]:
                    assert device.push(ClientUpdate(client_id=device.client_id, round=1, num_examples=1,
                                                    tensors=tensors))
                for device in devices:
                    device.close()
                server.wait(timeout=600)  # the round: aggregation, evaluation, checkpoint, commit
        payload = b"".join(bytes(tensor_bytes(t)) for t in tensors.values())
        assert len(payload) == payload_bytes
        accepted = next(line for line in (tmp / "server.log").read_text().splitlines() if "accepted" in line)
        return {"seconds": seconds, "rss_increase": receiving, "rss_peak": rss.peak, "rss_before": before,
                "round_increase": rss.peak - before, "round_increase_anonymous": rss.peak_anonymous - before_anonymous,
                "rss_peak_whole_run": whole_run.peak, "rank": rank, "server_log": accepted}, payload
    finally:
        if server.poll() is None:
            server.kill()


def bench_disk(payload: bytes, tmp: Path) -> dict[str, float]:
    """The same bytes written in 2 MiB chunks to a file beside the run dir and fsync'd: what storing an
    update durably costs on this disk, with no network and no hashing (a floor for the server)."""
    path = tmp / "disk.bin"
    view = memoryview(payload)
    start = time.perf_counter()
    with path.open("wb") as file:
        for offset in range(0, len(payload), CHUNK):
            file.write(view[offset : offset + CHUNK])
        file.flush()
        os.fsync(file.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return {"seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="update size in MiB")
    parser.add_argument("--clients", type=int, default=1, help="updates in the round (each --mib MiB)")
    parser.add_argument("--repeats", type=int, default=2, help="raw-stream repetitions (best is reported)")
    parser.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tls", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server is not None:
        raw_server(args.raw_server, args.port_file, args.tls)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        runs: dict[str, tuple[dict[str, Any], dict[str, float]]] = {}
        for mode in ("plaintext", "TLS"):
            tmp = Path(tmp_name) / mode
            tmp.mkdir()
            fedtune, payload = bench_fedtune(args.mib, args.clients, tmp, tls=mode == "TLS")
            tls = tmp / "run" / "tls" if mode == "TLS" else None
            raw = min((bench_raw(payload, tmp, tls) for _ in range(args.repeats)), key=lambda r: r["seconds"])
            runs[mode] = fedtune, raw
        disk = min((bench_disk(payload, Path(tmp_name)) for _ in range(args.repeats)), key=lambda r: r["seconds"])
    plain, size = runs["plaintext"][0], len(payload)
    print(f"update: {size / MiB:.1f} MiB (fedavg_lora rank {plain['rank']} on builtin:tiny-llama), "
          f"{math.ceil(size / CHUNK)} chunks of {CHUNK // MiB} MiB, loopback")
    for mode, (fedtune, raw) in runs.items():
        for name, result in ((f"fedclient -> fedserver, {mode}", fedtune), (f"raw grpcio stream, {mode}", raw)):
            print(f"{name:34s} {result['seconds']:7.2f} s  {size / MiB / result['seconds']:8.1f} MiB/s  "
                  f"server RSS +{result['rss_increase'] / MiB:7.1f} MiB while receiving "
                  f"({result['rss_increase'] / size:.2f}x the update), peak {result['rss_peak'] / MiB:.0f} MiB")
    print(f"{'write + fsync, no network':34s} {disk['seconds']:7.2f} s  {size / MiB / disk['seconds']:8.1f} MiB/s")
    for mode, (fedtune, raw) in runs.items():
        print(f"server side, {mode}: {fedtune['server_log'].split('accepted ', 1)[1]}")
        print(f"throughput ratio fedtune/raw, {mode}: {raw['seconds'] / fedtune['seconds']:.2f} (goal >= 0.8); "
              f"fedtune/(write + fsync): {disk['seconds'] / fedtune['seconds']:.2f}")
    print(f"fedserver RSS over the round of {args.clients} update(s) (plaintext), from {plain['rss_before'] / MiB:.0f} "
          f"MiB after the instructions went out: peak +{plain['round_increase'] / MiB:.0f} MiB = "
          f"{plain['round_increase'] / size:.2f}x one update (goal <= 3x); not file-backed: "
          f"+{plain['round_increase_anonymous'] / MiB:.0f} MiB = {plain['round_increase_anonymous'] / size:.2f}x")
    print(f"fedserver peak RSS over the whole run (model, global state, aggregation, checkpoint): "
          f"{plain['rss_peak_whole_run'] / MiB:.0f} MiB = {plain['rss_peak_whole_run'] / size:.2f}x the update")


if __name__ == "__main__":
    main()
