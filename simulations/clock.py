"""fedsim's device clock: how long each virtual client's round takes on its simulated device, and when it is online.

A virtual client belongs to a device class (`[devices.classes.NAME]`: its share of the clients,
relative speed, link bandwidth and latency, and the profile it registers with) or is described one
by one (`[devices.clients.ID]`). A trace file (`devices.trace`, CSV with columns
client, online_from, online_to[, speed]) gives availability windows in simulated seconds; a client
absent from the trace is always online, and a window's speed overrides its class's speed.

Simulated time of one client's work, started at t:
    2·latency + bytes_down·8 / downlink + local_steps · step_seconds / speed + bytes_up·8 / uplink
with the bytes of the encoded messages and the steps the client reported (`local_steps` metric).
A client whose work would end after its window closes goes offline mid-round: its update never
arrives. Everything is deterministic: no wall clock is read.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from fedtune.strategies.definition import DeviceProfile
from fedtune.tasks.config import StrictModel

DEFAULT_CLASS = "default"


class DeviceSpec(StrictModel):
    """What a simulated device is; None = inherited (client <- its class <- the defaults below)."""

    speed: float | None = Field(None, gt=0, description="Compute speed relative to the reference device (1.0).")
    uplink_mbps: float | None = Field(None, gt=0, description="Upload bandwidth; None = unlimited.")
    downlink_mbps: float | None = Field(None, gt=0, description="Download bandwidth; None = unlimited.")
    latency_ms: float | None = Field(None, ge=0, description="One-way latency of each message.")
    memory_mb: int | None = Field(None, ge=0, description="Reported in the device profile; 0 = unknown.")
    compute_class: str | None = Field(None, description="Reported in the profile; default: the class name.")
    codecs: tuple[str, ...] | None = Field(None, description="Codecs it can encode; default: every codec.")


class DeviceClass(DeviceSpec):
    """`[devices.classes.NAME]`: a kind of device and the share of virtual clients that are one."""

    share: float = Field(gt=0, le=1, description="Fraction of the virtual clients in this class.")


class ClientDevice(DeviceSpec):
    """`[devices.clients.ID]`: one virtual client's device: a class by name, and/or its own fields."""

    device_class: str | None = Field(None, alias="class", description="A class of [devices.classes].")


class DevicesConfig(StrictModel):
    """The `[devices]` section of a fedsim config."""

    step_seconds: float = Field(1.0, gt=0, description="Simulated seconds one local step takes at speed 1.0.")
    classes: dict[str, DeviceClass] = Field(default_factory=dict)
    clients: dict[str, ClientDevice] = Field(default_factory=dict)
    trace: str | None = Field(None, description="CSV: client, online_from, online_to[, speed] (simulated seconds).")

    @model_validator(mode="after")
    def _consistent(self) -> DevicesConfig:
        total = sum(device_class.share for device_class in self.classes.values())
        if total > 1 + 1e-9:
            raise ValueError(f"devices.classes: the shares add up to {total:g}, more than 1")
        for client_id, device in self.clients.items():
            if device.device_class is not None and device.device_class not in self.classes:
                raise ValueError(f"devices.clients.{client_id}.class: unknown class {device.device_class!r}; "
                                 f"defined: {sorted(self.classes)}")
        return self


