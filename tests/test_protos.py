"""The committed generated modules are exactly what `python -m protos.generate` writes from the .proto."""

from __future__ import annotations

from pathlib import Path

from protos.generate import ROOT, generate

GENERATED = ("fedtune_pb2.py", "fedtune_pb2.pyi", "fedtune_pb2_grpc.py")


def test_regenerating_gives_the_committed_files(tmp_path: Path):
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `python -m protos.generate`"


def test_service_is_versioned():
    from protos import fedtune_pb2

    service = fedtune_pb2.DESCRIPTOR.services_by_name["Federation"]
    assert service.full_name == "fedtune.v1.Federation"
    assert {m.name for m in service.methods} == {"Register", "PullInstruction", "PushUpdate", "Heartbeat", "Leave"}
