"""`fedsim run [CONFIG.toml] --out DIR [--rounds N]`: a simulated federation on this machine."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from fedtune.simulations.config import ConfigError, load_config
from fedtune.tasks.data import DataError
from fedtune.tasks.models import ModelLoadError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a simulated federation")
    run.add_argument("config", nargs="?", type=Path, help="TOML config; defaults to the built-in demo")
    run.add_argument("--out", type=Path, default=Path("runs/fedsim"), help="output directory")
    run.add_argument("--rounds", type=int, help="override the config's round count")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # raised inside peft

    from fedtune.simulations.runner import run_simulation

    overrides = {"rounds": args.rounds} if args.rounds is not None else {}
    try:
        config = load_config(args.config, overrides)
        history = run_simulation(config, args.out, show_progress=not args.quiet)
    except (ConfigError, DataError, ModelLoadError) as error:
        print(f"fedsim: {error}", file=sys.stderr)
        return 2
    first, last = history[0], history[-1]
    print(
        f"fedsim: {config.strategy}, {len(history) - 1} rounds: eval accuracy "
        f"{first.eval_accuracy:.3f} -> {last.eval_accuracy:.3f}, eval loss {first.eval_loss:.3f} -> "
        f"{last.eval_loss:.3f}; bytes up {sum(m.bytes_up for m in history):,}, "
        f"down {sum(m.bytes_down for m in history):,}; outputs in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
