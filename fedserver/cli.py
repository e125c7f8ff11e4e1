"""`fedserver`: run a federation for real devices over gRPC.

  fedserver init   --run-dir DIR --clients N [--host NAME ...] [--mtls] [--ca-dir DIR]
                                                                  CA, server certificate, enrollment tokens
                                                                  (and client certificates with --mtls)
  fedserver start  --config server.toml [--resume] [--insecure]   serve every round (same strategies as fedsim)
  fedserver status --run-dir DIR [--json] [--watch [--interval S]]  the run's state, and whether its server is alive
  fedserver config [--config server.toml]                         the config `start` would use, commented

`start` and `config` take `--set SECTION.FIELD=VALUE` overrides. The server listens on every
interface (0.0.0.0) unless `server.host` (or `start --host`) names one, e.g. 127.0.0.1; a plaintext
(`--insecure`) server listens on loopback only, unless `--insecure-any-host` says otherwise.
"""

# Only light modules are imported up front (torch, grpc and the config models load when a command
# needs them), so `--help` and `--version` answer at once.

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.fedserver.liveness import Liveness, ServerLock, ServerRunning, probe
from fedtune.strategies import catalog
from fedtune.strategies.cli_options import add_set_option, add_version_option

if TYPE_CHECKING:
    from fedtune.fedserver.config import ServerConfig

STATE_FILE = "state.sqlite"
TOKENS_FILE = "enrollment-tokens.txt"
CLIENT_CERTS_DIR = "clients"


