"""Run state in SQLite (`<run_dir>/state.sqlite`): tokens, clients, rounds, strategy state, accepted updates.

Everything the server needs to continue after a crash is here, written before the client hears
OK: an accepted update is committed before PushUpdate returns, and a round's new strategy state
replaces its updates in one transaction. WAL mode lets `fedserver status` read while the server
writes. Tensors are stored as raw little-endian bytes, one row per tensor, straight from tensor
memory (no serialised copy of a whole update).
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.convert import DTYPES
from fedtune.protos.payload import header_tensor, tensor_bytes
from fedtune.strategies.api import ClientUpdate, DeviceProfile

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, label TEXT NOT NULL, created REAL NOT NULL, client_id TEXT UNIQUE);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL, profile TEXT NOT NULL, registered REAL NOT NULL,
    last_seen REAL NOT NULL, activity TEXT NOT NULL DEFAULT '', left_reason TEXT,
    rounds_done INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, status TEXT NOT NULL, available TEXT NOT NULL, selected TEXT NOT NULL,
    started REAL NOT NULL, deadline REAL NOT NULL, finished REAL, bytes_down INTEGER NOT NULL DEFAULT 0,
    metrics TEXT);
CREATE TABLE IF NOT EXISTS strategy_state (round INTEGER PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL, client_id TEXT NOT NULL, seq INTEGER NOT NULL, header BLOB NOT NULL,
    wire_bytes INTEGER NOT NULL, PRIMARY KEY (round, client_id));
CREATE TABLE IF NOT EXISTS handouts (client_id TEXT PRIMARY KEY, round INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS update_tensors (
    round INTEGER NOT NULL, client_id TEXT NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (round, client_id, idx));
"""


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    token_hash: str
    profile: DeviceProfile
    registered: float
    last_seen: float
    activity: str
    left_reason: str | None
    rounds_done: int


@dataclass(frozen=True)
class RoundRecord:
    round: int
    status: str  # "running" or "done"
    available: list[str]
    selected: list[str]
    started: float
    deadline: float
    finished: float | None
    bytes_down: int
    metrics: dict[str, Any] | None


