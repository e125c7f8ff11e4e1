"""The committed generated modules are exactly what `python -m fedtune.protos.generate` writes from the .proto."""

from __future__ import annotations

from pathlib import Path

from fedtune.protos.generate import GENERATED, HERE, generate


def test_regenerating_gives_the_committed_files(tmp_path: Path):
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (HERE / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `python -m fedtune.protos.generate`"


def test_service_is_versioned():
    from fedtune.protos import fedtune_pb2

    service = fedtune_pb2.DESCRIPTOR.services_by_name["Federation"]
    assert service.full_name == "fedtune.v1.Federation"
    assert {m.name for m in service.methods} == {"Register", "PullInstruction", "PushUpdate", "Heartbeat", "Leave"}
