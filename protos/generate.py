"""Regenerate the Python modules from fedtune.proto: `python -m fedtune.protos.generate`.

The generated files are committed so that `pip install` yields importable modules without a
protoc step; tests/test_protos.py fails if they drift from the .proto. The proto is compiled as
`fedtune/protos/fedtune.proto`, so the generated gRPC module imports `fedtune.protos.fedtune_pb2`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
GENERATED = ("fedtune_pb2.py", "fedtune_pb2.pyi", "fedtune_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Write the three generated modules into `out_dir`."""
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "src" / "fedtune" / "protos"
        source.mkdir(parents=True)
        shutil.copy(HERE / "fedtune.proto", source / "fedtune.proto")
        built = Path(scratch) / "out"
        built.mkdir()
        args = ["protoc", f"-I{Path(scratch) / 'src'}", f"--python_out={built}", f"--pyi_out={built}",
                f"--grpc_python_out={built}", "fedtune/protos/fedtune.proto"]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed on fedtune.proto")
        for name in GENERATED:
            shutil.copy(built / "fedtune" / "protos" / name, out_dir / name)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    from fedtune.protos.runspec import write_schema  # imports the strategies (and torch) to read their options

    write_schema()