class RunStore:
    """One SQLite connection; the server uses it from a single thread (the engine thread)."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        if readonly:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a crash of the process (the case resume covers);
            # only an OS crash or power loss can drop the last commits.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.db:
            yield self.db

    # -- meta -------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, **values: str) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items())

    # -- tokens and clients -----------------------------------------------------------------

    def add_tokens(self, hashes_and_labels: Sequence[tuple[str, str]]) -> None:
        now = time.time()
        with self.transaction() as db:
            db.executemany("INSERT INTO tokens (token_hash, label, created) VALUES (?, ?, ?)",
                           [(token_hash, label, now) for token_hash, label in hashes_and_labels])

    def token_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0]

    def tokens(self) -> dict[str, str | None]:
        """token hash -> the client id bound to it (None while unused)."""
        return dict(self.db.execute("SELECT token_hash, client_id FROM tokens"))

    def token(self, token_hash: str) -> tuple[bool, str | None]:
        row = self.db.execute("SELECT client_id FROM tokens WHERE token_hash = ?", (token_hash,)).fetchone()
        return (row is not None, row[0] if row else None)

    def bind_client(self, client_id: str, token_hash: str, profile: DeviceProfile, now: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE tokens SET client_id = ? WHERE token_hash = ?", (client_id, token_hash))
            db.execute(
                "INSERT INTO clients (client_id, token_hash, profile, registered, last_seen) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(client_id) DO UPDATE SET profile = excluded.profile, last_seen = excluded.last_seen, "
                "left_reason = NULL",
                (client_id, token_hash, profile.model_dump_json(), now, now),
            )

    def clients(self) -> list[ClientRecord]:
        rows = self.db.execute(
            "SELECT client_id, token_hash, profile, registered, last_seen, activity, left_reason, rounds_done "
            "FROM clients ORDER BY registered, client_id"
        )
        return [ClientRecord(cid, token, DeviceProfile.model_validate_json(profile), registered, seen, activity,
                             left, done) for cid, token, profile, registered, seen, activity, left, done in rows]

    def record_activity(self, seen: dict[str, tuple[float, str]]) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE clients SET last_seen = ?, activity = ? WHERE client_id = ?",
                           [(when, activity, cid) for cid, (when, activity) in seen.items()])

    def set_left(self, client_id: str, reason: str | None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE clients SET left_reason = ? WHERE client_id = ?", (reason, client_id))

    # -- rounds -----------------------------------------------------------------------------

    def begin_round(self, round: int, available: Sequence[str], selected: Sequence[str], deadline: float) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds (round, status, available, selected, started, deadline) "
                "VALUES (?, 'running', ?, ?, ?, ?)",
                (round, json.dumps(list(available)), json.dumps(list(selected)), time.time(), deadline),
            )

    def add_bytes_down(self, round: int, size: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE rounds SET bytes_down = bytes_down + ? WHERE round = ?", (size, round))

    def rounds(self) -> list[RoundRecord]:
        rows = self.db.execute(
            "SELECT round, status, available, selected, started, deadline, finished, bytes_down, metrics "
            "FROM rounds ORDER BY round"
        )
        return [RoundRecord(r, status, json.loads(available), json.loads(selected), started, deadline, finished,
                            bytes_down, json.loads(metrics) if metrics else None)
                for r, status, available, selected, started, deadline, finished, bytes_down, metrics in rows]

    def complete_round(self, round: int, state: dict[str, Any], metrics: dict[str, Any],
                       participants: Sequence[str]) -> None:
        """One transaction: the new strategy state replaces the round's accepted updates."""
        blob = io.BytesIO()
        torch.save(state, blob)
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO strategy_state (round, state) VALUES (?, ?)", (round, blob.getbuffer()))
            db.execute("DELETE FROM strategy_state WHERE round < ?", (round,))
            db.execute("UPDATE rounds SET status = 'done', finished = ?, metrics = ? WHERE round = ?",
                       (time.time(), json.dumps(metrics), round))
            db.executemany("UPDATE clients SET rounds_done = rounds_done + 1 WHERE client_id = ?",
                           [(cid,) for cid in participants])
            db.execute("DELETE FROM update_tensors WHERE round <= ?", (round,))
            db.execute("DELETE FROM updates WHERE round <= ?", (round,))

    def save_initial_state(self, state: dict[str, Any]) -> None:
        blob = io.BytesIO()
        torch.save(state, blob)
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO strategy_state (round, state) VALUES (0, ?)", (blob.getbuffer(),))

    def latest_state(self) -> tuple[int, dict[str, Any]]:
        """(last completed round, the strategy state after it); round 0 is the initial state."""
        row = self.db.execute("SELECT round, state FROM strategy_state ORDER BY round DESC LIMIT 1").fetchone()
        if row is None:
            raise LookupError(f"{self.path}: no strategy state saved yet")
        return row[0], torch.load(io.BytesIO(row[1]), weights_only=True)

    # -- accepted updates of the round in progress ------------------------------------------

    def save_update(self, update: ClientUpdate, wire_bytes: int) -> None:
        header = pb.ClientUpdate(
            client_id=update.client_id, round=update.round, num_examples=update.num_examples,
            tensors=[header_tensor(name, tensor) for name, tensor in update.tensors.items()],
            metrics=dict(update.metrics),
        )
        with self.transaction() as db:
            seq = db.execute("SELECT COUNT(*) FROM updates").fetchone()[0]  # all of the open round's
            db.execute("INSERT INTO updates (round, client_id, seq, header, wire_bytes) VALUES (?, ?, ?, ?, ?)",
                       (update.round, update.client_id, seq, header.SerializeToString(), wire_bytes))
            db.executemany(
                "INSERT INTO update_tensors (round, client_id, idx, data) VALUES (?, ?, ?, ?)",
                ((update.round, update.client_id, index, tensor_bytes(tensor))
                 for index, tensor in enumerate(update.tensors.values())),
            )

    def save_handout(self, client_id: str, round: int) -> None:
        """Asynchronous mode: `client_id` holds work for `round` (replacing any earlier handout)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO handouts (client_id, round) VALUES (?, ?)", (client_id, round))

    def handouts(self) -> dict[str, int]:
        """Asynchronous mode: the round of the work each client was last handed."""
        return dict(self.db.execute("SELECT client_id, round FROM handouts"))

    def accepted_count(self, round: int) -> int:
        return self.db.execute("SELECT COUNT(*) FROM updates WHERE round <= ?", (round,)).fetchone()[0]

    def load_updates(self, round: int) -> list[tuple[ClientUpdate, int]]:
        """The accepted updates of the open round `round` in acceptance order, with their wire sizes (in
        asynchronous mode some were computed for earlier rounds, and are stored under those)."""
        loaded = []
        for client_id, header_bytes, wire_bytes in self.db.execute(
            "SELECT client_id, header, wire_bytes FROM updates WHERE round <= ? ORDER BY seq", (round,)
        ).fetchall():
            header = pb.ClientUpdate.FromString(header_bytes)
            tensors = {}
            rows = self.db.execute("SELECT data FROM update_tensors WHERE round = ? AND client_id = ? "
                                   "ORDER BY idx", (header.round, client_id))
            for (data,), spec in zip(rows, header.tensors, strict=True):
                tensor = torch.empty(tuple(spec.shape), dtype=DTYPES[spec.dtype])
                tensor.reshape(-1).view(torch.uint8).numpy()[:] = memoryview(data)
                tensors[spec.name] = tensor
            update = ClientUpdate(client_id=header.client_id, round=header.round, num_examples=header.num_examples,
                                  tensors=tensors, metrics=dict(header.metrics))
            loaded.append((update, wire_bytes))
        return loaded
