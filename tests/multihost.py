"""Several hosts on one Linux machine: one network namespace per host, joined by a bridge.

Loopback tests cannot cut one client's cable, slow one device's uplink or make a host vanish
without a goodbye; separate network stacks can. Each host gets its own namespace with `lo`, one
interface `eth0` (an address in 10.77.0.0/24) and an /etc/hosts naming every host, so a client
reaches `server:PORT` by name as a compose service would. The bridge lives in a namespace of its
own, so the machine's root namespace never sees a link of ours, and two runs (or a crashed one)
cannot collide: every namespace name carries a random suffix. Needs root (`ip netns`, `tc`).

Processes start with `ip netns exec`, each in a session of its own, so killing a host kills
everything it ran (a `sh -c` wrapper's children too). `Network.__exit__` kills every process and
removes every namespace and /etc/netns entry it made, whatever happened in the test.

A compose file's services run here unchanged (`compose_services`, `Network.up`): each
service is the host of the same name, its volumes are directories under a stand-in for the
compose directory, and its command's container paths are rewritten to those directories.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

BIN = Path(sys.executable).parent  # the venv's fedserver and fedclient, first on every host's PATH
# What the image sets (deploy/Dockerfile), plus one torch thread: the machine's cores are shared
HOST_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
SUBNET = "10.77.0"
INTERFACE = "eth0"
NETNS_ETC = Path("/etc/netns")


def checked(command: Sequence[str]) -> None:
    """Run a setup command; its stderr becomes the error, so a failed setup says why."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(command)}: {done.stderr.strip()}")


def ip(*args: str) -> None:
    checked(["ip", *args])


@dataclass
class Host:
    name: str  # the host name the others resolve, e.g. `server`
    namespace: str
    address: str
    port: str  # its veth end in the bridge namespace: down = cable cut
    processes: list[subprocess.Popen] = field(default_factory=list)
    removed: bool = False


class Network:
    """A bridge and one namespace per host name; use as a context manager (cleanup in `__exit__`)."""

    def __init__(self, names: Sequence[str]):
        assert len(set(names)) == len(names) < 250, names
        self.suffix = secrets.token_hex(3)
        self.bridge = f"fth-{self.suffix}"  # no host's namespace (fth-SUFFIX-NAME) can take its name
        self.hosts = {name: Host(name, f"fth-{self.suffix}-{name}", f"{SUBNET}.{index + 1}", f"h{index}")
                      for index, name in enumerate(names)}
        self.env = {**os.environ, **HOST_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self._namespaces: list[str] = []  # made so far, for cleanup

    def __enter__(self) -> Network:
        try:
            self._add_namespace(self.bridge)
            ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            ip("-n", self.bridge, "link", "set", "br0", "up")
            hosts_file = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
                f"{host.address} {host.name}\n" for host in self.hosts.values())
            for host in self.hosts.values():
                self._add_namespace(host.namespace)
                (NETNS_ETC / host.namespace).mkdir(parents=True)
                (NETNS_ETC / host.namespace / "hosts").write_text(hosts_file)
                ip("-n", self.bridge, "link", "add", host.port, "type", "veth", "peer", "name", INTERFACE,
                   "netns", host.namespace)
                ip("-n", self.bridge, "link", "set", host.port, "master", "br0", "up")
                ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", INTERFACE)
                ip("-n", host.namespace, "link", "set", INTERFACE, "up")
                ip("-n", host.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _add_namespace(self, namespace: str) -> None:
        ip("netns", "add", namespace)
        self._namespaces.append(namespace)

    def close(self) -> None:
        """Kill every process, then remove every namespace (their links go with them) and /etc/netns entry."""
        for host in self.hosts.values():
            self._kill(host)
        failures = []
        for namespace in reversed(self._namespaces):
            self._kill_remaining(namespace)
            done = subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, text=True)
            if done.returncode and Path("/run/netns", namespace).exists():
                failures.append(f"{namespace}: {done.stderr.strip()}")
            shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)
        self._namespaces.clear()
        if failures:
            raise RuntimeError(f"namespaces left behind: {failures}")

    @staticmethod
    def _kill(host: Host) -> None:
        """SIGKILL each process's whole session (a `sh -c` and its children), then reap it."""
        for process in host.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()

    @staticmethod
    def _kill_remaining(namespace: str) -> None:
        """Anything still in the namespace was started by us (e.g. a process that left its session)."""
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def host(self, name: str) -> Host:
        host = self.hosts[name]
        assert not host.removed, f"host {name} was removed"
        return host

    def run(self, name: str, command: Sequence[str], log: Path) -> subprocess.Popen:
        """Start `command` on host `name`, its output appended to `log`."""
        host = self.host(name)
        with log.open("a") as output:
            process = subprocess.Popen(["ip", "netns", "exec", host.namespace, *command], stdout=output,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                       start_new_session=True)
        host.processes.append(process)
        return process

    def exec(self, name: str, command: Sequence[str]) -> str:
        """Run a short command on host `name` and return its output (e.g. to check name resolution)."""
        done = subprocess.run(["ip", "netns", "exec", self.host(name).namespace, *command], capture_output=True,
                              text=True, env=self.env, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(command)} on {name}: {done.stdout}{done.stderr}")
        return done.stdout

    def kill(self, name: str) -> None:
        """SIGKILL everything running on host `name` (the host stays, e.g. for a restart)."""
        self._kill(self.host(name))

    def cut(self, name: str) -> None:
        """Pull host `name`'s cable: its packets, both ways, go nowhere; neither side is told."""
        ip("-n", self.bridge, "link", "set", self.host(name).port, "down")

    def restore(self, name: str) -> None:
        ip("-n", self.bridge, "link", "set", self.host(name).port, "up")

    def shape(self, name: str, rate: str = "1mbit") -> None:
        """Limit host `name`'s uplink (its eth0's egress) to `rate` with a token bucket."""
        checked(["tc", "-n", self.host(name).namespace, "qdisc", "add", "dev", INTERFACE, "root", "tbf", "rate", rate,
                 "burst", "32kbit", "latency", "400ms"])

    def remove(self, name: str) -> None:
        """Host `name` vanishes mid-conversation: cable cut first (no FIN or RST escapes), then its
        processes killed and its namespace deleted."""
        host = self.host(name)
        self.cut(name)
        self._kill(host)
        ip("netns", "delete", host.namespace)
        self._namespaces.remove(host.namespace)
        shutil.rmtree(NETNS_ETC / host.namespace, ignore_errors=True)
        host.removed = True

    def up(self, services: dict[str, ComposeService], compose_dir: Path, logs: Path,
           timeout: float = 300) -> dict[str, subprocess.Popen]:
        """Start each service's command on the host of its name, as `docker compose up` orders them: after
        the services it depends on, and once those it needs completed (service_completed_successfully)
        have exited 0. Health checks are not run: a dependency counts as healthy once started."""
        started: dict[str, subprocess.Popen] = {}

        def start(name: str) -> None:
            if name in started:
                return
            for dependency, condition in services[name].depends_on.items():
                start(dependency)
                if condition == "service_completed_successfully" and started[dependency].wait(timeout):
                    raise RuntimeError(f"service {dependency} failed: {(logs / f'{dependency}.log').read_text()}")
            started[name] = self.run(name, services[name].host_command(compose_dir), logs / f"{name}.log")

        for name in services:
            start(name)
        return started


