"""`fedsim`: a simulated federation on this machine.

  fedsim run [CONFIG.toml] --out DIR [--rounds N] [--set SECTION.FIELD=VALUE ...]   run one
  fedsim run [CONFIG.toml] --out DIR --resume   continue an interrupted run after its last completed round
  fedsim run [CONFIG.toml] --out DIR --ray-address HOST:PORT   run the clients on a Ray cluster's nodes
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
from typing import TYPE_CHECKING, Any

from fedtune.strategies import catalog
from fedtune.strategies.cli_options import add_set_option, add_version_option

if TYPE_CHECKING:
    from fedtune.simulations.config import SimulationConfig
    from fedtune.tasks.adapter_export import ExportMethod


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
    run.add_argument("--ray-address", metavar="HOST:PORT",
                     help="run the clients on the Ray cluster whose head is at HOST:PORT, one actor per node (as "
                          "--set backend=ray --set ray_address=HOST:PORT; needs `pip install 'fedtune[ray]'`)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out after its last completed round (its checkpoint.pt); the config "
                          "must be the run's (without CONFIG, the checkpointed one is used)")
    commands.add_parser("strategies", help="list the strategies and wrappers a config can name")
    export = commands.add_parser("export-adapter", help="write a LoRA adapter again at a smaller rank, for a small "
                                                        "device (a PEFT adapter directory)")
    export.add_argument("adapter", type=Path, help="the adapter directory, e.g. runs/fedsim/global")
    export.add_argument("--rank", type=int, required=True, help="the rank to keep")
    export.add_argument("--method", choices=["svd", "truncate"], default="svd",
                        help="svd (default): the best rank-k approximation of each module's update; truncate: its "
                             "first k components (for nested-rank adapters)")
    export.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    if args.command == "strategies":
        print(catalog.listing())
        return 0
    if args.command == "export-adapter":
        return _export(args.adapter, args.rank, args.method, args.out)

    from fedtune.simulations.config import SimulationConfig
    from fedtune.strategies.runconfig import ConfigError, load_run_config

    rounds = getattr(args, "rounds", None)
    overrides: dict[str, Any] = {} if rounds is None else {"rounds": rounds}
    if ray_address := getattr(args, "ray_address", None):
        overrides.update(backend="ray", ray_address=ray_address)
    resume = getattr(args, "resume", False)
    try:
        if resume and args.config is None:
            resolved = _checkpointed_config(args.out, overrides, args.set)
        else:
            resolved = load_run_config(SimulationConfig, args.config, overrides, args.set)
    except ConfigError as error:
        print(f"fedsim: {error}", file=sys.stderr)
        return 2
    if args.command == "config":
        from fedtune.strategies.config_toml import commented_toml

        print(commented_toml(resolved), end="")
        return 0
    return _run(resolved, args.out, args.quiet, resume)


def _export(adapter: Path, rank: int, method: ExportMethod, out: Path) -> int:
    from fedtune.tasks.adapter_export import ExportError, export_adapter

    try:
        report = export_adapter(adapter, rank, method, out)
    except ExportError as error:
        print(f"fedsim: {error}", file=sys.stderr)
        return 2
    print(f"fedsim: {report.modules} LoRA modules from rank {report.rank_from} to {report.rank_to} ({method}); "
          f"relative error of the update {report.relative_error:.4f}; adapter in {out}")
    return 0


def _checkpointed_config(out: Path, overrides: dict[str, Any], assignments: list[str]) -> SimulationConfig:
    """The config of the run checkpointed in `out`, with this command's overrides (which --resume then checks)."""
    from fedtune.simulations.checkpoint import CHECKPOINT_FILE, load_checkpoint
    from fedtune.simulations.config import SimulationConfig
    from fedtune.strategies.runconfig import parse_run_config

    stored = load_checkpoint(out).config
    return parse_run_config(SimulationConfig, stored, str(out / CHECKPOINT_FILE), None, overrides, assignments)


def _run(config: SimulationConfig, out: Path, quiet: bool, resume: bool) -> int:
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # raised inside peft
    from fedtune.simulations.runner import run_simulation
    from fedtune.strategies.runconfig import ConfigError
    from fedtune.tasks.data import DataError
    from fedtune.tasks.models import ModelLoadError
    from fedtune.tasks.threads import apply_threads

    apply_threads(config.process_threads())  # before torch does any work; forked workers set their own
    try:
        history = run_simulation(config, out, show_progress=not quiet, resume=resume)
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
