"""Whether a run dir's server process is alive: a lock it holds for its whole life, and a heartbeat.

`fedserver start` takes an exclusive `flock` on `<run_dir>/server.lock` and holds it until the process
ends. The kernel releases it however the process ends (exit, crash, SIGKILL, power loss), so
`fedserver status` tells a live server from a dead one without trusting anything the dead one wrote
(the SQLite state still says "running" after a kill). The file also holds the server's pid and start
time, and a thread touches it every few seconds: its modification time is when the server was last
seen alive. A second `fedserver start` on the same run dir is refused while the lock is held.

`flock` is advisory and per host: `status` must run on the server's machine (or on a file system that
carries flock, which local disks do and some network file systems do not).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

LOCK_FILE = "server.lock"
HEARTBEAT_S = 2.0
ACQUIRE_TRIES = 20  # a concurrent `status` holds a shared lock for an instant: retry before calling it taken


class ServerRunning(RuntimeError):
    """Another live process holds the run dir's server lock."""


@dataclass(frozen=True)
class Liveness:
    """What the run dir says about its server process right now."""

    alive: bool
    pid: int | None = None
    started: float | None = None  # epoch seconds
    last_seen: float | None = None  # epoch seconds of the last heartbeat; None: no server ever held the lock


class ServerLock:
    """Held by a serving process for its lifetime: the exclusive lock plus the heartbeat thread."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S):
        self.path = run_dir / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self._descriptor: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> ServerLock:
        """Take the lock (ServerRunning if a live process holds it), record this process, start the heartbeat."""
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(ACQUIRE_TRIES):
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == ACQUIRE_TRIES - 1:
                    os.close(descriptor)
                    holder = probe(self.path.parent)
                    raise ServerRunning(f"{self.path.parent}: another fedserver (pid {holder.pid}) is serving this "
                                        "run dir; stop it first, or use another run dir") from None
                time.sleep(0.05)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps({"pid": os.getpid(), "started": time.time()}).encode(), 0)
        self._descriptor = descriptor
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="liveness-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat, stamp the last-seen time and let the lock go; nothing to do when not held."""
        if self._descriptor is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        os.utime(self._descriptor)
        os.close(self._descriptor)  # releases the lock
        self._descriptor = None

    def _beat(self) -> None:
        assert self._descriptor is not None
        while not self._stop.wait(self.heartbeat_s):
            os.utime(self._descriptor)

    def __enter__(self) -> ServerLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def probe(run_dir: Path) -> Liveness:
    """Is a server holding `run_dir`'s lock now, and when was one last seen? Never blocks."""
    try:
        descriptor = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return Liveness(alive=False)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            alive = False
        except BlockingIOError:
            alive = True
        raw = os.pread(descriptor, 4096, 0)
        last_seen = os.fstat(descriptor).st_mtime
    finally:
        os.close(descriptor)
    try:
        record = json.loads(raw)
    except ValueError:  # the lock was taken but its record not yet written
        record = {}
    return Liveness(alive=alive, pid=record.get("pid"), started=record.get("started"), last_seen=last_seen)