# -- compose services -----------------------------------------------------------------------


@dataclass(frozen=True)
class ComposeService:
    name: str
    command: list[str]
    volumes: dict[str, str]  # container path -> source: a path relative to the compose file, or VOLUME[/SUBPATH]
    depends_on: dict[str, str]  # service -> condition (service_started, service_healthy, ...)

    def mounts(self, compose_dir: Path) -> dict[str, Path]:
        """Where each container path lives on this machine: bind sources under `compose_dir` (standing in
        for the compose file's directory), named volumes in `compose_dir/volumes/NAME` (created), and the
        container's own /tmp in `compose_dir/containers/SERVICE/tmp` (created: no host shares it)."""
        mounts = {"/tmp": compose_dir / "containers" / self.name / "tmp"}
        mounts["/tmp"].mkdir(parents=True, exist_ok=True)
        for target, source in self.volumes.items():
            if source.startswith(("/", "~")):
                raise ValueError(f"service {self.name}: bind source {source} is outside the compose directory")
            if source.startswith("."):
                mounts[target] = compose_dir / source
            else:
                (compose_dir / "volumes" / source.split("/")[0]).mkdir(parents=True, exist_ok=True)
                mounts[target] = compose_dir / "volumes" / source
        return mounts

    def host_command(self, compose_dir: Path) -> list[str]:
        """The command with every container path (a mount target, or a path below one) replaced by its place
        on this machine; a path starts at the beginning of an argument or after a space, `=` or quote."""
        places = {target: str(place.resolve()) for target, place in self.mounts(compose_dir).items()}
        targets = "|".join(re.escape(target) for target in sorted(places, key=len, reverse=True))
        pattern = re.compile(rf"(?<![^\s='\"])({targets})(?=[/\s'\"]|$)")
        return [pattern.sub(lambda match: places[match.group(1)], arg) for arg in self.command]


def compose_services(path: Path) -> dict[str, ComposeService]:
    """Every service of a compose file, by name (= its host name), in the file's order."""
    document = yaml.safe_load(path.read_text())
    services = {}
    for name, spec in document["services"].items():
        if "command" not in spec:
            raise ValueError(f"{path}: service {name} has no command (the image's default is not known here)")
        command = spec["command"]
        arguments = shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]
        depends_on = spec.get("depends_on", {})
        services[name] = ComposeService(
            name, [_interpolated(arg) for arg in arguments], dict(_volume(entry) for entry in spec.get("volumes", [])),
            dict.fromkeys(depends_on, "service_started") if isinstance(depends_on, list)
            else {service: condition.get("condition", "service_started") for service, condition in depends_on.items()})
    return services


def _interpolated(value: str) -> str:
    """Compose's interpolation: `$$` is a literal `$`; variables are not supported here (no .env to read)."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) != "$$":
            raise ValueError(f"compose variable {match.group(0)} in {value!r}: the harness does not interpolate")
        return "$"
    return re.sub(r"\$(\$|\{[^}]*\}|\w+)", replace, value)


def _volume(entry: str | dict[str, Any]) -> tuple[str, str]:
    """(target, source) of a volume in short (`SRC:DST[:MODE]`) or long syntax (a named volume's subpath
    appended to its source)."""
    if isinstance(entry, dict):
        subpath = entry.get("volume", {}).get("subpath")
        return entry["target"], f"{entry['source']}/{subpath}" if subpath else entry["source"]
    source, target, *_ = entry.split(":")
    return target, source