@dataclass(frozen=True)
class Device:
    """One virtual client's resolved device."""

    device_class: str
    speed: float
    uplink_mbps: float | None
    downlink_mbps: float | None
    latency_s: float
    profile: DeviceProfile


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    speed: float | None


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the file, the row and the field."""


def read_trace(path: str, client_ids: Sequence[str]) -> dict[str, list[Window]]:
    """Availability windows per client, sorted and checked (start < end, no overlap, known clients)."""
    windows: dict[str, list[Window]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError as error:
        raise TraceError(f"devices.trace: {path}: no such file") from error
    if not rows or not {"client", "online_from", "online_to"} <= set(rows[0]):
        raise TraceError(f"devices.trace: {path}: needs the columns client, online_from, online_to[, speed]")
    for number, row in enumerate(rows, start=2):
        where = f"devices.trace: {path} line {number}"
        client = row["client"]
        if client not in client_ids:
            raise TraceError(f"{where}: unknown client {client!r}; this run's clients are {sorted(client_ids)}")
        try:
            start, end = float(row["online_from"]), float(row["online_to"] or math.inf)
            speed = float(row["speed"]) if row.get("speed") else None
        except ValueError as error:
            raise TraceError(f"{where}: {error}") from error
        if not (0 <= start < end) or (speed is not None and not speed > 0):
            raise TraceError(f"{where}: needs 0 <= online_from < online_to and speed > 0")
        windows.setdefault(client, []).append(Window(start, end, speed))
    for client, spans in windows.items():
        spans.sort(key=lambda window: window.start)
        for before, after in zip(spans, spans[1:], strict=False):
            if after.start < before.end:
                raise TraceError(f"devices.trace: {path}: windows of {client!r} overlap at {after.start:g}")
    return windows


def assign_classes(config: DevicesConfig, client_ids: Sequence[str], seed: int) -> dict[str, str]:
    """Each client's class: its own `class`, else by share over the others in a seeded order
    (largest remainder, so 10 clients at 0.5/0.3/0.2 are exactly 5/3/2); the rest are `default`."""
    assigned = {cid: device.device_class for cid, device in config.clients.items() if device.device_class}
    free = [cid for cid in sorted(client_ids) if cid not in assigned]
    random.Random(f"{seed}:devices").shuffle(free)
    quotas = {name: device_class.share * len(free) for name, device_class in config.classes.items()}
    counts = {name: math.floor(quota) for name, quota in quotas.items()}
    spare = min(len(free), round(sum(quotas.values()))) - sum(counts.values())
    for name in sorted(quotas, key=lambda name: counts[name] - quotas[name])[:spare]:
        counts[name] += 1
    position = 0
    for name in config.classes:
        for cid in free[position:position + counts[name]]:
            assigned[cid] = name
        position += counts[name]
    return {cid: assigned.get(cid, DEFAULT_CLASS) for cid in client_ids}


class DeviceClock:
    """Simulated durations and availability of fedsim's virtual clients."""

    def __init__(self, config: DevicesConfig, client_ids: Sequence[str], seed: int):
        unknown = sorted(set(config.clients) - set(client_ids))
        if unknown:
            raise ValueError(f"devices.clients: unknown client id(s) {unknown}; this run's clients are "
                             f"{sorted(client_ids)}")
        self.step_seconds = config.step_seconds
        classes = assign_classes(config, client_ids, seed)
        self.devices = {cid: self._resolve(config, cid, classes[cid]) for cid in client_ids}
        self.windows = read_trace(config.trace, client_ids) if config.trace else {}

    @staticmethod
    def _resolve(config: DevicesConfig, client_id: str, class_name: str) -> Device:
        """The client's own fields over its class's over the defaults."""
        from fedtune.strategies.codecs import SUPPORTED_CODECS  # imports torch: not while a config is checked

        spec = DeviceSpec()
        for layer in (config.classes.get(class_name), config.clients.get(client_id)):
            if layer is not None:
                own = layer.model_dump(exclude_none=True, exclude={"share", "device_class"})
                spec = spec.model_copy(update=own)
        profile = DeviceProfile(memory_mb=spec.memory_mb or 0, compute_class=spec.compute_class or class_name,
                                codecs=spec.codecs or SUPPORTED_CODECS)
        return Device(device_class=class_name, speed=spec.speed or 1.0, uplink_mbps=spec.uplink_mbps,
                      downlink_mbps=spec.downlink_mbps, latency_s=(spec.latency_ms or 0.0) / 1000, profile=profile)

    def _window(self, client_id: str, t: float) -> Window | None:
        """The trace window holding `t` (None: offline); clients without a trace are always online."""
        spans = self.windows.get(client_id)
        if spans is None:
            return Window(0.0, math.inf, None)
        index = bisect.bisect_right([span.start for span in spans], t) - 1
        return spans[index] if index >= 0 and t < spans[index].end else None

    def online(self, client_id: str, t: float) -> bool:
        return self._window(client_id, t) is not None

    def online_until(self, client_id: str, t: float) -> float:
        """When the window holding `t` closes (the client goes offline); `t` itself when offline."""
        window = self._window(client_id, t)
        return window.end if window else t

    def next_online(self, client_id: str, t: float) -> float | None:
        """The earliest time >= t at which the client is online; None if never again."""
        if self.online(client_id, t):
            return t
        later = [span.start for span in self.windows.get(client_id, []) if span.start > t]
        return min(later) if later else None

    def work_seconds(self, client_id: str, t: float, steps: float, bytes_down: int, bytes_up: int) -> float:
        """Simulated seconds from sending the instruction at `t` to receiving the update (module docstring)."""
        device = self.devices[client_id]
        window = self._window(client_id, t)
        speed = window.speed if window and window.speed else device.speed
        return (2 * device.latency_s + _transfer_s(bytes_down, device.downlink_mbps)
                + steps * self.step_seconds / speed + _transfer_s(bytes_up, device.uplink_mbps))


def _transfer_s(size: int, mbps: float | None) -> float:
    return 0.0 if mbps is None else size * 8 / (mbps * 1e6)


def trace_path(config: DevicesConfig, base_dir: Path | None) -> DevicesConfig:
    """The trace file is relative to the config file, like the data files."""
    if config.trace is None or base_dir is None or Path(config.trace).is_absolute():
        return config
    return config.model_copy(update={"trace": str((base_dir / config.trace).resolve())})