class UsageError(Exception):
    """A command that cannot run as given; the message says what to do instead."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedserver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="create the run's CA, server certificate and client enrollment tokens")
    init.add_argument("--run-dir", type=Path, required=True)
    init.add_argument("--clients", type=int, default=1, help="enrollment tokens to add (default 1)")
    init.add_argument("--host", action="append", default=[],
                      help="server name or IP for the certificate (repeatable; localhost and 127.0.0.1 always)")
    init.add_argument("--tokens-out", type=Path, help=f"where plaintext tokens go (default RUN_DIR/{TOKENS_FILE})")
    init.add_argument("--new-tls", action="store_true", help="replace an existing CA and server certificate")
    init.add_argument("--mtls", action="store_true",
                      help=f"also issue a client certificate and key per new token, into RUN_DIR/{CLIENT_CERTS_DIR}, "
                           "for a server with `mtls = true` in [server] (needs the CA key: --ca-dir)")
    init.add_argument("--ca-dir", type=Path,
                      help="where the CA's private key goes (created mode 0700), and is read from by --mtls; keep "
                           "it offline, outside the run dir (default: a sibling of the run dir, RUN_DIR.ca)")
    start = commands.add_parser(
        "start", help="serve a run (fresh, or --resume after a stop or crash)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{catalog.listing()}\n\nEvery config section and field, with its default and meaning: "
               "`fedserver config`.")
    start.add_argument("--config", type=Path, help="server TOML (optional with --resume: the stored config is used)")
    start.add_argument("--run-dir", type=Path, help="override server.run_dir")
    start.add_argument("--port", type=int, help="override server.port (0 = any free port)")
    start.add_argument("--host", help="override server.host (default 0.0.0.0: every interface; 127.0.0.1: this "
                                      "machine only)")
    start.add_argument("--insecure", action="store_true",
                       help="plaintext gRPC, no TLS (local runs only: server.host must be a loopback address)")
    start.add_argument("--insecure-any-host", action="store_true",
                       help="let --insecure listen on a non-loopback server.host (tokens and updates cross the "
                            "network unencrypted); same as server.allow_insecure_remote = true")
    start.add_argument("--resume", action="store_true", help="continue the run in the run dir")
    add_set_option(start)
    config = commands.add_parser("config", help="print the config `start` would use, every field commented, as TOML")
    config.add_argument("--config", type=Path, help="server TOML (default: every default)")
    add_set_option(config)
    status = commands.add_parser("status", help="print the run's state")
    status.add_argument("--run-dir", type=Path, required=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", action="store_true",
                        help="a live view, redrawn every --interval seconds, until the server process ends: exit 0 "
                             "when the run finished, 1 when the server is gone before the end (killed, stopped)")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between redraws of --watch (default 2)")
    args = parser.parse_args(argv)
    from fedtune.strategies.runconfig import ConfigError

    try:
        if args.command == "init":
            return _init(args)
        if args.command == "status":
            return _status(args)
        if args.command == "config":
            return _config(args)
        return _start(args)
    except (UsageError, ConfigError, FileNotFoundError, ServerRunning) as error:
        print(f"fedserver: {error}", file=sys.stderr)
        return 2


def _init(args: argparse.Namespace) -> int:
    from fedtune.fedserver.security import (
        CaFiles,
        TlsFiles,
        create_tls,
        default_ca_dir,
        hash_token,
        issue_client_certs,
        move_legacy_ca_key,
        new_token,
        write_tokens,
    )
    from fedtune.fedserver.store import RunStore

    if args.clients < 0:
        raise UsageError("--clients must be at least 0")
    run_dir: Path = args.run_dir
    tls = TlsFiles(run_dir / "tls")
    ca = CaFiles(args.ca_dir or default_ca_dir(run_dir))
    if ca.directory.resolve().is_relative_to(run_dir.resolve()):
        raise UsageError(f"--ca-dir {ca.directory} is inside the run dir, where the server could leak the CA key; "
                         "choose a directory outside it")
    if args.new_tls or not tls.ca_cert.exists():
        create_tls(tls, ca, [*args.host, "localhost", "127.0.0.1"], run_dir.name)
        print(f"fedserver: CA and server certificate in {tls.directory} (clients need {tls.ca_cert}); the CA's "
              f"private key is in {ca.key}, outside the run dir: keep it offline (only `fedserver init --mtls "
              f"--ca-dir {ca.directory}` needs it, to issue client certificates)")
    elif move_legacy_ca_key(tls, ca):
        print(f"fedserver: moved the CA's private key out of the run dir to {ca.key}: keep it offline")
    if args.mtls and not ca.key.exists():
        raise UsageError(f"--mtls: issuing client certificates needs the CA's private key, not found at {ca.key}; "
                         "pass --ca-dir with the directory `fedserver init` put it in")
    store = RunStore(run_dir / STATE_FILE)
    try:
        first = store.token_count() + 1
        tokens = [(f"token-{first + i:04d}", new_token()) for i in range(args.clients)]
        if args.mtls:  # before the tokens are stored: a CA key that does not fit adds nothing
            try:
                issue_client_certs(tls, ca, run_dir / CLIENT_CERTS_DIR, [label for label, _ in tokens])
            except ValueError as error:
                raise UsageError(f"--mtls: {error}") from error
            print(f"fedserver: a client certificate and key per new token in {run_dir / CLIENT_CERTS_DIR} (LABEL.pem, "
                  "LABEL.key, mode 0600): hand each device its pair with its token (`fedclient join --cert LABEL.pem "
                  "--key LABEL.key`), then delete them; `mtls = true` in [server] makes the server require them")
        store.add_tokens([(hash_token(token), label) for label, token in tokens])
    finally:
        store.close()
    tokens_out = args.tokens_out or run_dir / TOKENS_FILE
    write_tokens(tokens_out, tokens)
    print(f"fedserver: {len(tokens)} enrollment token(s) added ({first + len(tokens) - 1} in all); plaintext in "
          f"{tokens_out} (mode 0600): hand one to each device, then delete the file. The server keeps only hashes.")
    return 0


def _config(args: argparse.Namespace) -> int:
    from fedtune.fedserver.config import ServerConfig
    from fedtune.strategies.config_toml import commented_toml
    from fedtune.strategies.runconfig import load_run_config

    print(commented_toml(load_run_config(ServerConfig, args.config, None, args.set)), end="")
    return 0


def _start_config(args: argparse.Namespace) -> ServerConfig:
    from fedtune.fedserver.config import ServerConfig
    from fedtune.strategies.runconfig import load_run_config, parse_run_config

    overrides: dict[str, Any] = {}
    if args.run_dir is not None:
        overrides["run_dir"] = str(args.run_dir.resolve())
    if args.port is not None:
        overrides["port"] = args.port
    if args.host is not None:
        overrides["host"] = args.host
    if args.insecure:
        overrides["insecure"] = True
    if args.insecure_any_host:
        overrides["allow_insecure_remote"] = True
    if args.config is not None:
        return load_run_config(ServerConfig, args.config, overrides, args.set)
    if not args.resume:
        raise UsageError("start: --config is required (it may be left out only with --resume)")
    if args.run_dir is None:
        raise UsageError("start --resume without --config needs --run-dir")
    stored = _stored_config(args.run_dir / STATE_FILE)
    return parse_run_config(ServerConfig, json.loads(stored.model_dump_json()), "stored config", None, overrides,
                            args.set)


def _stored_config(path: Path) -> ServerConfig:
    from fedtune.fedserver.config import ServerConfig
    from fedtune.fedserver.store import RunStore

    if not path.exists():
        raise UsageError(f"{path.parent}: no run state here (nothing to resume)")
    store = RunStore(path, readonly=True)
    raw = store.get_meta("config")
    store.close()
    if raw is None:
        raise UsageError(f"{path.parent}: no run was started here (nothing to resume); start one without --resume")
    return ServerConfig.model_validate_json(raw)


def _start(args: argparse.Namespace) -> int:
    config = _start_config(args)  # before the store's import loads torch: a bad config fails in a blink
    if config.server.exposes_plaintext():
        raise UsageError(f"server.host {config.server.host} is reachable from other machines, and plaintext gRPC "
                         "(--insecure) would send enrollment tokens and model updates unencrypted: listen on "
                         "loopback only (--host 127.0.0.1), drop --insecure to use TLS, or, to serve plaintext "
                         "beyond this machine anyway, pass --insecure-any-host (server.allow_insecure_remote = true)")
    from fedtune.fedserver.store import CorruptPayload

    try:
        return _serve(args, config)
    except CorruptPayload as error:  # the strategy state a resume needs; a damaged update is only dropped
        raise UsageError(f"{config.run_dir()}: the stored run is damaged and cannot be resumed: {error}") from error


def _serve(args: argparse.Namespace, config: ServerConfig) -> int:
    from fedtune.fedserver.store import RunStore

    run_dir = config.run_dir()
    state = run_dir / STATE_FILE
    if not state.exists():
        raise UsageError(f"{run_dir}: no enrollment tokens; run `fedserver init --run-dir {run_dir} --clients N` first")
    if args.resume:
        stored = _stored_config(state)
        differing = stored.differing_run_fields(config)
        if differing:
            raise UsageError(f"--resume: the config's {', '.join(differing)} differ from the interrupted run's; "
                             "a resumed run must keep them")
    store = RunStore(state)
    lock = ServerLock(run_dir)
    try:
        lock.acquire()  # held for this process's life: `status` tells a live server from a killed one
        if store.token_count() == 0:
            raise UsageError(f"{run_dir}: no enrollment tokens; run `fedserver init --run-dir {run_dir} --clients N`")
        run_id, status = store.get_meta("run_id"), store.get_meta("status")
        if args.resume and status == "finished":
            print(f"fedserver: run {run_id} already finished ({store.get_meta('finish_reason')})")
            return 0
        if not args.resume and run_id is not None:
            raise UsageError(f"{run_dir} already holds run {run_id} ({status}); continue it with --resume or use "
                             "a new run dir")
        _configure_logging(config.server.log_format == "json")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # raised inside peft
        from fedtune.fedserver.service import serve
        from fedtune.tasks.threads import apply_threads, default_threads

        apply_threads(config.server.threads or default_threads())  # before torch does any work

        reason = asyncio.run(serve(config, store, args.resume, lambda line: print(f"fedserver: {line}", flush=True)))
    finally:
        store.close()
        lock.release()
    print(f"fedserver: {reason}; metrics in {run_dir / 'metrics.jsonl'}, global model in {run_dir / 'global'}",
          flush=True)
    return 0


def _configure_logging(as_json: bool) -> None:
    # force: opacus calls logging.basicConfig when imported (a [dp] run), which would silence ours
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedserver %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    if as_json:  # [server] log_format = "json"
        from fedtune.fedserver.observability import JsonLogFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())


def status_report(run_dir: Path) -> dict[str, Any]:
    """The run's state as stored (client activity is flushed every few seconds), and whether its server lives.

    The stored status stays "running" when the server is killed; `status` is "stopped" then, because
    the liveness lock (`fedserver.liveness`) is free: no process serves the run any more.
    """
    from fedtune.fedserver.config import ServerConfig
    from fedtune.fedserver.store import RunStore

    server = probe(run_dir)
    store = RunStore(run_dir / STATE_FILE, readonly=True)
    try:
        raw = store.get_meta("config")
        config = ServerConfig.model_validate_json(raw) if raw else None
        rounds = store.rounds()
        running = next((r for r in rounds if r.status == "running"), None)
        now = time.time()
        return {
            "run_id": store.get_meta("run_id"),
            "status": run_status(store.get_meta("status"), server),
            "finish_reason": store.get_meta("finish_reason"),
            "server": {"alive": server.alive, "pid": server.pid, "started": server.started,
                       "last_seen_s_ago": None if server.last_seen is None else round(now - server.last_seen, 1)},
            "strategy": config.strategy if config else None,
            "rounds_planned": config.rounds if config else None,
            "rounds_done": sum(r.status == "done" for r in rounds),
            "current_round": None if running is None else {
                "round": running.round, "selected": running.selected,
                "accepted": store.accepted_count(running.round),
                "deadline_in_s": round(running.deadline - now, 1) if server.alive else None,
            },
            "last_metrics": next((r.metrics for r in reversed(rounds) if r.metrics), None),
            "clients": [{"client_id": c.client_id, "seen_s_ago": round(now - c.last_seen, 1), "activity": c.activity,
                         "rounds_done": c.rounds_done, "left": c.left_reason, "compute_class": c.profile.compute_class}
                        for c in store.clients()],
            "tokens": store.token_count(),
        }
    finally:
        store.close()


def run_status(stored: str | None, server: Liveness) -> str:
    """What the run is doing: the stored status is the server's own word, true only while it lives."""
    if stored is None:
        return "starting" if server.alive else "not started"
    if stored == "running" and not server.alive:
        return "stopped"
    return stored


