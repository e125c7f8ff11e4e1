"""A local Ray cluster of separate processes on this machine: a head node and worker nodes, as `ray start` makes them.

Each node is one `ray start --block` in a process group of its own (its GCS, raylet and worker
processes join that group) with its own temporary directory and explicit ports, so two clusters
on one machine never collide. `LocalRayCluster.__exit__` ends this cluster's process groups, then
anything still running from its directory, and nothing else: `ray stop` would end every Ray
instance on the machine (another user's, or another test's Flower simulation).
Used by tests/test_ray_backend.py and benchmarks/bench_ray.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType

import psutil

RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count: int) -> list[int]:
    """`count` TCP ports nothing listens on now."""
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("127.0.0.1", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


class LocalRayCluster:
    """`nodes` Ray nodes (the first the head) of `cpus` CPUs each; `address` is the head's HOST:PORT."""

    def __init__(self, nodes: int = 2, cpus: int = 1, object_store_mb: int = 200, timeout_s: float = 120):
        self.root = Path(tempfile.mkdtemp(prefix="fedray", dir="/tmp"))  # short: Ray's socket paths live under it
        self.options = ["--num-cpus", str(cpus), "--object-store-memory", str(object_store_mb * 2**20),
                        "--disable-usage-stats", "--block", "--node-ip-address", "127.0.0.1"]
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        port, client_port = free_ports(2)
        self.address = f"127.0.0.1:{port}"
        try:
            self._start("head", ["--head", "--port", str(port), "--ray-client-server-port", str(client_port),
                                 "--include-dashboard=false"])
            deadline = time.monotonic() + timeout_s
            while not self._listening(port):
                self._check_running()
                assert time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(0.5)
            for index in range(1, nodes):
                self._start(f"worker-{index}", ["--address", self.address])
            while self.alive_nodes() < nodes:
                self._check_running()
                assert time.monotonic() < deadline, "the Ray worker nodes did not join"
                time.sleep(1)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, first: list[str]) -> None:
        node_manager, object_manager, agent_listen, agent_grpc, metrics = free_ports(5)
        command = [RAY, "start", *first, "--temp-dir", str(self.root / name),
                   "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
                   "--dashboard-agent-listen-port", str(agent_listen), "--dashboard-agent-grpc-port", str(agent_grpc),
                   "--metrics-export-port", str(metrics), *self.options]
        self.logs.append(self.root / f"{name}.log")
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        with self.logs[-1].open("wb") as log:
            self.processes.append(subprocess.Popen(command, start_new_session=True, stdout=log,
                                                   stderr=subprocess.STDOUT, env=environment))

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    def _check_running(self) -> None:
        for process, log in zip(self.processes, self.logs, strict=True):
            assert process.poll() is None, f"a Ray node exited:\n{log.read_text()[-3000:]}"

    def alive_nodes(self) -> int:
        """Nodes the head counts alive, asked as a driver would."""
        import ray

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Ray's tip on num_gpus=0, for users of GPUs
            ray.init(address=self.address, logging_level="WARNING")
        try:
            return sum(node["Alive"] for node in ray.nodes())
        finally:
            ray.shutdown()

    def stop(self) -> None:
        """End this cluster's processes only: its nodes' process groups, then any straggler started from its
        directory; then remove the directory."""
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        deadline = time.monotonic() + 10
        while stragglers := [process for process in psutil.process_iter(["cmdline"])
                             if str(self.root) in " ".join(process.info["cmdline"] or [])]:
            for straggler in stragglers:
                try:
                    straggler.kill() if time.monotonic() > deadline else straggler.terminate()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
