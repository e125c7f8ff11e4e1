"""Accepted updates' payloads in files of their own (`<run_dir>/updates/`), SQLite holding their metadata.

The store alone: bytes back bit for bit, digests, orphans and the disk over many rounds. The lifecycle
(in-process, stub strategy): a damaged payload found on resume. A real fedserver process killed between
a payload's fsync and its metadata commit (the one injected fault: the commit replaced by SIGKILL).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch

from fedtune.fedserver.coordinator import PollKind
from fedtune.fedserver.service import stored_header
from fedtune.fedserver.store import INLINE_PAYLOAD_BYTES, PAYLOAD_DIR, STATE_DIR, CorruptPayload, RunStore
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.payload import header_tensor, tensor_bytes
from fedtune.strategies.api import ClientUpdate
from fedtune.strategies.mapped import CAN_RELEASE
from tests.test_lifecycle import scenario, server_config, started, stop, until, update
from tests.test_transport import (
    ENV,
    MiB,
    Server,
    _started,
    free_port,
    in_process_client,
    init_run,
    pull_instruction,
    run_config,
    start_server,
    toml,
    write_partitions,
)


def payload_files(run_dir: Path) -> list[str]:
    directory = run_dir / PAYLOAD_DIR
    return sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []


def mixed_update(client_id: str, round: int) -> ClientUpdate:
    """Dtypes of every width, back to back, so most tensors sit at offsets their dtype cannot view."""
    generator = torch.Generator().manual_seed(round)
    return ClientUpdate(client_id=client_id, round=round, num_examples=2, metrics={"train_loss": 0.5}, tensors={
        "mask": torch.tensor([True, False, True]),
        "w": torch.randn(4, 5, generator=generator),
        "half": torch.randn(3, generator=generator).to(torch.bfloat16),
        "empty": torch.empty(0, 7),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "big": torch.randn(1 << 16, generator=generator),
    })


def test_an_update_comes_back_bit_identical_from_its_file_and_sqlite_holds_only_its_digest(tmp_path: Path):
    store = RunStore(tmp_path / "state.sqlite")
    sent = mixed_update("a", 1)
    store.save_update(sent, wire_bytes=123)
    [name] = payload_files(tmp_path)
    wire = b"".join(bytes(tensor_bytes(tensor)) for tensor in sent.tensors.values())
    assert (tmp_path / PAYLOAD_DIR / name).read_bytes() == wire  # the payload stream's bytes, nothing else
    [(back, wire_bytes)] = store.load_updates(1)
    assert (wire_bytes, back.client_id, back.num_examples, back.metrics) == (123, "a", 2, {"train_loss": 0.5})
    assert list(back.tensors) == list(sent.tensors)
    for tensor_name, tensor in sent.tensors.items():
        assert back.tensors[tensor_name].dtype == tensor.dtype and torch.equal(back.tensors[tensor_name], tensor)
    back.tensors["big"].mul_(2)  # a strategy writing into an update changes its copy, never the stored payload
    assert hashlib.sha256((tmp_path / PAYLOAD_DIR / name).read_bytes()).digest() == hashlib.sha256(wire).digest()
    assert torch.equal(store.load_updates(1)[0][0].tensors["big"], sent.tensors["big"])
    db = sqlite3.connect(tmp_path / "state.sqlite")
    [(payload, size, digest)] = db.execute("SELECT payload, payload_bytes, sha256 FROM accepted_updates").fetchall()
    assert (payload, size, digest) == (name, len(wire), hashlib.sha256(wire).hexdigest())
    biggest = db.execute("SELECT MAX(LENGTH(header)) FROM accepted_updates").fetchone()[0]
    assert biggest < 1024 < len(wire)  # the header only: the tensors are not in SQLite


def light_update(client_id: str, round: int) -> ClientUpdate:
    update = mixed_update(client_id, round)
    return update.model_copy(update={"tensors": {k: v for k, v in update.tensors.items() if k != "big"}})


def test_a_light_update_is_committed_inside_its_row_and_comes_back_bit_identical(tmp_path: Path):
    store = RunStore(tmp_path / "state.sqlite")
    sent = light_update("a", 1)
    wire = b"".join(bytes(tensor_bytes(tensor)) for tensor in sent.tensors.values())
    assert 0 < len(wire) <= INLINE_PAYLOAD_BYTES
    store.save_update(sent, wire_bytes=7)
    assert payload_files(tmp_path) == []  # no file of its own
    [(back, wire_bytes)] = store.load_updates(1)
    assert (wire_bytes, back.client_id, back.metrics) == (7, "a", {"train_loss": 0.5})
    for name, tensor in sent.tensors.items():
        assert back.tensors[name].dtype == tensor.dtype and torch.equal(back.tensors[name], tensor)
    db = sqlite3.connect(tmp_path / "state.sqlite")  # another connection: committed
    assert db.execute("SELECT data, sha256 FROM accepted_updates").fetchall() == [
        (wire, hashlib.sha256(wire).hexdigest())]


def test_a_received_update_is_stored_with_its_header_as_received_less_unknown_fields(tmp_path: Path):
    sent = light_update("a", 1)
    canonical = pb.ClientUpdate(client_id="a", round=1, num_examples=2, metrics={"train_loss": 0.5},
                                tensors=[header_tensor(name, tensor) for name, tensor in sent.tensors.items()])
    received = pb.ClientUpdate.FromString(canonical.SerializeToString() + b"\xb8\x3e\x01")  # field 999: unknown
    assert received.SerializeToString() != canonical.SerializeToString()
    store = RunStore(tmp_path / "state.sqlite")
    wire = b"".join(bytes(tensor_bytes(tensor)) for tensor in sent.tensors.values())
    payload = store.new_payload(1, "a", len(wire), stored_header(received))
    payload.write(wire)
    payload.sync(hashlib.sha256(wire).digest())
    store.save_update(sent, wire_bytes=7, payload=payload)
    db = sqlite3.connect(tmp_path / "state.sqlite")
    assert db.execute("SELECT header FROM accepted_updates").fetchall() == [(canonical.SerializeToString(),)]
    [(back, _)] = store.load_updates(1)
    assert (back.client_id, back.num_examples, back.metrics) == ("a", 2, {"train_loss": 0.5})
    assert all(torch.equal(back.tensors[name], tensor) for name, tensor in sent.tensors.items())


# The store's layout before payload files (strategy state and update tensors as SQLite blobs), as an earlier
# fedtune wrote it; and the payload-file layout before light updates went inline (no `data` column).
BLOB_LAYOUT = """
CREATE TABLE strategy_state (round INTEGER PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE updates (round INTEGER NOT NULL, client_id TEXT NOT NULL, seq INTEGER NOT NULL, header BLOB NOT NULL,
    wire_bytes INTEGER NOT NULL, PRIMARY KEY (round, client_id));
CREATE TABLE update_tensors (round INTEGER NOT NULL, client_id TEXT NOT NULL, idx INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (round, client_id, idx));
"""
FILE_LAYOUT = """
CREATE TABLE accepted_updates (round INTEGER NOT NULL, client_id TEXT NOT NULL, seq INTEGER NOT NULL,
    header BLOB NOT NULL, wire_bytes INTEGER NOT NULL, payload TEXT NOT NULL, payload_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL, PRIMARY KEY (round, client_id));
"""


def test_a_run_dir_in_the_blob_layout_resumes_with_its_state_and_updates(tmp_path: Path):
    sent = mixed_update("a", 3)
    header = pb.ClientUpdate(client_id="a", round=3, num_examples=2, metrics={"train_loss": 0.5},
                             tensors=[header_tensor(name, tensor) for name, tensor in sent.tensors.items()])
    db = sqlite3.connect(tmp_path / "state.sqlite")
    db.executescript(BLOB_LAYOUT)
    state = {"global_tensors": {"w": torch.arange(6.0).reshape(2, 3)}}
    for round in (1, 2):  # an older state too: only the newest is kept
        buffer = io.BytesIO()
        torch.save({"global_tensors": {"w": state["global_tensors"]["w"] * round}}, buffer)
        db.execute("INSERT INTO strategy_state VALUES (?, ?)", (round, buffer.getvalue()))
    db.execute("INSERT INTO updates VALUES (3, 'a', 0, ?, 99)", (header.SerializeToString(),))
    db.executemany("INSERT INTO update_tensors VALUES (3, 'a', ?, ?)",
                   [(index, bytes(tensor_bytes(tensor))) for index, tensor in enumerate(sent.tensors.values())])
    db.commit()
    db.close()

    store = RunStore(tmp_path / "state.sqlite")
    round, loaded = store.latest_state()
    assert round == 2 and torch.equal(loaded["global_tensors"]["w"], state["global_tensors"]["w"] * 2)
    [(back, wire_bytes)] = store.load_updates(3)
    assert (wire_bytes, back.client_id, back.round, back.metrics) == (99, "a", 3, {"train_loss": 0.5})
    for name, tensor in sent.tensors.items():
        assert back.tensors[name].dtype == tensor.dtype and torch.equal(back.tensors[name], tensor)
    tables = {name for (name,) in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert not tables & {"strategy_state", "updates", "update_tensors"}
    store.close()
    assert RunStore(tmp_path / "state.sqlite").load_updates(3)[0][1] == 99  # opened again: nothing left to move


def test_a_damaged_state_blob_in_the_blob_layout_is_named_and_left_in_place(tmp_path: Path):
    db = sqlite3.connect(tmp_path / "state.sqlite")
    db.executescript(BLOB_LAYOUT)
    db.execute("INSERT INTO strategy_state VALUES (4, ?)", (b"not a torch.save archive",))
    db.commit()
    db.close()
    with pytest.raises(CorruptPayload, match="strategy state after round 4 .*cannot be read"):
        RunStore(tmp_path / "state.sqlite")
    tables = {name for (name,) in sqlite3.connect(tmp_path / "state.sqlite").execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "strategy_state" in tables  # nothing dropped: the blob is still there to be looked at


def test_a_run_dir_from_before_inline_payloads_gets_the_column_and_keeps_its_files(tmp_path: Path):
    db = sqlite3.connect(tmp_path / "state.sqlite")
    db.executescript(FILE_LAYOUT)
    db.close()
    store = RunStore(tmp_path / "state.sqlite")
    sent = mixed_update("a", 1)
    store.save_update(sent, wire_bytes=5)  # a payload file, as before
    store.save_update(light_update("b", 1), wire_bytes=6)  # inline, in the added column
    loaded = {update.client_id: update for update, _ in store.load_updates(1)}
    assert torch.equal(loaded["a"].tensors["big"], sent.tensors["big"]) and len(payload_files(tmp_path)) == 1
    assert torch.equal(loaded["b"].tensors["w"], sent.tensors["w"])


def test_updates_accepted_together_share_one_durable_commit(tmp_path: Path, monkeypatch):
    store = RunStore(tmp_path / "state.sqlite")
    synced: list[str] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    reader = sqlite3.connect(tmp_path / "state.sqlite")

    def committed() -> list[str]:
        return [cid for (cid,) in reader.execute("SELECT client_id FROM accepted_updates ORDER BY seq")]

    store.save_update(light_update("a", 1), wire_bytes=1, group=True)
    store.save_update(mixed_update("b", 1), wire_bytes=1, group=True)  # a payload file, synced before its row
    assert committed() == [] and [cid.client_id for cid in store.stored_updates(1)] == ["a", "b"]
    synced.clear()
    store.commit_updates()
    assert committed() == ["a", "b"] and synced == [f"{tmp_path}/state.sqlite-wal"]  # one fsync of SQLite's log
    store.commit_updates()
    assert synced == [f"{tmp_path}/state.sqlite-wal"]  # nothing new: no fsync

    store.save_update(light_update("c", 1), wire_bytes=1, group=True)
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as db:  # another transaction fails...
        db.execute("INSERT INTO meta (key, value) VALUES ('k', NULL)")
    assert committed() == ["a", "b", "c"]  # ... without rolling back an accepted update waiting for its commit


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:5] + bytes([data[5] ^ 1]) + data[6:], r"its SHA-256 is [0-9a-f]{64}, the accepted update's "
                                                              r"was [0-9a-f]{64} \(the file was damaged on disk\)"),
    (lambda data: data[:-3], r"holds \d+ bytes, \d+ were accepted \(truncated or overwritten\)"),
    (None, r"is missing"),
])
def test_a_damaged_payload_file_is_named_with_what_is_wrong_when_loaded(tmp_path: Path, damage, message):
    store = RunStore(tmp_path / "state.sqlite")
    store.save_update(mixed_update("a", 1), wire_bytes=1)
    [name] = payload_files(tmp_path)
    path = tmp_path / PAYLOAD_DIR / name
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptPayload, match=rf"payload file .*{name} \(the update of 'a' for round 1\)(:)? {message}"):
        store.load_updates(1)


def test_a_committed_round_removes_its_payloads_and_orphans_but_not_an_upload_in_progress(tmp_path: Path):
    store = RunStore(tmp_path / "state.sqlite")
    directory = tmp_path / PAYLOAD_DIR
    store.save_update(mixed_update("a", 1), wire_bytes=1)
    receiving = store.new_payload(1, "b")  # an upload still streaming in (asynchronous mode: older work)
    receiving.write(b"partial")
    later = store.new_payload(2, "c")
    for orphan in ("000001-d-0123456789ab.payload", "000002-d-0123456789ab.payload"):
        (directory / orphan).write_bytes(b"left by a refused upload")
    (directory / "notes.txt").write_text("not the store's")
    store.complete_round(1, {"w": torch.zeros(1)}, {}, ["a"])
    assert payload_files(tmp_path) == sorted([receiving.name, later.name, "000002-d-0123456789ab.payload",
                                              "notes.txt"])
    store.discard_payload(receiving)
    store.discard_payload(later)
    assert store.remove_orphan_payloads() == ["000002-d-0123456789ab.payload"]  # at start-up: every round's
    assert payload_files(tmp_path) == ["notes.txt"]


def test_the_payload_directory_does_not_grow_over_rounds(tmp_path: Path):
    store = RunStore(tmp_path / "state.sqlite")
    for round in range(1, 21):
        for client in "abc":
            store.save_update(mixed_update(client, round), wire_bytes=1)
        refused = store.new_payload(round, "x")  # an upload refused after it arrived (e.g. invalid)
        refused.write(b"x" * 1000)
        store.discard_payload(refused)
        assert len(payload_files(tmp_path)) == 3
        store.complete_round(round, {"w": torch.zeros(1)}, {}, ["a", "b", "c"])
        assert payload_files(tmp_path) == [] and store.accepted_count(round) == 0


def test_a_damaged_payload_found_on_resume_is_reported_and_its_client_asked_again(tmp_path: Path, caplog):
    config = server_config(tmp_path, min_clients=3)
    run_dir = config.run_dir()

    async def crashed() -> None:
        coordinator = await started(config, ["a", "b", "c"])
        run = asyncio.create_task(coordinator.run())
        await until(lambda: coordinator.current_round == 1, "round 1")
        await coordinator.submit("a", update("a", 1, 2.0, 1), 10)
        await coordinator.submit("b", update("b", 1, 4.0, 1), 10)
        await stop(run)
        coordinator.store.close()

    async def resumed() -> None:
        coordinator = await started(config, [], resume=True)
        assert coordinator.open_round is not None
        assert sorted(coordinator.open_round.state.accepted) == ["b"]
        assert coordinator.answer("a").kind is PollKind.INSTRUCTION  # a's update is lost: a is asked for it again
        run = asyncio.create_task(coordinator.run())
        await coordinator.submit("a", update("a", 1, 6.0, 1), 10)
        await coordinator.submit("c", update("c", 1, 2.0, 1), 10)
        assert await run == "all 1 rounds completed"
        assert torch.equal(coordinator.engine.strategy.state_dict()["w"], torch.full((2,), 4.0))
        assert payload_files(run_dir) == []

    scenario(crashed)
    assert payload_files(run_dir) == []  # 8-byte updates: their payloads are inline, in their rows
    db = sqlite3.connect(run_dir / "state.sqlite")
    with db:
        db.execute("UPDATE accepted_updates SET data = substr(data, 1, 4) WHERE client_id = 'a'")
    db.close()
    with caplog.at_level(logging.ERROR):
        scenario(resumed)
    where = re.escape(f"inline payload in {run_dir}/state.sqlite (the update of 'a' for round 1)")
    assert re.search(rf"resume: stored update dropped: {where}: its SHA-256 is [0-9a-f]{{64}}, the accepted update's",
                     caplog.text)


KILLED_AT_COMMIT = """
import os, signal, sys
from fedtune.fedserver.cli import main
from fedtune.fedserver.store import RunStore

commit = RunStore.save_update


def die_before_commit(self, update, wire_bytes, payload=None, group=False):
    # The injected fault: the server dies after the payload's fsync, before its metadata commit.
    if update.client_id == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(self, update, wire_bytes, payload, group)


RunStore.save_update = die_before_commit
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.e2e
def test_a_server_killed_between_payload_fsync_and_commit_loses_nothing_accepted(tmp_path: Path):
    config = run_config("fedavg_lora", rounds=1, partition={"scheme": "iid", "num_clients": 2},
                        train={"local_steps": 1, "batch_size": 8, "learning_rate": 3e-3, "eval_batch_size": 32})
    tokens = init_run(tmp_path / "run", 2)
    files = write_partitions(config, tmp_path)
    port = free_port()
    run_dir = tmp_path / "run"
    section = {"run_dir": str(run_dir), "port": port, "host": "127.0.0.1", "insecure": True, "min_clients": 2,
               "heartbeat_interval_s": 1.0, "client_timeout_s": 30.0, "long_poll_s": 2.0, "linger_s": 30.0}
    (tmp_path / "server.toml").write_text(toml({**{k: v for k, v in config.items() if k != "partition"},
                                                "server": section}))

    def start(command: list[str], resume: bool = False) -> Server:
        log = tmp_path / f"server-{len(_started)}.log"
        process = subprocess.Popen([*command, "start", "--config", str(tmp_path / "server.toml"),
                                    *(["--resume"] if resume else [])],
                                   stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV)
        _started.append(process)
        return Server(process, run_dir, log, port, tls=False)

    server = start([sys.executable, "-c", KILLED_AT_COMMIT, "client-001"])
    kept, victim = (in_process_client(server, tmp_path, f"client-00{i}", files[f"client-00{i}"], tokens[i])
                    for i in range(2))
    updates = []
    kept.register()
    victim.register()  # min_clients = 2: round 1 begins now
    for client in (kept, victim):
        instruction = pull_instruction(client, 1)
        updates.append(ClientUpdate(client_id=client.client_id, round=1, num_examples=1, tensors={
            name: tensor + 0.5 for name, tensor in instruction.tensors.items()}))
    assert kept.push(updates[0])
    pushed: list[bool] = []
    retrying = threading.Thread(target=lambda: pushed.append(victim.push(updates[1])))  # retries through the crash
    retrying.start()
    assert server.process.wait(120) == -signal.SIGKILL, server.output()[-3000:]
    files_then = payload_files(run_dir)
    [orphan] = [name for name in files_then if "-client-001-" in name]
    payload = sum(tensor.numel() * 4 for tensor in updates[1].tensors.values())
    assert (run_dir / PAYLOAD_DIR / orphan).stat().st_size == payload  # fsync'd whole, but never committed
    store = RunStore(run_dir / "state.sqlite", readonly=True)
    assert [stored.client_id for stored in store.stored_updates(1)] == ["client-000"]
    store.close()

    fedserver = str(Path(sys.executable).parent / "fedserver")
    [state_file] = (run_dir / STATE_DIR).iterdir()  # the initial state: round 1 never completed
    intact = state_file.read_bytes()
    state_file.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    refused = subprocess.run([fedserver, "start", "--config", str(tmp_path / "server.toml"), "--resume"],
                             capture_output=True, text=True, env=ENV, timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert re.search(r"the stored run is damaged and cannot be resumed: strategy state file .* its SHA-256 is",
                     refused.stderr), refused.stderr[-3000:]
    state_file.write_bytes(intact)

    server = start([fedserver], resume=True)
    retrying.join(120)
    assert pushed == [True]
    assert kept.run() == "all 1 rounds completed" and victim.run() == "all 1 rounds completed"
    assert server.wait(60) == 0, server.output()[-3000:]
    log = server.output()
    assert f"removed 1 payload file(s) of uploads that were never committed: ['{orphan}']" in log
    assert "round 1 continues with 1 of 2 updates already accepted" in log
    assert [(row["round"], row["clients"]) for row in server.metrics()] == [(0, 0), (1, 2)]
    assert payload_files(run_dir) == []  # the round committed: its payloads went with it


def test_loaded_updates_hold_no_file_descriptor_each(tmp_path: Path):
    """A round of thousands of light clients must not need thousands of open files."""
    store = RunStore(tmp_path / "state.sqlite")
    for client in range(50):
        store.save_update(mixed_update(f"c{client}", 1), wire_bytes=1)
    process = psutil.Process()
    before = process.num_fds()
    loaded = store.load_updates(1)
    assert len(loaded) == 50 and process.num_fds() <= before + 2


def test_the_strategy_state_is_a_file_of_its_own_checked_by_its_digest(tmp_path: Path):
    store = RunStore(tmp_path / "state.sqlite")
    store.save_initial_state({"w": torch.zeros(3)})
    for round in (1, 2):
        store.complete_round(round, {"w": torch.full((3,), float(round))}, {}, [])
    [state_file] = sorted((tmp_path / "state").iterdir())  # only the latest: the older ones went with their rows
    round, state = store.latest_state()
    assert round == 2 and torch.equal(state["w"], torch.full((3,), 2.0))
    db = sqlite3.connect(tmp_path / "state.sqlite")
    assert db.execute("SELECT round, file FROM strategy_states").fetchall() == [(2, state_file.name)]
    data = state_file.read_bytes()
    state_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptPayload, match=rf"strategy state file .*{state_file.name} \(after round 2\): its "
                                             r"SHA-256 is [0-9a-f]{64}, the committed state's was"):
        store.latest_state()


def resident_payload_bytes(pid: int, run_dir: Path) -> int:
    """The server's resident memory mapped from the run's payload files (its /proc smaps)."""
    total, mapped = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            mapped = len(fields) >= 6 and str(run_dir / PAYLOAD_DIR) in fields[5]
        elif mapped and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.e2e
@pytest.mark.skipif(not CAN_RELEASE, reason="pages are given back with Linux's MADV_PAGEOUT")
def test_accepted_updates_do_not_stay_resident_while_the_round_waits_and_still_aggregate(tmp_path: Path):
    """A round of large updates: each one's pages leave the server's memory once it is checked and
    stored, and aggregation reads them back from the files, bit for bit."""
    config = run_config("fedavg_lora", rounds=1, options={"rank": 1928})  # 2176 floats per rank: 16 MiB
    tokens = init_run(tmp_path / "run", 2)
    files = write_partitions(config, tmp_path)
    server = start_server(tmp_path, config, {"min_clients": 2, "insecure": True})
    clients = [in_process_client(server, tmp_path, f"client-00{i}", files[f"client-00{i}"], tokens[i]) for i in (0, 1)]
    for client in clients:
        client.register()
    updates = []
    for seed, client in enumerate(clients):
        instruction = pull_instruction(client, 1)
        generator = torch.Generator().manual_seed(seed)
        updates.append(ClientUpdate(client_id=client.client_id, round=1, num_examples=1, tensors={
            name: torch.randn(t.shape, generator=generator) for name, t in instruction.tensors.items()}))
    payload = sum(t.nbytes for t in updates[0].tensors.values())
    assert payload >= 16 * MiB
    assert clients[0].push(updates[0])
    assert len(payload_files(server.run_dir)) == 1  # stored, and the round waits for client-001
    # Checking it read every page; they were given back before the OK.
    assert resident_payload_bytes(server.process.pid, server.run_dir) < MiB
    assert clients[1].push(updates[1])
    assert all(client.run() == "all 1 rounds completed" for client in clients)
    assert server.wait(120) == 0, server.output()[-3000:]
    saved = server.global_model()
    for name, tensor in saved.items():
        mean = (updates[0].tensors[name].double() + updates[1].tensors[name].double()) / 2
        assert torch.equal(tensor, mean.float()), name
