"""Peak memory of a whole process tree (a command and every process it starts), sampled with psutil.

PSS (proportional set size) charges each shared page to its sharers in equal parts, so the PSS
of a tree counts copy-on-write pages shared by forked workers once; RSS counts them in every
process. Sampling misses peaks shorter than the interval, so the numbers are lower bounds.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

MB = 2**20


@dataclass
class TreePeak:
    """Peaks over the samples of one run (MB) and the run's wall time (s)."""

    pss_mb: float = 0.0
    rss_mb: float = 0.0
    processes: int = 0
    wall_s: float = 0.0


class TreeMonitor:
    """A thread that samples the PSS and RSS summed over `pid` and all its descendants."""

    def __init__(self, pid: int, interval_s: float = 0.25):
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = TreePeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> "TreeMonitor":
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
        for process in processes:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            pss += info.pss
            rss += info.rss
            counted += 1
        self.peak.pss_mb = max(self.peak.pss_mb, pss / MB)
        self.peak.rss_mb = max(self.peak.rss_mb, rss / MB)
        self.peak.processes = max(self.peak.processes, counted)


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
