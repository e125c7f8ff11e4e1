"""A hostile enrolled client over real gRPC on loopback: each abuse gets its documented status, the
server frees what the abuse made it hold, and a good client's round still completes.

One fedserver process serves the whole module, a round per test (two for the first): the
test-driven client (`mallory`) abuses the round, then sends its valid update, and the round must
close with the good `fedclient` device's update too. A test that fails mid-round leaves its round
open; the next test simply continues that round (mallory pulls the same instruction again).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import psutil
import pytest
import torch

from fedtune.fedclient.client import FederatedClient
from fedtune.fedclient.connection import FederationStub
from fedtune.fedserver.store import RunStore
from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.payload import update_messages
from fedtune.strategies.api import ClientUpdate
from tests.test_transport import (
    MiB,
    Server,
    in_process_client,
    init_run,
    run_config,
    start_client,
    start_server,
    stored,
    wait_until,
    write_partitions,
)

pytestmark = pytest.mark.e2e  # a real server process and a real client process on loopback
IDLE_MS = 1000  # the server's limits.upload_idle_ms: short, so that a stalled upload ends within seconds
UPLOADS = 2  # limits.max_uploads_per_client, as set explicitly
MAX_EXAMPLES = 1000  # limits.max_num_examples
GiB = 1024 * MiB  # the default limits.max_update_bytes
HUGE = "x" * 100_000  # a 100 KB string from the client: echoed whole, it would exceed gRPC's metadata limit


@dataclass
class Hostile:
    """The module's server, its good device, and mallory: a registered client the test drives over a raw stub."""

    server: Server
    mallory: FederatedClient
    stub: FederationStub  # fedclient's: it encodes the DataChunks update_messages yields
    auth: tuple[tuple[str, str], ...]

    def open_round(self) -> ClientUpdate:
        """Mallory's valid update for the round now open (its instruction's tensors sent back)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, instruction = self.mallory.pull()
            if status.kind == pb.PullStatus.INSTRUCTION:
                return ClientUpdate(client_id="mallory", round=status.round, num_examples=10,
                                    tensors=instruction.tensors)
            assert status.kind == pb.PullStatus.WAIT, status
        raise AssertionError("mallory got no instruction")

    def header(self, update: ClientUpdate, **fields) -> pb.ClientUpdate:
        """A stream header for `update`'s round, with `fields` overriding the valid one's."""
        return pb.ClientUpdate(**{"client_id": "mallory", "round": update.round, "num_examples": 1, **fields})

    def push(self, messages: list[pb.UpdateMessage]) -> pb.PushReply:
        return self.stub.PushUpdate(iter(messages), metadata=self.auth, timeout=30)

    def refused(self, code: grpc.StatusCode, pattern: str, messages: list[pb.UpdateMessage]) -> None:
        """Push `messages`; the call must fail with `code` and a short status matching `pattern`."""
        with pytest.raises(grpc.RpcError) as caught:
            self.push(messages)
        details = caught.value.details()
        assert caught.value.code() == code, details
        assert re.search(pattern, details), details
        assert len(details.encode()) <= 1200, f"a {len(details.encode())}-byte status"

    def finish_round(self, update: ClientUpdate) -> None:
        """Mallory's valid update is accepted and the round closes: the good device's update got in too."""
        payload = sum(t.numel() * t.element_size() for t in update.tensors.values())
        assert self.push(list(update_messages(update, 16 * 1024))).payload_bytes == payload
        wait_until(lambda: any(r.round == update.round and r.status == "done"
                               for r in stored(self.server.run_dir, RunStore.rounds)),
                   120, f"round {update.round} to close", self.server)
        assert "internal error" not in self.server.output()

    def rss(self) -> int:
        return psutil.Process(self.server.process.pid).memory_info().rss


class HeldUpload:
    """A PushUpdate stream kept open: a header, then a small chunk every 0.1 s (never idle) until cancelled."""

    def __init__(self, hostile: Hostile, header: pb.ClientUpdate):
        self._stop = threading.Event()
        self.call = hostile.stub.PushUpdate.future(self._messages(header), metadata=hostile.auth, timeout=60)

    def _messages(self, header: pb.ClientUpdate) -> Iterator[pb.UpdateMessage]:
        yield pb.UpdateMessage(header=header)
        while not self._stop.wait(0.1):
            yield pb.UpdateMessage(data=bytes(1024))

    def cancel(self) -> None:
        self._stop.set()
        self.call.cancel()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Iterator[Hostile]:
    tmp = tmp_path_factory.mktemp("hostile")
    config = run_config("fedavg_lora", rounds=6)  # a round for each test below, two for the first
    tokens = init_run(tmp / "run", 2)
    files = write_partitions(config, tmp)
    server = start_server(tmp, config, {"min_clients": 2, "insecure": True}, limits={
        "upload_idle_ms": IDLE_MS, "max_uploads_per_client": UPLOADS, "max_num_examples": MAX_EXAMPLES})
    good = start_client(server, tmp, "client-good", files["client-000"], tokens[0])
    mallory = in_process_client(server, tmp, "mallory", files["client-001"], tokens[1])
    mallory.register()
    channel = grpc.insecure_channel(server.address)
    yield Hostile(server, mallory, FederationStub(channel), (("authorization", f"Bearer {tokens[1]}"),))
    channel.close()
    mallory.close()
    for process in (good, server.process):
        process.kill()
        process.wait()


def test_a_client_gets_at_most_max_uploads_per_client_streams_and_every_ending_frees_its_slot(hostile: Hostile):
    def held(update: ClientUpdate) -> pb.ClientUpdate:
        return hostile.header(update, tensors=[pb.Tensor(name="held", dtype="float32", shape=[MiB // 4])])

    def while_holding(count: int, update: ClientUpdate, check: Callable[[], object]) -> None:
        """Run `check` while `count` streams are open (given time to reach the server), then cancel them."""
        holders = [HeldUpload(hostile, held(update)) for _ in range(count)]
        time.sleep(1.0)
        try:
            assert not any(holder.call.done() for holder in holders), [h.call.exception() for h in holders]
            check()
        finally:
            for holder in holders:
                holder.cancel()
        time.sleep(0.5)  # the cancellations reach the server

    def one_too_many(update: ClientUpdate) -> None:
        hostile.refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        rf"'mallory' already has {UPLOADS} upload streams open, the limit "
                        rf"max_uploads_per_client={UPLOADS}",
                        [pb.UpdateMessage(header=held(update))])

    valid = hostile.open_round()
    while_holding(UPLOADS, valid, lambda: one_too_many(valid))
    # Cancelled, refused and failed streams all let go of their slots: with one stream open, one is still free
    # (a header alone, given a slot, ends early: DATA_LOSS).
    while_holding(UPLOADS - 1, valid, lambda: hostile.refused(grpc.StatusCode.DATA_LOSS, "truncated",
                                                              [pb.UpdateMessage(header=held(valid))]))
    hostile.finish_round(valid)
    # So did the accepted upload: in the next round, all the slots are free again.
    valid = hostile.open_round()
    while_holding(UPLOADS, valid, lambda: one_too_many(valid))
    hostile.finish_round(valid)


def test_a_stalled_upload_is_cancelled_after_upload_idle_ms_and_its_file_removed(hostile: Hostile):
    valid = hostile.open_round()
    size = 96 * MiB
    header = hostile.header(valid, tensors=[pb.Tensor(name="big", dtype="float32", shape=[size // 4])])
    chunk = bytes(2 * MiB)  # the default limits.chunk_bytes
    stalled, release = threading.Event(), threading.Event()
    payloads = hostile.server.run_dir / "updates"

    def written() -> int:
        """Bytes in mallory's payload files (the good device's accepted update has its own): the server
        writes an upload's chunks to its file as they arrive."""
        sizes = []
        for path in payloads.glob("*-mallory-*.payload"):
            with contextlib.suppress(FileNotFoundError):
                sizes.append(path.stat().st_size)
        return sum(sizes)

    def stalling() -> Iterator[pb.UpdateMessage]:
        """The header and 7/8 of the data (so the server really holds it), then silence."""
        yield pb.UpdateMessage(header=header)
        for _ in range(size * 7 // 8 // len(chunk)):
            yield pb.UpdateMessage(data=chunk)
        stalled.set()
        release.wait(60)

    before = hostile.rss()
    call = hostile.stub.PushUpdate.future(stalling(), metadata=hostile.auth, timeout=60)
    try:
        assert stalled.wait(30), "the client could not send its data"
        silent_since = time.monotonic()
        wait_until(lambda: written() >= size * 7 // 8 or call.done(), 10, "the server to write the data")
        assert written() >= size * 7 // 8, "the server never wrote the upload, so this test shows nothing"
        assert hostile.rss() < before + size // 2, "the upload is held in memory, not only in its file"
        error = call.exception(timeout=15)
        took = time.monotonic() - silent_since
    finally:
        release.set()
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert f"no message for {IDLE_MS} ms, the limit upload_idle_ms={IDLE_MS}" in error.details()
    assert IDLE_MS / 1000 - 0.2 < took < IDLE_MS / 1000 + 5, took
    wait_until(lambda: written() == 0, 5, "the server to remove the stalled upload's file")
    hostile.finish_round(valid)


def test_client_strings_echoed_in_a_status_are_cut_so_the_documented_code_arrives(hostile: Hostile):
    valid = hostile.open_round()
    cut = r"\.\.\. \(length 100000\)"

    def header_only(**fields) -> list[pb.UpdateMessage]:
        return [pb.UpdateMessage(header=hostile.header(valid, **fields))]

    hostile.refused(grpc.StatusCode.INVALID_ARGUMENT, rf"\['t'\]\.dtype: unknown dtype 'x+{cut}",
                    header_only(tensors=[pb.Tensor(name="t", dtype=HUGE, shape=[1])]))
    hostile.refused(grpc.StatusCode.RESOURCE_EXHAUSTED, r"name is 100000 bytes, over the limit max_name_bytes=512",
                    header_only(tensors=[pb.Tensor(name=HUGE, dtype="float32", shape=[1])]))
    hostile.refused(grpc.StatusCode.RESOURCE_EXHAUSTED, r"ClientUpdate\.metrics .*max_name_bytes=512",
                    header_only(metrics={HUGE: 1.0}))
    hostile.refused(grpc.StatusCode.PERMISSION_DENIED, rf"ClientUpdate\.client_id: 'x+{cut} is not this client's id",
                    header_only(client_id=HUGE))
    # Many short echoes add up: the strategy names each of 1000 unexpected tensors; the status is capped whole.
    extra = {f"extra-{i:04d}-" + "y" * 480: torch.zeros(0) for i in range(1000)}
    flooded = valid.model_copy(update={"tensors": {**valid.tensors, **extra}})
    hostile.refused(grpc.StatusCode.INVALID_ARGUMENT, r"unexpected tensor\(s\).*message cut from \d+ bytes",
                    list(update_messages(flooded, 16 * 1024)))
    hostile.finish_round(valid)


def test_absurd_shapes_are_refused_by_size_before_anything_is_allocated(hostile: Hostile):
    valid = hostile.open_round()

    def shaped(*shape: int) -> list[pb.UpdateMessage]:
        tensors = [pb.Tensor(name="w", dtype="float32", shape=list(shape))]
        return [pb.UpdateMessage(header=hostile.header(valid, tensors=tensors))]

    over = (r"ClientUpdate\.tensors\['w'\]\.shape: \[.* of 4-byte elements: at least \d+ bytes is over the limit "
            rf"max_update_bytes={GiB}")
    for shape in ([2**62, 2**62], [2**63 - 1], [2**62, 2**62, 0], [2**31] * 40):
        hostile.refused(grpc.StatusCode.RESOURCE_EXHAUSTED, over, shaped(*shape))
    hostile.refused(grpc.StatusCode.INVALID_ARGUMENT, r"\['w'\]\.shape: negative dimension in \[-1, 4\]",
                    shaped(-1, 4))
    hostile.finish_round(valid)


def test_an_update_claiming_more_than_max_num_examples_is_refused(hostile: Hostile):
    valid = hostile.open_round()
    header = hostile.header(valid, num_examples=MAX_EXAMPLES + 1)
    hostile.refused(grpc.StatusCode.INVALID_ARGUMENT,
                    rf"ClientUpdate\.num_examples: {MAX_EXAMPLES + 1}, over the limit max_num_examples={MAX_EXAMPLES}",
                    [pb.UpdateMessage(header=header)])
    hostile.finish_round(valid.model_copy(update={"num_examples": MAX_EXAMPLES}))  # the limit itself is fine


BURST = 5000


def test_a_burst_of_thousands_of_calls_is_answered_none_dropped(hostile: Hostile):
    """gRPC core holds arrived calls until grpc.aio takes them, one per event-loop turn, and by default
    drops those past 1,000 waiting as CANCELLED, with no details, before any handler runs. Thousands of
    devices do call at once (all pulling as one group commit acknowledges their updates): each must get
    its answer, here UNAUTHENTICATED for a forged token."""
    async def burst() -> Counter[str]:
        async with grpc.aio.insecure_channel(hostile.server.address) as channel:
            heartbeat = channel.unary_unary("/fedtune.v1.Federation/Heartbeat",
                                            request_serializer=pb.HeartbeatRequest.SerializeToString,
                                            response_deserializer=pb.HeartbeatReply.FromString)
            forged = (("authorization", "Bearer forged"),)
            replies = await asyncio.gather(*(heartbeat(pb.HeartbeatRequest(), metadata=forged, timeout=120)
                                             for _ in range(BURST)), return_exceptions=True)
        return Counter(reply.code().name if isinstance(reply, grpc.aio.AioRpcError) else type(reply).__name__
                       for reply in replies)

    assert asyncio.run(burst()) == Counter({"UNAUTHENTICATED": BURST})
