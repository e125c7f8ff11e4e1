"""Peak memory of a whole process tree (a command and every process it starts), sampled with psutil.

PSS (proportional set size) charges each shared page to its sharers in equal parts, so the PSS
of a tree counts copy-on-write pages shared by forked workers once; RSS counts them in every
process. But PSS also divides a shared library's pages with every *other* process on the machine
that maps the same file (other users of the same venv's libtorch), which flatters a run that uses
a busy venv. So the monitor also counts the tree's distinct physical pages (page frame numbers
from /proc/PID/pagemap, readable by root): every page any process of the tree maps, once.
Sampling misses peaks shorter than the interval, so all numbers are lower bounds.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

MB = 2**20
PAGE = 4096
PFN_MASK = np.uint64((1 << 55) - 1)


@dataclass
class TreePeak:
    """Peaks over the samples of one run (MB), its wall time and the CPU time its processes used
    (s; user + system as last sampled, so a process's final fraction of a second is missed)."""

    pss_mb: float = 0.0
    rss_mb: float = 0.0
    unique_mb: float | None = None  # distinct physical pages of the tree; None without root
    processes: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


class TreeMonitor:
    """A thread that samples the PSS and RSS summed over `pid` and all its descendants."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = TreePeak()
        self._cpu_by_process: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample_until_stopped(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        pss = rss = 0
        counted = 0
        frames: list[np.ndarray] = []
        for process in processes:
            try:
                info = process.memory_full_info()
                times = process.cpu_times()
                self._cpu_by_process[(process.pid, process.create_time())] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            pss += info.pss
            rss += info.rss
            counted += 1
            frames.append(resident_frames(process.pid))
        self.peak.pss_mb = max(self.peak.pss_mb, pss / MB)
        self.peak.rss_mb = max(self.peak.rss_mb, rss / MB)
        self.peak.processes = max(self.peak.processes, counted)
        self.peak.cpu_s = sum(self._cpu_by_process.values())
        pages = np.unique(np.concatenate(frames)) if frames else np.empty(0, dtype=np.uint64)
        if pages.size and pages[-1] != 0:  # all-zero frame numbers: not root, pagemap hides them
            self.peak.unique_mb = max(self.peak.unique_mb or 0.0, pages.size * PAGE / MB)


def resident_frames(pid: int) -> np.ndarray:
    """Physical frame numbers of the pages resident in `pid`'s address space."""
    ranges: list[tuple[int, int]] = []
    start = end = 0
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                field = line.split(None, 2)
                if "-" in field[0] and not field[0].endswith(":"):
                    start, end = (int(x, 16) for x in field[0].split("-"))
                elif field[0] == "Rss:" and field[1] != "0":
                    ranges.append((start, end))
        chunks = []
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for start, end in ranges:
                pagemap.seek(start // PAGE * 8)
                entries = np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype=np.uint64)
                chunks.append(entries[(entries >> np.uint64(63)) == 1] & PFN_MASK)
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return np.empty(0, dtype=np.uint64)
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint64)


def run_measured(command: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, timeout_s: float = 900) -> TreePeak:
    """Run `command` to completion (output to `log_path`) while sampling its tree's memory."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        with TreeMonitor(process.pid) as monitor:
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                raise RuntimeError(f"{command[0]} ran past {timeout_s:.0f} s; see {log_path}") from None
    monitor.peak.wall_s = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}; see {log_path}:\n{log_path.read_text()[-3000:]}")
    return monitor.peak
