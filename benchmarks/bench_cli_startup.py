"""Start-up time of the command-line tools: how long a user waits for `--help`, `--version`, a config error.

    .venv/bin/python benchmarks/bench_cli_startup.py [--repeats 7]

Each command runs `repeats` times as a fresh subprocess (the installed console scripts next to this
interpreter); the median wall time is reported, and its ratio to `python -c pass` (the interpreter's
own start-up, which no CLI can beat). Commands that are meant to fail (a config error) must fail
with exit status 2 and the field named on stderr; any other unexpected status is reported instead
of a time, so a broken command is never timed as a fast one.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def commands(scratch: Path) -> list[tuple[str, list[str], int]]:
    """(label, argv, expected exit status) for each measured command."""
    bad = scratch / "bad.toml"
    bad.write_text('strategy = "ffa_lora"\n[train]\nbatch_sise = 4\n')
    bad_options = scratch / "bad_options.toml"  # the strategy's own options: its module (and torch) must load
    bad_options.write_text('strategy = "ffa_lora"\n[options]\nrank = "four"\n')
    return [
        ("python -c pass", [sys.executable, "-c", "pass"], 0),
        ("fedsim --help", [str(BIN / "fedsim"), "--help"], 0),
        ("fedsim --version", [str(BIN / "fedsim"), "--version"], 0),
        ("fedsim run --help", [str(BIN / "fedsim"), "run", "--help"], 0),
        ("fedsim strategies", [str(BIN / "fedsim"), "strategies"], 0),
        ("fedsim run bad.toml (config error)", [str(BIN / "fedsim"), "run", str(bad), "--out", str(scratch)], 2),
        ("fedsim run bad_options.toml (error in [options])",
         [str(BIN / "fedsim"), "run", str(bad_options), "--out", str(scratch)], 2),
        ("fedserver --help", [str(BIN / "fedserver"), "--help"], 0),
        ("fedserver --version", [str(BIN / "fedserver"), "--version"], 0),
        ("fedserver start --help", [str(BIN / "fedserver"), "start", "--help"], 0),
        ("fedserver start --config bad.toml (config error)",
         [str(BIN / "fedserver"), "start", "--config", str(bad), "--run-dir", str(scratch)], 2),
        ("fedclient --help", [str(BIN / "fedclient"), "--help"], 0),
        ("fedclient --version", [str(BIN / "fedclient"), "--version"], 0),
        ("fedclient join --help", [str(BIN / "fedclient"), "join", "--help"], 0),
    ]


def median_seconds(argv: list[str], expected: int, repeats: int) -> float | str:
    """Median wall time of `repeats` runs, or why the command cannot be timed."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if result.returncode != expected:
            last_line = (result.stderr.strip().splitlines() or [""])[-1]
            return f"exit {result.returncode} (expected {expected}): {last_line[:120]}"
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs per command (median reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = [(label, median_seconds(argv, expected, args.repeats))
                   for label, argv, expected in commands(Path(scratch))]
    baseline = results[0][1]
    assert isinstance(baseline, float), baseline
    print("| command | median | × `python -c pass` |\n| --- | ---: | ---: |")
    for label, seconds in results:
        if isinstance(seconds, float):
            print(f"| `{label}` | {seconds:.3f} s | {seconds / baseline:.1f} |")
        else:
            print(f"| `{label}` | {seconds} | — |")


if __name__ == "__main__":
    main()
