"""`fedclient join --server HOST:PORT --data PATH [--token-file F] [--ca CA.pem [--cert C.pem --key C.key] |
--insecure] [--model PATH]`: take part in a fedtune federation from this device, with its own data.

The enrollment token comes from --token-file, or the FEDTUNE_TOKEN environment variable; --token
works too, but other users of the machine can read a command line (ps)."""

# Only light modules are imported up front (grpc, torch and rich load when a client joins), so
# `--help` and `--version` answer at once.
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.strategies.cli_options import add_version_option
from fedtune.strategies.definition import DeviceProfile

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

MiB = 1 << 20
GIVE_UP_AFTER_S = 300.0  # an unreachable server is a mistake to report soon, not an outage to ride out for hours
MAX_BACKOFF_S = 10.0
TOKEN_VARIABLE = "FEDTUNE_TOKEN"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedclient", description=__doc__)
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    join = commands.add_parser("join", help="join a run and train until it ends")
    join.add_argument("--server", required=True, help="HOST:PORT of the fedserver")
    join.add_argument("--data", type=Path, required=True,
                      help="this device's examples (jsonl/json/csv/tsv or a folder), or builtin:ops to try a run: "
                           "the whole built-in task (4,000 examples, all four families), the same on every client")
    join.add_argument("--eval-data", type=Path, help="this device's evaluation examples for federated evaluation "
                      "(default: a held-out share of --data, evaluation.client_fraction)")
    token = join.add_mutually_exclusive_group()
    token.add_argument("--token-file", type=Path,
                       help=f"file holding the enrollment token (from the server operator; default: the "
                            f"{TOKEN_VARIABLE} environment variable); remembered in the state file")
    token.add_argument("--token", help="the enrollment token itself: visible to other users of this machine (ps), "
                                       f"so prefer --token-file or {TOKEN_VARIABLE}")
    join.add_argument("--ca", type=Path, help="the run's CA certificate (PEM), to verify the server")
    join.add_argument("--cert", type=Path, help="this client's certificate (PEM), for a server that requires one "
                                                "(mutual TLS; from the operator's `fedserver init --mtls`)")
    join.add_argument("--key", type=Path, help="the private key (PEM) of --cert")
    join.add_argument("--insecure", action="store_true", help="plaintext gRPC (only for a server started --insecure)")
    join.add_argument("--model", help="the base model here, when the server's model.path is not valid on this device: "
                                      "a directory, a .gguf file or a hub id in the local Hugging Face cache")
    join.add_argument("--device", choices=("cpu", "cuda", "auto"),
                      help="where this device trains (default: the run's model.device)")
    join.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS when set, else this "
                                                  "machine's cores)")
    join.add_argument("--name", default="", help="client id to ask for on first registration (e.g. client-000)")
    join.add_argument("--state", type=Path, help="local state file (default: one per client identity, "
                                                 "~/.fedtune/client-HOST-PORT-NAME.pt, or -device-HASH.pt after the "
                                                 "token when there is no --name)")
    join.add_argument("--compute-class", default="cpu", help="device class reported to the server (cpu, gpu, phone); "
                                                            "strategies with options.capacity size the adapter by it")
    join.add_argument("--memory-mb", type=int, help="usable memory reported to the server, MiB (default: measured, "
                                                    "the memory available now, or the GPU's free memory with --device "
                                                    "cuda; 0 = report none)")
    join.add_argument("--no-probe", action="store_true", help="do not time a training step on the run's model "
                                                             "(reported to the server as the profile's step_ms)")
    join.add_argument("--codecs", help="comma-separated update codecs this device offers (default: all it has)")
    join.add_argument("--give-up-after", type=float, default=GIVE_UP_AFTER_S,
                      help=f"seconds without reaching the server before giving up (default {GIVE_UP_AFTER_S:.0f}: "
                           f"{GIVE_UP_AFTER_S / 60:.0f} minutes); raise it to ride out long server outages")
    join.add_argument("--max-backoff", type=float, default=MAX_BACKOFF_S,
                      help=f"longest wait between retries, seconds (default {MAX_BACKOFF_S:.0f})")
    join.add_argument("--max-message-bytes", type=int, default=64 * MiB, help="largest gRPC message accepted")
    join.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    if args.ca is not None and args.insecure:
        parser.error("--ca and --insecure exclude each other")
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    if args.cert is not None and args.insecure:
        parser.error("--cert and --key are for TLS; they exclude --insecure")
    if args.memory_mb is not None and args.memory_mb < 0:
        parser.error(f"--memory-mb: {args.memory_mb} is negative")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return _join(args, _token(args, parser))


