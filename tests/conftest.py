"""Tests run torch single-threaded: on a shared 2-core machine two threads were several times slower."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from fedtune.tasks.threads import THREAD_VARIABLES

torch.set_num_threads(1)

# Property-based tests (tests/test_fuzz.py): a small budget in the suite; `--hypothesis-profile=fuzz-long` by hand.
_FUZZ_SETTINGS = {"deadline": None,
                  "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}
settings.register_profile("ci", max_examples=150, **_FUZZ_SETTINGS)
settings.register_profile("fuzz-long", max_examples=10_000, **_FUZZ_SETTINGS)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def restored_threads():
    """Whatever a test sets (a CLI's `apply_threads`), the next test starts with the session's torch threads and
    thread variables: one leaked OMP_NUM_THREADS=2 once gave later forked workers two threads, and they hung."""
    threads, environment = torch.get_num_threads(), {name: os.environ.get(name) for name in THREAD_VARIABLES}
    yield
    torch.set_num_threads(threads)
    for name, value in environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