def _status(args: argparse.Namespace) -> int:
    if not (args.run_dir / STATE_FILE).exists():
        raise UsageError(f"{args.run_dir}: no run state here")
    if args.watch:
        if args.json:
            raise UsageError("status: --watch is a view for people; --json prints the state once")
        return _watch(args.run_dir, args.interval)
    report = status_report(args.run_dir)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console

    Console().print(_render(report))
    return 0


def _watch(run_dir: Path, interval: float) -> int:
    """Redraw the status until the server process is gone; 0 if the run finished, 1 if it did not."""
    from rich.console import Console
    from rich.live import Live

    if interval <= 0:
        raise UsageError("--interval must be positive")
    console = Console()
    report = status_report(run_dir)
    with Live(_render(report), console=console, auto_refresh=False) as live:
        while report["server"]["alive"]:
            time.sleep(interval)
            report = status_report(run_dir)
            live.update(_render(report), refresh=True)
    if report["status"] == "finished":
        console.print("fedserver: the run finished; the server process has ended")
        return 0
    console.print("fedserver: the server process is gone and the run is not finished: resume with "
                  "`fedserver start --resume`")
    return 1


def _render(report: dict[str, Any]) -> Any:
    """The status as a person reads it (a rich renderable, printed once or redrawn by --watch)."""
    from rich.console import Group
    from rich.table import Table

    server, status = report["server"], report["status"]
    if status == "stopped":
        seen = server["last_seen_s_ago"]
        record = "no liveness record" if seen is None else f"last seen {_ago(seen)} ago, pid {server['pid']}"
        state = f"stopped ({record}; the process is gone: resume with `fedserver start --resume`)"
    else:
        state = status + (f" ({report['finish_reason']})" if report["finish_reason"] else "")
        state += f", server pid {server['pid']}" if server["alive"] else ""
    lines: list[Any] = [
        f"[bold]run[/] {report['run_id'] or '-'}  [bold]{state}[/]",
        f"strategy {report['strategy']}, rounds {report['rounds_done']} of {report['rounds_planned']} done, "
        f"{len(report['clients'])} clients, {report['tokens']} tokens",
    ]
    current = report["current_round"]
    if current:
        accepted = f"{current['accepted']} of {len(current['selected'])} updates accepted"
        lines.append(f"round {current['round']} in progress: {accepted}, deadline in {current['deadline_in_s']} s"
                     if server["alive"] else f"round {current['round']} was in progress: {accepted} (a resumed run "
                                             "keeps them)")
    if report["last_metrics"]:
        metrics = report["last_metrics"]
        lines.append("last round: " + ", ".join(f"{k} {v}" for k, v in metrics.items() if v is not None))
    table = Table("client", "last seen", "activity", "rounds", "left")
    for client in report["clients"]:
        table.add_row(client["client_id"], f"{client['seen_s_ago']} s ago", client["activity"],
                      str(client["rounds_done"]), client["left"] or "")
    return Group(*lines, table)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    sys.exit(main())
