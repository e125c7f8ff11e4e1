"""Run state: SQLite (`<run_dir>/state.sqlite`) for tokens, clients, rounds and the accepted updates'
metadata; each accepted update's payload in a file of its own (`<run_dir>/updates/`), and the strategy
state after the last completed round in `<run_dir>/state/` (SQLite holds its name and SHA-256).

Everything the server needs to continue after a crash is here, written before the client hears
OK. An update's payload (its tensors' wire bytes, exactly as the payload stream carried them) is
appended to its file as the chunks arrive, and the file and its directory are fsync'd; only then is
its metadata (header, size, SHA-256) committed to SQLite, with SQLite's log fsync'd, and only then
does PushUpdate return. A light update (at most INLINE_PAYLOAD_BYTES: a rank-1 adapter, a seed log)
is received into memory and its payload committed inside its metadata row: for it a file of its own
(create, two fsyncs, a mapping) cost more than all the rest of its upload. Rows of updates accepted
together are committed together (`commit_updates`), sharing one fsync.
A payload file without a metadata row (the server died between the two, or the upload was refused)
is an orphan: never loaded, removed at start-up and when a round commits. A round's new strategy
state replaces its updates' rows in one transaction; their files go right after. Keeping payloads
out of SQLite means a large update is written once, straight from the received chunks, rather than
copied through SQLite's WAL, and that accepted updates can be mapped back from their files instead
of held in memory. The strategy state goes the same way: torch.save straight into a file, synced
before the commit that makes it the run's state. WAL mode lets `fedserver status` read while the
server writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch

from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.payload import header_tensor, payload_tensors, tensor_bytes
from fedtune.strategies.api import ClientUpdate, DeviceProfile
from fedtune.strategies.mapped import map_file

PAYLOAD_DIR = "updates"
PAYLOAD_SUFFIX = ".payload"
INLINE_PAYLOAD_BYTES = 16 << 10
WRITEBACK_BYTES = 8 << 20  # a payload file's disk writes start once this much is written, not at its fsync
STATE_DIR = "state"

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
CREATE TABLE IF NOT EXISTS strategy_states (round INTEGER PRIMARY KEY, file TEXT NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accepted_updates (
    round INTEGER NOT NULL, client_id TEXT NOT NULL, seq INTEGER NOT NULL, header BLOB NOT NULL,
    wire_bytes INTEGER NOT NULL, payload TEXT NOT NULL, payload_bytes INTEGER NOT NULL, sha256 TEXT NOT NULL,
    data BLOB, PRIMARY KEY (round, client_id));
CREATE TABLE IF NOT EXISTS handouts (client_id TEXT PRIMARY KEY, round INTEGER NOT NULL);
"""


class CorruptPayload(RuntimeError):
    """A stored file (an update's payload, the strategy state) that no longer holds the bytes committed
    (it is missing, or its size or SHA-256 differs)."""