def _token(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """The enrollment token from --token-file, FEDTUNE_TOKEN or --token (warned about: argv is public)."""
    if args.token_file is not None:
        try:
            return args.token_file.read_text().strip()
        except OSError as error:
            parser.error(f"--token-file: cannot read {args.token_file}: {error}")
    if args.token is not None:
        print(f"fedclient: warning: --token puts the enrollment token on the command line, which other users of "
              f"this machine can read (ps); pass it in a file (--token-file) or the {TOKEN_VARIABLE} environment "
              "variable instead", file=sys.stderr)
        return args.token
    return os.environ.get(TOKEN_VARIABLE, "").strip() or None


def device_profile(args: argparse.Namespace, codecs: tuple[str, ...]) -> DeviceProfile:
    """The profile sent at Register: the flags, and what they leave out measured on this device (fedclient.probe)."""
    from fedtune.fedclient.probe import measured_profile

    given = DeviceProfile(memory_mb=args.memory_mb or 0, compute_class=args.compute_class, codecs=codecs)
    measured = measured_profile(given, on_cuda=args.device == "cuda")
    return measured if args.memory_mb is None else measured.model_copy(update={"memory_mb": args.memory_mb})


def transfer_bar(progress: Progress, what: str) -> Callable[[int, int], None]:
    """A progress callback for one payload, shown as a bar while an attempt runs. Every retry of the upload
    reuses the callback, so a retry after an attempt that sent everything (and then failed) opens a new bar;
    a display must never break an upload (it once raised KeyError inside the request stream)."""
    shown: list[TaskID] = []

    def update(sent: int, total: int) -> None:
        if not shown:
            shown.append(progress.add_task(what, total=total, detail=""))
        progress.update(shown[0], completed=sent, total=total, detail=f"{sent / MiB:.1f}/{total / MiB:.1f} MiB")
        if sent >= total:
            progress.remove_task(shown.pop())
    return update


def _join(args: argparse.Namespace, token: str | None) -> int:
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from fedtune.fedclient.connection import ConnectionSettings, FatalError

    console = Console(stderr=True)
    interactive = console.is_terminal and not args.quiet
    logging.basicConfig(level=logging.INFO,
                        format="%(message)s" if interactive else "%(asctime)s fedclient %(message)s",
                        handlers=[RichHandler(console=console, show_path=False)] if interactive else None,
                        force=True)  # opacus configures the root logger when imported (a [dp] run)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # raised inside peft

    from fedtune.fedclient.client import ClientSettings, FederatedClient, Reporter
    from fedtune.fedclient.state import default_state_file
    from fedtune.strategies.codecs import SUPPORTED_CODECS
    from fedtune.tasks.threads import apply_threads, default_threads

    apply_threads(args.threads or default_threads())  # before torch does any work

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                        disable=not interactive)

    class RichReporter(Reporter):
        def __init__(self) -> None:
            self.task = progress.add_task("joining", total=None, detail="")
            self.steps: TaskID | None = None  # the round's local training, while it runs

        def status(self, text: str) -> None:
            super().status(text)
            progress.update(self.task, description=text)
            if self.steps is not None:  # training is over (uploading, retired, ...)
                progress.remove_task(self.steps)
                self.steps = None

        def training_step(self, round: int, steps: int, planned: int) -> None:
            if self.steps is None:
                self.steps = progress.add_task(f"round {round}: local training", total=planned, detail="")
            progress.update(self.steps, completed=steps, total=planned, detail=f"step {steps}/{planned}")

        def round_done(self, round: int, rounds: int) -> None:
            progress.update(self.task, total=rounds, completed=round, detail=f"{round}/{rounds} rounds")

        def transfer(self, what: str) -> Callable[[int, int], None]:
            return transfer_bar(progress, what)

    codecs = tuple(c.strip() for c in args.codecs.split(",")) if args.codecs else SUPPORTED_CODECS
    try:
        state_file = args.state or default_state_file(args.server, args.name, token, Path.home())
        settings = ClientSettings(
            connection=ConnectionSettings(server=args.server, token=token, ca=args.ca, insecure=args.insecure,
                                          max_message_bytes=args.max_message_bytes,
                                          give_up_after_s=args.give_up_after, max_backoff_s=args.max_backoff,
                                          cert=args.cert, key=args.key),
            data=args.data, eval_data=args.eval_data,
            state_file=state_file, name=args.name, model_path=args.model, device=args.device,
            profile=device_profile(args, codecs), probe=not args.no_probe,
        )
        with progress:
            client = FederatedClient(settings, RichReporter())
            reason = client.run()
    except FatalError as error:
        print(f"fedclient: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedclient: interrupted; run the same command to rejoin as the same client", file=sys.stderr)
        return 130
    print(f"fedclient: done ({reason}); client id {client.client_id}, state in {state_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
