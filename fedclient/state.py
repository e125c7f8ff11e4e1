"""The client's local state file: identity, strategy state and a not-yet-acknowledged update.

Written atomically (temp file + rename, mode 0600: it holds the token) after every step that
changes it, so a client killed at any point restarts as the same client, with the same strategy
state, and re-sends (rather than recomputes) an update the server may not have received.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.strategies.api import ClientUpdate


@dataclass
class ClientState:
    server: str = ""
    token: str | None = None
    client_id: str = ""
    run_id: str = ""
    strategy_state: dict[str, Any] = field(default_factory=dict)
    pending: ClientUpdate | None = None  # trained, saved, not yet acknowledged by the server
    last_round: int = 0  # last round whose update the server acknowledged
    idle_rounds: list[int] = field(default_factory=list)

    def start_run(self, run_id: str) -> None:
        """A different run: keep the identity, drop everything learned in the old run."""
        self.run_id, self.strategy_state, self.pending, self.last_round, self.idle_rounds = run_id, {}, None, 0, []

    @classmethod
    def load(cls, path: Path) -> ClientState:
        if not path.exists():
            return cls()
        raw = torch.load(path, weights_only=True)
        pending = raw.pop("pending")
        return cls(**raw, pending=ClientUpdate(**pending) if pending else None)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = {name: getattr(self, name) for name in self.__dataclass_fields__}
        raw["pending"] = self.pending.model_dump() if self.pending else None
        staging = path.with_name(f".{path.name}.tmp")
        staging.unlink(missing_ok=True)
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(raw, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