class _HashingWriter:
    """A file that hashes what torch.save writes into it, so a saved state need not be read back."""

    def __init__(self, file: Any):
        self.file = file
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _fsync_path(path: Path) -> None:
    """fsync by path: a file written by someone else (SQLite's log), or a directory, which makes a
    file's creation (its directory entry) durable, not only its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PayloadFile:
    """One update's payload bytes in a file of its own, appended as they arrive (straight from the
    received chunks, no reassembly in memory); `sync` makes them durable. One writer at a time.

    The disk writes start while the stream is still arriving (every WRITEBACK_BYTES, where the OS
    offers it), so that the fsync before OK waits for the last few MiB rather than for the whole
    update: on this project's VM that fsync alone was ~0.45 s for 256 MiB."""

    def __init__(self, path: Path, header: bytes = b""):
        self.path = path
        self.header = header  # the update's ClientUpdate header as received, encoded (b"": none)
        self.size = 0
        self.sha256 = ""  # hex, set by `sync`: the digest the payload stream's trailer carried
        self.handed_over = False  # the receiver passed it on to be accepted (and removed if it is not)
        self._file = open(path, "xb", buffering=0)  # chunks are large: no buffer to copy them through
        self._written_back = 0  # the offset up to which disk writes were started

    @property
    def name(self) -> str:
        return self.path.name

    def write(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        self.size += view.nbytes
        while view:  # a raw file may write less than asked
            view = view[self._file.write(view):]
        if self.size - self._written_back >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            # On DONTNEED, Linux starts writing the range's dirty pages back; pages still being written
            # stay cached, and nothing that is not on disk yet is ever dropped.
            os.posix_fadvise(self._file.fileno(), self._written_back, self.size - self._written_back,
                             os.POSIX_FADV_DONTNEED)
            self._written_back = self.size

    def sync(self, sha256: bytes) -> None:
        """fsync the file and its directory: after this, the payload survives a crash of the host."""
        os.fsync(self._file.fileno())
        self._file.close()
        _fsync_path(self.path.parent)
        self.sha256 = sha256.hex()

    def close(self) -> None:
        self._file.close()

    def map(self) -> torch.Tensor:
        return map_file(self.path, self.size)


class InlinePayload:
    """A light update's payload, received into memory and committed inside its metadata row, so that
    its durability is the row's (`RunStore.commit_updates`)."""

    name = ""  # no file of its own

    def __init__(self, header: bytes = b"") -> None:
        self.header = header  # as PayloadFile's
        self.data = bytearray()
        self.sha256 = ""  # hex, set by `sync`
        self.handed_over = False

    @property
    def size(self) -> int:
        return len(self.data)

    def write(self, chunk: bytes | memoryview) -> None:
        self.data += chunk

    def sync(self, sha256: bytes) -> None:
        """Nothing to sync: the bytes reach the disk with their row."""
        self.sha256 = sha256.hex()

    def map(self) -> torch.Tensor:
        return _buffer_tensor(self.data)


Payload = PayloadFile | InlinePayload


def _buffer_tensor(data: bytearray) -> torch.Tensor:
    """`data` as a uint8 tensor sharing its memory."""
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


@dataclass(frozen=True)
class StoredUpdate:
    """An accepted update's metadata row; its tensors are in `payload` (under the store's payload dir)."""

    round: int
    client_id: str
    header: bytes
    wire_bytes: int
    payload: str  # "" when inline
    payload_bytes: int
    sha256: str
    data: bytes | None  # a light update's payload, inline


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
    """One SQLite connection; the server uses it from a single thread (the engine thread). Payload
    files are created and written on other threads (`new_payload`), never through SQLite."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        self.payload_dir = path.parent / PAYLOAD_DIR
        self.state_dir = path.parent / STATE_DIR
        self._writing: set[str] = set()  # payload files being received or awaiting their commit: not orphans
        self._uncommitted = False  # accepted updates saved, waiting for `commit_updates`
        self._rows: int | None = None  # accepted_updates' row count, known since the last delete: counting is a scan
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
            self._migrate()

    def _migrate(self) -> None:
        """Bring a run dir an earlier fedtune wrote to this layout, so that it resumes: payload-file rows
        without the inline `data` column get it; a strategy state kept as a blob (`strategy_state`) moves
        to its file, and updates kept as rows of tensors (`updates` + `update_tensors`) become inline
        payloads (the same bytes in header order, now with their SHA-256)."""
        if "data" not in {column for _, column, *_ in self.db.execute("PRAGMA table_info(accepted_updates)")}:
            with self.db:
                self.db.execute("ALTER TABLE accepted_updates ADD COLUMN data BLOB")
        tables = {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "strategy_state" in tables:
            latest = self.db.execute("SELECT round, state FROM strategy_state ORDER BY round DESC LIMIT 1").fetchone()
            if latest is not None:
                try:
                    state = torch.load(io.BytesIO(latest[1]), weights_only=True)
                except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
                    raise CorruptPayload(f"{self.path}: the strategy state after round {latest[0]} (table "
                                         f"strategy_state, an earlier layout) cannot be read: {error}") from error
                state_file, digest = self._save_state(latest[0], state)
                with self.db:
                    self.db.execute("INSERT OR REPLACE INTO strategy_states (round, file, sha256) VALUES (?, ?, ?)",
                                    (latest[0], state_file, digest))
            with self.db:
                self.db.execute("DROP TABLE strategy_state")
        if "updates" in tables:
            rows = self.db.execute("SELECT round, client_id, seq, header, wire_bytes FROM updates").fetchall()
            with self.db:
                for round, client_id, seq, header, wire_bytes in rows:
                    data = b"".join(blob for (blob,) in self.db.execute(
                        "SELECT data FROM update_tensors WHERE round = ? AND client_id = ? ORDER BY idx",
                        (round, client_id)))
                    self.db.execute(
                        "INSERT INTO accepted_updates (round, client_id, seq, header, wire_bytes, payload, "
                        "payload_bytes, sha256, data) VALUES (?, ?, ?, ?, ?, '', ?, ?, ?)",
                        (round, client_id, seq, header, wire_bytes, len(data), hashlib.sha256(data).hexdigest(), data))
                self.db.execute("DROP TABLE updates")
                self.db.execute("DROP TABLE IF EXISTS update_tensors")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.commit_updates()  # first: another transaction that fails must not roll back accepted updates
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
        """One transaction: the new strategy state (already in its synced file) replaces the round's
        accepted updates; then the files no row refers to any more (the older state, the round's
        payloads, orphans of this round or an earlier one) are removed."""
        state_file, digest = self._save_state(round, state)
        try:
            with self.transaction() as db:
                db.execute("INSERT OR REPLACE INTO strategy_states (round, file, sha256) VALUES (?, ?, ?)",
                           (round, state_file, digest))
                db.execute("DELETE FROM strategy_states WHERE round < ?", (round,))
                db.execute("UPDATE rounds SET status = 'done', finished = ?, metrics = ? WHERE round = ?",
                           (time.time(), json.dumps(metrics), round))
                db.executemany("UPDATE clients SET rounds_done = rounds_done + 1 WHERE client_id = ?",
                               [(cid,) for cid in participants])
                db.execute("DELETE FROM accepted_updates WHERE round <= ?", (round,))
                self._rows = None
        finally:
            self._remove_unreferenced_states()
        self.remove_orphan_payloads(up_to_round=round)

    def save_initial_state(self, state: dict[str, Any]) -> None:
        state_file, digest = self._save_state(0, state)
        try:
            with self.transaction() as db:
                db.execute("INSERT OR REPLACE INTO strategy_states (round, file, sha256) VALUES (0, ?, ?)",
                           (state_file, digest))
        finally:
            self._remove_unreferenced_states()

    def latest_state(self) -> tuple[int, dict[str, Any]]:
        """(last completed round, the strategy state after it); round 0 is the initial state.
        CorruptPayload if its file is missing or not what was committed: the run cannot resume from it."""
        row = self.db.execute("SELECT round, file, sha256 FROM strategy_states ORDER BY round DESC LIMIT 1").fetchone()
        if row is None:
            raise LookupError(f"{self.path}: no strategy state saved yet")
        round, name, expected = row
        path = self.state_dir / name
        try:
            with path.open("rb") as file:
                digest = hashlib.file_digest(file, "sha256").hexdigest()
        except FileNotFoundError:
            raise CorruptPayload(f"strategy state file {path} (after round {round}) is missing") from None
        if digest != expected:
            raise CorruptPayload(f"strategy state file {path} (after round {round}): its SHA-256 is {digest}, the "
                                 f"committed state's was {expected} (the file was damaged on disk)")
        return round, torch.load(path, weights_only=True)

    def _save_state(self, round: int, state: dict[str, Any]) -> tuple[str, str]:
        """torch.save straight into a new file (no serialised copy in memory, none through SQLite: for a
        full-model strategy that was three times the state at the end of every round), fsync'd with its
        directory; returns its name and SHA-256."""
        if not self.state_dir.is_dir():
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _fsync_path(self.state_dir.parent)
        name = f"round-{round:06d}-{uuid.uuid4().hex[:12]}.pt"
        try:
            with (self.state_dir / name).open("xb") as file:
                writer = _HashingWriter(file)
                torch.save(state, cast(IO[bytes], writer))  # torch.save needs only `write`
                file.flush()
                os.fsync(file.fileno())
            _fsync_path(self.state_dir)
        except BaseException:
            (self.state_dir / name).unlink(missing_ok=True)
            raise
        return name, writer.sha256.hexdigest()

    def _remove_unreferenced_states(self) -> None:
        """State files no row refers to: replaced by a newer state, or left by a commit that never happened."""
        kept = {name for (name,) in self.db.execute("SELECT file FROM strategy_states")}
        for path in self.state_dir.glob("round-*.pt"):
            if path.name not in kept:
                path.unlink(missing_ok=True)

    # -- accepted updates of the round in progress ------------------------------------------

    def new_payload(self, round: int, client_id: str, size: int | None = None, header: bytes = b"") -> Payload:
        """Where the payload of `client_id`'s update for `round` goes (any thread): memory if its `size` is
        known and at most INLINE_PAYLOAD_BYTES, else a new file. The file's name starts with the round, so
        a committed round's orphans are recognised; it is never another's file. `header`: the update's
        ClientUpdate header as received, encoded, which `save_update` stores as it is."""
        if size is not None and size <= INLINE_PAYLOAD_BYTES:
            return InlinePayload(header)
        if not self.payload_dir.is_dir():
            self.payload_dir.mkdir(parents=True, exist_ok=True)
            _fsync_path(self.payload_dir.parent)
        name = f"{round:06d}-{client_id}-{uuid.uuid4().hex[:12]}{PAYLOAD_SUFFIX}"
        self._writing.add(name)
        try:
            return PayloadFile(self.payload_dir / name, header)
        except BaseException:
            self._writing.discard(name)
            raise

    def discard_payload(self, payload: Payload) -> None:
        """Remove the payload file of an upload that was not accepted (any thread)."""
        if isinstance(payload, PayloadFile):
            payload.close()
            payload.path.unlink(missing_ok=True)
            self._writing.discard(payload.name)

    def save_update(self, update: ClientUpdate, wire_bytes: int, payload: Payload | None = None,
                    group: bool = False) -> None:
        """Commit an accepted update durably. `payload`: its bytes, already received and synced (gRPC);
        without it (an update built in this process) they are written and synced here. With `group`, the
        row waits for the next `commit_updates` instead, which the caller awaits before saying OK."""
        if payload is None:
            payload = self._write_payload(update)
        header = payload.header or pb.ClientUpdate(  # building one costs ~75 µs for a light update's 28 tensors
            client_id=update.client_id, round=update.round, num_examples=update.num_examples,
            tensors=[header_tensor(name, tensor) for name, tensor in update.tensors.items()],
            metrics=dict(update.metrics),
        ).SerializeToString()
        assert payload.sha256, "a payload is committed only once synced"
        try:  # a failed insert rolls back itself alone, not the other updates waiting for their commit
            if self._rows is None:
                self._rows = self.db.execute("SELECT COUNT(*) FROM accepted_updates").fetchone()[0]
            seq = self._rows  # the rows are all of the open round's
            self.db.execute(
                "INSERT INTO accepted_updates (round, client_id, seq, header, wire_bytes, payload, payload_bytes, "
                "sha256, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (update.round, update.client_id, seq, header, wire_bytes, payload.name,
                 payload.size, payload.sha256, payload.data if isinstance(payload, InlinePayload) else None))
            self._rows += 1
        except BaseException:
            self.discard_payload(payload)
            raise
        self._writing.discard(payload.name)
        self._uncommitted = True
        if not group:
            self.commit_updates()

    def commit_updates(self) -> None:
        """Commit every accepted update saved since the last commit, then fsync SQLite's log: what
        synchronous=FULL does after every commit (NORMAL syncs the log only at checkpoints, and the
        level cannot change inside a transaction). Updates accepted together share the one fsync."""
        if not self._uncommitted:
            return
        self.db.commit()
        _fsync_path(self.path.with_name(self.path.name + "-wal"))
        self._uncommitted = False

    def _write_payload(self, update: ClientUpdate) -> Payload:
        payload = self.new_payload(update.round, update.client_id, sum(t.nbytes for t in update.tensors.values()))
        hasher = hashlib.sha256()
        try:
            for tensor in update.tensors.values():
                data = tensor_bytes(tensor)
                hasher.update(data)
                payload.write(data)
            payload.sync(hasher.digest())
        except BaseException:
            self.discard_payload(payload)
            raise
        return payload

    def save_handout(self, client_id: str, round: int) -> None:
        """Asynchronous mode: `client_id` holds work for `round` (replacing any earlier handout)."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO handouts (client_id, round) VALUES (?, ?)", (client_id, round))

    def handouts(self) -> dict[str, int]:
        """Asynchronous mode: the round of the work each client was last handed."""
        return dict(self.db.execute("SELECT client_id, round FROM handouts"))

    def accepted_count(self, round: int) -> int:
        return self.db.execute("SELECT COUNT(*) FROM accepted_updates WHERE round <= ?", (round,)).fetchone()[0]

    def stored_updates(self, round: int) -> list[StoredUpdate]:
        """The accepted updates of the open round `round` in acceptance order (in asynchronous mode some
        were computed for earlier rounds, and are stored under those)."""
        rows = self.db.execute(
            "SELECT round, client_id, header, wire_bytes, payload, payload_bytes, sha256, data FROM accepted_updates "
            "WHERE round <= ? ORDER BY seq", (round,)).fetchall()
        return [StoredUpdate(*row) for row in rows]

    def load_update(self, stored: StoredUpdate) -> ClientUpdate:
        """A stored update, its tensors mapped from its payload file (or inline); CorruptPayload if the
        file is missing, or its size or SHA-256 is not what was accepted."""
        if stored.data is not None:
            what = f"inline payload in {self.path} (the update of {stored.client_id!r} for round {stored.round})"
            data = _buffer_tensor(bytearray(stored.data))
        else:
            path = self.payload_dir / stored.payload
            what = f"payload file {path} (the update of {stored.client_id!r} for round {stored.round})"
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CorruptPayload(f"{what} is missing") from None
            if size != stored.payload_bytes:
                raise CorruptPayload(f"{what} holds {size} bytes, {stored.payload_bytes} were accepted (truncated or "
                                     "overwritten)")
            data = map_file(path, size)
        digest = hashlib.sha256(data.numpy().data).hexdigest()
        if digest != stored.sha256:
            raise CorruptPayload(f"{what}: its SHA-256 is {digest}, the accepted update's was {stored.sha256} (the "
                                 "file was damaged on disk)")
        header = pb.ClientUpdate.FromString(stored.header)
        return ClientUpdate(client_id=header.client_id, round=header.round, num_examples=header.num_examples,
                            tensors=payload_tensors("stored ClientUpdate", header.tensors, data),
                            metrics=dict(header.metrics))

    def drop_update(self, stored: StoredUpdate) -> None:
        """Forget a stored update that can no longer be used (its file damaged, or the strategy now refuses
        it), so that its client's next upload for the round can be committed in its place."""
        with self.transaction() as db:
            self._rows = None
            db.execute("DELETE FROM accepted_updates WHERE round = ? AND client_id = ?",
                       (stored.round, stored.client_id))
        if stored.payload:
            (self.payload_dir / stored.payload).unlink(missing_ok=True)

    def load_updates(self, round: int) -> list[tuple[ClientUpdate, int]]:
        """`stored_updates` loaded, with their wire sizes; CorruptPayload at the first damaged one."""
        return [(self.load_update(stored), stored.wire_bytes) for stored in self.stored_updates(round)]

    def remove_orphan_payloads(self, up_to_round: int | None = None) -> list[str]:
        """Remove payload files no metadata row refers to and no upload is writing (of rounds up to
        `up_to_round`, or of any round); returns their names. At start-up that is every file left by
        an upload the server did not live to commit."""
        if not self.payload_dir.is_dir():
            return []
        kept = {name for (name,) in self.db.execute("SELECT payload FROM accepted_updates")}
        removed = []
        for path in self.payload_dir.iterdir():
            name = path.name
            prefix = name.split("-", 1)[0]
            if not (name.endswith(PAYLOAD_SUFFIX) and prefix.isdigit()) or name in kept or name in self._writing:
                continue
            if up_to_round is None or int(prefix) <= up_to_round:
                path.unlink(missing_ok=True)
                removed.append(name)
        return removed
