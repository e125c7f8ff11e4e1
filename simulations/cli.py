"""`fedsim`: a simulated federation on this machine.

  fedsim run [CONFIG.toml] --out DIR [--rounds N] [--set SECTION.FIELD=VALUE ...]   run one
  fedsim config [CONFIG.toml] [--set ...]   the config a run would use: every section and field, as TOML
  fedsim strategies                         the strategies and wrappers a config can name
"""

# Only light modules are imported up front: torch, transformers and the config models load when a
# command needs them, so `--help`, `--version` and `fedsim strategies` answer at once.
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.strategies import catalog
from fedtune.strategies.cli_options import add_set_option, add_version_option

if TYPE_CHECKING:
    from fedtune.simulations.config import SimulationConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run a simulated federation", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a simulated federation; outputs (metrics, global adapter, resolved config.json) go to --out.",
        epilog=f"{catalog.listing()}\n\nEvery config section and field, with its default and meaning: `fedsim config`\n"
               "(`fedsim config --set strategy=NAME` shows that strategy's [options]).")
    config = commands.add_parser("config", help="print the config a run would use, every field commented, as TOML")
    for command in (run, config):
        command.add_argument("config", nargs="?", type=Path, help="TOML config; default: the built-in demo")
        add_set_option(command)
    run.add_argument("--out", type=Path, default=Path("runs/fedsim"), help="output directory")
    run.add_argument("--rounds", type=int, help="override the config's round count (as --set rounds=N)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    commands.add_parser("strategies", help="list the strategies and wrappers a config can name")
    args = parser.parse_args(argv)
    if args.command == "strategies":
        print(catalog.listing())
        return 0

    from fedtune.simulations.config import SimulationConfig
    from fedtune.strategies.runconfig import ConfigError, load_run_config

    rounds = getattr(args, "rounds", None)
    try:
        resolved = load_run_config(SimulationConfig, args.config, {} if rounds is None else {"rounds": rounds},
                                   args.set)
    except ConfigError as error:
        print(f"fedsim: {error}", file=sys.stderr)
        return 2
    if args.command == "config":
        from fedtune.strategies.config_toml import commented_toml

        print(commented_toml(resolved), end="")
        return 0
    return _run(resolved, args.out, args.quiet)


def _run(config: SimulationConfig, out: Path, quiet: bool) -> int:
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # raised inside peft
    from fedtune.simulations.runner import run_simulation
    from fedtune.strategies.runconfig import ConfigError
    from fedtune.tasks.data import DataError
    from fedtune.tasks.models import ModelLoadError

    try:
        history = run_simulation(config, out, show_progress=not quiet)
    except (ConfigError, DataError, ModelLoadError) as error:
        print(f"fedsim: {error}", file=sys.stderr)
        return 2
    first, last = history[0], history[-1]
    print(
        f"fedsim: {config.strategy}, {len(history) - 1} rounds: eval accuracy "
        f"{first.eval_accuracy:.3f} -> {last.eval_accuracy:.3f}, eval loss {first.eval_loss:.3f} -> "
        f"{last.eval_loss:.3f}; bytes up {sum(m.bytes_up for m in history):,}, "
        f"down {sum(m.bytes_down for m in history):,}; outputs in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
