"""How many CPU threads torch uses in a process, chosen so that the processes of one machine never oversubscribe it.

torch's default is one thread per core in every process. fedsim's workers, or a fedclient beside
other work, then run more threads than there are cores, and on a busy machine a step waits for its
slowest thread: rounds ran 7–20× slower than with one thread per process (issue 15). Each command
sets its count once, at start-up, before torch does any work (`apply_threads`).
"""

from __future__ import annotations

import os

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(processes: int = 1) -> int:
    """Threads per process when none is configured: OMP_NUM_THREADS when set (the variable torch itself reads),
    else this machine's cores shared by `processes` processes: cores ÷ processes, at least one."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, available_cores() // processes)


def apply_threads(threads: int) -> None:
    """Use `threads` torch threads in this process (intra-op, and inter-op while torch still allows it) and in
    any process started from it (OMP_NUM_THREADS, MKL_NUM_THREADS)."""
    import torch

    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # torch allows it once, before any inter-op work (e.g. in a forked worker: never)
        pass
