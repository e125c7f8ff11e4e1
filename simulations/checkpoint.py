"""fedsim's checkpoint: what `fedsim run --resume` needs to continue an interrupted run after its last completed round.

After every synchronous round fedsim writes `<out>/checkpoint.pt` atomically (a temporary file, fsync,
rename: a kill at any moment leaves the previous checkpoint or the new one, never half of one). It
holds the resolved config, the round, the server strategy's and every client strategy's state (from
the workers or Ray actors that own them), the simulated clock, the retired clients, the global
random generators and the metrics rows so far. Everything else a round uses is derived from the seed
and the round number (sampling, batches, channel noise, device classes), so a resumed run computes
what the unbroken run computes, bit for bit.

Asynchronous rounds are not checkpointed: work in flight on the simulated clock (instructions handed
out, updates not yet arrived) would have to be saved too, and `--resume` refuses them.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict

from fedtune.simulations.config import ConfigError, SimulationConfig
from fedtune.simulations.workers import ClientPool

if TYPE_CHECKING:  # the runner imports this module
    from fedtune.simulations.runner import Federation

CHECKPOINT_FILE = "checkpoint.pt"
OUTPUT_ONLY = frozenset({"tracking", "ray_address"})
"""Config fields a resumed run may change: where metrics go, and where the Ray cluster's head now is. Any other
(even `workers`, `threads` or `backend`, which change how torch splits its sums) could change the result."""


class Checkpoint(BaseModel):
    """The state of a simulated run after round `round`."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    config: dict[str, Any]  # SimulationConfig as JSON
    round: int
    server: dict[str, Any]
    clients: dict[str, dict[str, Any]]
    now: float
    retired: list[str]
    rows: list[dict[str, Any]]  # metrics.jsonl up to `round`
    torch_rng: torch.Tensor
    python_rng: tuple[Any, ...]

    def differing_fields(self, config: SimulationConfig) -> list[str]:
        """Dotted names of the fields where `config` differs from the checkpointed run's (output-only ones aside)."""
        wanted = {key: value for key, value in stored_config(config).items() if key not in OUTPUT_ONLY}
        stored = {key: value for key, value in self.config.items() if key not in OUTPUT_ONLY}
        return differences(stored, wanted)


def stored_config(config: SimulationConfig) -> dict[str, Any]:
    """The config as the checkpoint keeps it: JSON that validates back to the same config (aliases kept)."""
    return config.model_dump(mode="json", by_alias=True)


def resumable(config: SimulationConfig, out_dir: Path) -> Checkpoint:
    """The checkpoint in `out_dir`, if `config` may continue it; otherwise a ConfigError saying why not."""
    if config.asynchronous_mode() is not None:
        raise ConfigError("--resume: asynchronous rounds ([asynchronous]) are not checkpointed (their work in flight "
                          "on the simulated clock is not saved); run them again without --resume")
    checkpoint = load_checkpoint(out_dir)
    differing = checkpoint.differing_fields(config)
    if differing:
        raise ConfigError(f"--resume: the config's {', '.join(differing)} differ from the interrupted run's "
                          f"(in {out_dir / CHECKPOINT_FILE}); a resumed run must keep them")
    return checkpoint


def differences(first: Mapping[str, Any], second: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted paths at which two nested dicts hold different values, sorted."""
    paths = []
    for key in sorted({*first, *second}):
        left, right = first.get(key), second.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            paths.extend(differences(left, right, f"{prefix}{key}."))
        elif left != right:
            paths.append(f"{prefix}{key}")
    return paths


def take_checkpoint(federation: Federation, pool: ClientPool | None, round: int,
                    rows: Sequence[dict[str, Any]]) -> Checkpoint:
    """The run's state now, right after `round` completed."""
    clients = pool.client_states() if pool is not None else {
        cid: client.state_dict() for cid, client in federation.clients.items()}
    return Checkpoint(config=stored_config(federation.config), round=round,
                      server=federation.server.state_dict(), clients=clients, now=federation.now,
                      retired=sorted(federation.retired), rows=list(rows), torch_rng=torch.get_rng_state(),
                      python_rng=random.getstate())


def save_checkpoint(out_dir: Path, checkpoint: Checkpoint) -> None:
    """Replace `<out>/checkpoint.pt` atomically."""
    buffer = io.BytesIO()
    torch.save({name: getattr(checkpoint, name) for name in Checkpoint.model_fields}, buffer)
    staging = out_dir / f".{CHECKPOINT_FILE}.tmp"
    with staging.open("wb") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, out_dir / CHECKPOINT_FILE)


def load_checkpoint(out_dir: Path) -> Checkpoint:
    path = out_dir / CHECKPOINT_FILE
    if not path.exists():
        raise ConfigError(f"--resume: no checkpoint in {out_dir} (fedsim writes {CHECKPOINT_FILE} after each "
                          "completed round); nothing to resume")
    return Checkpoint(**torch.load(path, weights_only=True))


def restore(federation: Federation, checkpoint: Checkpoint) -> None:
    """Put the checkpointed state into a freshly built federation (before any worker is forked from it)."""
    federation.server.load_state_dict(checkpoint.server)
    for client_id, state in checkpoint.clients.items():
        federation.clients[client_id].load_state_dict(state)
    federation.now = checkpoint.now
    federation.retired = set(checkpoint.retired)
    torch.set_rng_state(checkpoint.torch_rng)
    random.setstate(checkpoint.python_rng)
