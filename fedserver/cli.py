"""`fedserver`: not built yet (issue 3, the gRPC transport). Use `fedsim` for simulated federations."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("fedserver: the gRPC transport is not built yet; run simulated federations with 'fedsim run'.", file=sys.stderr)
    return 2
