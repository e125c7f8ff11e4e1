"""Fuzzing the wire: the payload decoder in process, then a live fedserver over gRPC.

Every generated input must end in a documented outcome: an accepted message, or a PayloadError /
gRPC status from the proto's "Errors" list, never another exception, INTERNAL or UNKNOWN. The suite
runs a small budget (hypothesis profile `ci`, tests/conftest.py); the long run is by hand:

    .venv/bin/python -m pytest tests/test_fuzz.py --hypothesis-profile=fuzz-long -p no:cacheprovider

(10,000 examples per test; its latest result is in benchmarks/README.md, "Fuzzing".)
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedtune.protos import fedtune_pb2 as pb
from fedtune.protos.limits import Limits
from fedtune.protos.payload import PayloadError, PayloadReader, update_from_stream
from tests.test_transport import Server, init_run, run_config, start_server, wait_until

LIMITS = Limits(chunk_bytes=4096, max_message_bytes=128 * 1024, max_update_bytes=1 << 20, max_tensors=8,
                max_metrics=8, max_name_bytes=64)
DOCUMENTED = {  # protos/fedtune.proto, "Errors"
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]

SEEN: Counter[str] = Counter()  # status codes the live server answered, printed at the end (pytest -s)

dimensions = st.one_of(st.integers(0, 64), st.integers(-(2**63), 2**63 - 1))
tensor_headers = st.builds(
    pb.Tensor,
    name=st.one_of(st.text(max_size=80), st.sampled_from(["w", "lora_A", "w\n"])),
    dtype=st.one_of(st.sampled_from(DTYPES), st.text(max_size=12)),
    shape=st.lists(dimensions, max_size=4),
    data=st.one_of(st.just(b""), st.binary(max_size=16)),
)
update_headers = st.builds(
    pb.ClientUpdate,
    client_id=st.one_of(st.just("client-000"), st.text(max_size=80)),
    round=st.integers(-(2**63), 2**63 - 1),
    num_examples=st.integers(-(2**63), 2**63 - 1),
    tensors=st.lists(tensor_headers, max_size=10),
    metrics=st.dictionaries(st.text(max_size=70), st.floats(allow_nan=True, allow_infinity=True), max_size=10),
)


@st.composite
def update_streams(draw: st.DrawFn) -> list[pb.UpdateMessage]:
    """A header, data, then a digest: each part may be missing, repeated, out of order, wrong or right."""
    header = draw(update_headers)
    chunks = draw(st.lists(st.binary(max_size=5000), max_size=4))
    digest = draw(st.one_of(st.just(hashlib.sha256(b"".join(chunks)).digest()), st.binary(max_size=40)))
    parts = [pb.UpdateMessage(header=header), *(pb.UpdateMessage(data=chunk) for chunk in chunks),
             pb.UpdateMessage(sha256=digest)]
    if draw(st.booleans()):  # a mangled order: a part dropped, duplicated or moved
        parts = draw(st.permutations(parts + [draw(st.sampled_from(parts))]))[:draw(st.integers(0, len(parts) + 1))]
    return parts


@given(update_streams())
def test_the_payload_decoder_ends_every_stream_in_a_message_or_a_documented_error(parts):
    reader = PayloadReader("ClientUpdate", LIMITS, LIMITS.max_update_bytes)
    try:
        for part in parts:
            reader.feed(part)
        if reader.header is not None:
            update_from_stream(reader)
    except PayloadError as error:
        assert error.code in DOCUMENTED, (error.code, str(error))
        assert len(str(error)) < 2048, "an error message must stay short whatever the input"


# -- a live server -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_server(tmp_path_factory) -> Iterator[tuple[Server, str]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    token, = init_run(tmp / "run", 1)
    server = start_server(tmp, run_config("fedavg_lora", rounds=1), {"insecure": True, "min_clients": 1},
                          limits=LIMITS.model_dump())
    register_the_fuzzing_client(server, token)  # so update streams get past NOT_FOUND to the decoder
    yield server, token
    print(f"\nlive-server fuzz: {sum(SEEN.values())} calls, status codes {dict(SEEN.most_common())}")
    server.process.kill()
    server.process.wait()


def register_the_fuzzing_client(server: Server, token: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        wait_until(lambda: Path(server.run_dir / "endpoint.json").exists(), 60, "the server", server)
        request = pb.RegisterRequest(protocol_version=1, name="client-000", profile=pb.DeviceProfile())
        raw_call(channel, "Register", False)(request.SerializeToString(), metadata=(
            ("authorization", f"Bearer {token}"),), timeout=30)


def raw_call(channel: grpc.Channel, method: str, streaming: bool):
    """A call whose request bytes go on the wire exactly as given (no client-side serialization)."""
    path = f"/fedtune.v1.Federation/{method}"
    if streaming:
        return channel.stream_unary(path, request_serializer=bytes, response_deserializer=bytes)
    return channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)


@pytest.mark.e2e
@given(st.sampled_from(["Register", "Heartbeat", "PushUpdate"]), st.lists(st.binary(max_size=300), min_size=1,
                                                                          max_size=3))
def test_a_live_server_answers_garbage_with_documented_statuses(live_server, method, requests):
    """(Not Leave: its one field is a free-text reason, so almost any bytes are a valid Leave, which would
    end the fuzzing client's part in the run.)"""
    server, token = live_server
    outcomes = fuzz_calls(server, token, method, requests)
    assert set(outcomes) <= DOCUMENTED | {grpc.StatusCode.OK}, outcomes


@pytest.mark.e2e
@given(update_streams())
def test_a_live_server_answers_every_update_stream_with_a_documented_status(live_server, parts):
    server, token = live_server
    outcomes = fuzz_calls(server, token, "PushUpdate", [part.SerializeToString() for part in parts])
    assert set(outcomes) <= DOCUMENTED, outcomes


def fuzz_calls(server: Server, token: str, method: str, requests: list[bytes]) -> Counter[grpc.StatusCode]:
    metadata = (("authorization", f"Bearer {token}"),)
    outcomes: Counter[grpc.StatusCode] = Counter()
    with grpc.insecure_channel(server.address) as channel:
        wait_until(lambda: Path(server.run_dir / "endpoint.json").exists(), 60, "the server", server)
        try:
            if method == "PushUpdate":
                raw_call(channel, method, True)(iter(requests), metadata=metadata, timeout=10)
            else:
                raw_call(channel, method, False)(requests[0], metadata=metadata, timeout=10)
            outcomes[grpc.StatusCode.OK] += 1
        except grpc.RpcError as error:
            outcomes[error.code()] += 1
    assert server.process.poll() is None, f"the server died:\n{server.output()[-3000:]}"
    SEEN.update(code.name for code in outcomes.elements())
    return outcomes
