"""The `fedserver start --config server.toml` config: a fedsim run config plus [server] and [limits].

The run part (strategy, options, dp, compression, model, data, train, rounds, seed) has the same
fields and validation as fedsim's, so one experiment moves from simulation to real devices by
adding a [server] section. `partition` is ignored here: every device brings its own data.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from fedtune.protos.payload import Limits
from fedtune.protos.runspec import RunSpec
from fedtune.strategies.registry import WRAPPER_MODULES, validate_run_options
from fedtune.tasks.config import StrictModel, TaskConfig, format_validation_error, resolve_path

RUN_FIELDS = ("strategy", "options", "dp", "compression", "model", "data", "train", "rounds", "seed")


class ServerConfigError(ValueError):
    """A config that cannot be used; the message names the file and each bad field."""


class ServerSection(StrictModel):
    """Where the server listens and how rounds are scheduled."""

    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(50051, ge=0, le=65535, description="0 = any free port (written to <run_dir>/endpoint.json).")
    run_dir: str = Field("runs/fedserver", description="SQLite state, metrics, checkpoints, TLS files.")
    insecure: bool = Field(False, description="Plaintext gRPC instead of TLS (local runs only).")
    tls_cert: str | None = Field(None, description="Server certificate (PEM); default <run_dir>/tls/server.pem.")
    tls_key: str | None = Field(None, description="Server private key (PEM); default <run_dir>/tls/server.key.")
    min_clients: int = Field(1, ge=1, description="Live clients needed before a round starts.")
    quorum: float = Field(1.0, gt=0, le=1, description="Share of the selected clients whose accepted updates "
                                                        "close a round once its deadline has passed.")
    round_deadline_s: float = Field(600.0, gt=0, description="Seconds a round waits for every selected client.")
    client_timeout_s: float = Field(30.0, gt=0, description="A client silent this long is not scheduled.")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often clients are asked to heartbeat.")
    long_poll_s: float = Field(10.0, gt=0, description="Longest a PullInstruction call is held open.")
    linger_s: float = Field(30.0, ge=0, description="After the run, keep answering DONE until every client has "
                                                     "heard it, at most this long.")

    @model_validator(mode="after")
    def _timeouts(self) -> ServerSection:
        if self.client_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("server.client_timeout_s must exceed server.heartbeat_interval_s")
        return self


class ServerConfig(TaskConfig):
    strategy: str = Field("fedavg_lora", description="Registered strategy name.")
    options: dict[str, Any] = Field(default_factory=dict, description="The strategy's own config.")
    rounds: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    dp: dict[str, Any] | None = Field(None, description="Differential privacy wrapper; see strategies.dp.")
    compression: dict[str, Any] | None = Field(None, description="Update codecs; see strategies.compression.")
    server: ServerSection = ServerSection()
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _strategy_options(self) -> ServerConfig:
        validate_run_options(self.strategy, self.options, self.wrappers())
        return self

    def wrappers(self) -> dict[str, dict[str, Any] | None]:
        return {section: getattr(self, section) for section in WRAPPER_MODULES}

    def run_spec(self) -> RunSpec:
        return RunSpec(strategy=self.strategy, options=self.options, wrappers=self.wrappers(), model=self.model,
                       data=self.data, train=self.train, rounds=self.rounds, seed=self.seed)

    def run_dir(self) -> Path:
        return Path(self.server.run_dir)

    def differing_run_fields(self, other: ServerConfig) -> list[str]:
        """Run fields (not server/limits) where `other` differs: a resumed run must not change them."""
        mine, theirs = self.model_dump(mode="json"), other.model_dump(mode="json")
        return [name for name in RUN_FIELDS if mine[name] != theirs[name]]


def parse_server_config(raw: dict[str, Any], source: str, base_dir: Path | None) -> ServerConfig:
    try:
        config = ServerConfig.model_validate(raw)
    except ValidationError as error:
        raise ServerConfigError(f"{source}: invalid config\n{format_validation_error(error)}") from error
    return _resolve_paths(config, base_dir)


def load_server_config(path: Path, overrides: dict[str, Any] | None = None) -> ServerConfig:
    """Read and validate a TOML config; `overrides` replace keys of the [server] section."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ServerConfigError(f"{path}: no such file") from error
    except tomllib.TOMLDecodeError as error:
        raise ServerConfigError(f"{path}: not valid TOML: {error}") from error
    if overrides:
        raw["server"] = {**raw.get("server", {}), **overrides}
    return parse_server_config(raw, str(path), Path(path).resolve().parent)


def _resolve_paths(config: ServerConfig, base_dir: Path | None) -> ServerConfig:
    """Relative paths are relative to the config file, as users expect."""
    def resolved(value: str | None) -> str | None:
        return resolve_path(value, base_dir) if value else value

    data = config.data.model_copy(update={"train": resolved(config.data.train), "eval": resolved(config.data.eval)})
    model = config.model.model_copy(update={"path": resolved(config.model.path)})
    server = config.server.model_copy(update={
        "run_dir": resolved(config.server.run_dir),
        "tls_cert": resolved(config.server.tls_cert), "tls_key": resolved(config.server.tls_key),
    })
    return config.model_copy(update={"data": data, "model": model, "server": server})
