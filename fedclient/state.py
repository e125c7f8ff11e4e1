"""The client's local state file: identity, strategy state and a not-yet-acknowledged update.

Written atomically (temp file + rename, mode 0600: it holds the token) after every step that
changes it, so a client killed at any point restarts as the same client, with the same strategy
state, and re-sends (rather than recomputes) an update the server may not have received.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.fedclient.connection import FatalError
from fedtune.strategies.api import ClientUpdate


def default_state_file(server: str, name: str, token: str | None, home: Path) -> Path:
    """Where a client keeps its state unless `--state` says: one file per client identity, so several
    clients on one host, with one home directory, never share (and clobber) one.

    The identity is the name the client asks for, else its enrollment token, as the short hash the
    server names an unnamed client by (`device-<sha256[:12]>`, so the file name shows the client id).
    A client given neither (a rejoin relying on the token kept in its state) takes the one state file
    this home holds for the server.
    """
    directory = home / ".fedtune"
    stem = f"client-{server.replace(':', '-')}"
    if name:
        return directory / f"{stem}-{name}.pt"
    if token:
        return directory / f"{stem}-device-{hashlib.sha256(token.encode()).hexdigest()[:12]}.pt"
    existing = sorted({*directory.glob(f"{stem}.pt"), *directory.glob(f"{stem}-*.pt")})
    if len(existing) == 1:
        return existing[0]
    if not existing:
        raise FatalError(f"no enrollment token for {server}: pass --token or --token-file (from the server operator)")
    raise FatalError(f"{len(existing)} client state files for {server} in {directory} "
                     f"({', '.join(path.name for path in existing)}): pass --name or --token to say which client "
                     "this is, or --state FILE")


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
