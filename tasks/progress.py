"""Progress of local training, step by step, for whoever runs a strategy's `fit` (fedclient's display).

A strategy's `fit` runs its own local loop (`training.train_steps`, FedKSeed's zeroth-order loop), so
no caller can pass a callback through it without changing every strategy's signature. The loops
report each optimizer step here instead, and a caller that wants to hear of them wraps `fit` in
`observe_steps`. Outside such a block (fedsim, tests) a report costs one context-variable lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

StepObserver = Callable[[int], None]
"""Hears the number of optimizer steps taken so far in the round's local work (1, 2, ...)."""

_observer: ContextVar[StepObserver | None] = ContextVar("fedtune_step_observer", default=None)


@contextmanager
def observe_steps(observer: StepObserver) -> Iterator[None]:
    """Call `observer(steps)` after every local optimizer step taken inside the block (in this thread)."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


def step_taken(steps: int) -> None:
    """For local loops: `steps` optimizer steps are done in this round's work so far."""
    observer = _observer.get()
    if observer is not None:
        observer(steps)
