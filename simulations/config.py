"""The `fedsim` TOML config: every field has a default, so `strategy = "ffa_lora"` alone is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedtune.simulations.clock import DevicesConfig, trace_path
from fedtune.strategies.runconfig import ConfigError, RunConfig, load_run_config
from fedtune.tasks.threads import default_threads

__all__ = ["ChannelConfig", "ConfigError", "LinkConfig", "SimulationConfig", "load_config"]

Direction = Literal["down", "up"]


class LinkConfig(BaseModel):
    """One direction of the link: Gaussian noise (SNR or variance, not both) and packet loss."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    snr_db: float | None = Field(None, description="Per-tensor signal-to-noise ratio in dB.")
    noise_variance: float | None = Field(None, ge=0, description="Noise variance per element.")
    loss_rate: float = Field(0.0, ge=0, lt=1, description="Probability that a whole message is lost.")

    @model_validator(mode="after")
    def _one_noise_level(self) -> LinkConfig:
        if self.snr_db is not None and self.noise_variance is not None:
            raise ValueError("give snr_db or noise_variance, not both")
        return self

    @property
    def noisy(self) -> bool:
        return self.snr_db is not None or bool(self.noise_variance)


class ChannelConfig(BaseModel):
    """The `[channel]` section of a fedsim config; absent or empty means perfect links."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    downlink: LinkConfig = Field(default_factory=LinkConfig, description="Server to client.")
    uplink: LinkConfig = Field(default_factory=LinkConfig, description="Client to server.")
    seed: int | None = Field(None, ge=0, description="Seed of the noise and losses; default: the run seed.")


class SimulationConfig(RunConfig):
    """A run config plus how fedsim runs it on this machine."""

    workers: int = Field(
        1, ge=1, le=64, description="Processes running clients; >1 forks workers sharing the base model."
    )
    threads: int | None = Field(
        None, ge=1, le=1024, description="torch threads of fedsim's own process (its clients when workers = 1; "
                                         "evaluation and aggregation); forked workers run one each. Default: "
                                         "OMP_NUM_THREADS when set, else this machine's cores ÷ workers, so the run "
                                         "never oversubscribes it.")
    backend: Literal["local", "ray"] = Field(
        "local", description="Where clients run: local (this process, or `workers` forked ones) or ray (one actor "
                             "per node of the Ray cluster at ray_address; pip install 'fedtune[ray]').")
    ray_address: str | None = Field(
        None, description="backend = ray: the cluster's head, HOST:PORT as `ray start --head` prints it, or 'auto' "
                          "(the cluster this machine belongs to).")
    channel: ChannelConfig | None = Field(None, description="Noisy links (fedsim only); see simulations.channel.")
    devices: DevicesConfig = Field(
        default_factory=DevicesConfig, description="Simulated devices: classes, per-client devices, a trace; "
                                                   "see simulations.clock.")
    round_deadline_s: float | None = Field(
        None, gt=0, description="Simulated seconds a synchronous round waits for every selected client; "
                                "None = no deadline.")
    quorum: float = Field(1.0, gt=0, le=1, description="Share of the selected clients whose updates close a round "
                                                        "once its deadline has passed (as fedserver's).")

    @field_validator("ray_address")
    @classmethod
    def _head_address(cls, address: str | None) -> str | None:
        if address is None or address == "auto":
            return address
        host, _, port = address.rpartition(":")
        if "://" in address or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r} is not HOST:PORT (e.g. 10.0.0.1:6379, as `ray start --head` prints it) "
                             "nor 'auto' (Ray Client's ray:// addresses are not supported)")
        return address

    @model_validator(mode="after")
    def _ray_backend(self) -> Self:
        if self.backend == "ray" and self.ray_address is None:
            raise ValueError("backend = 'ray' needs ray_address: the cluster head's HOST:PORT, or 'auto'")
        if self.backend != "ray" and self.ray_address is not None:
            raise ValueError("ray_address is only used with backend = 'ray'")
        if self.backend == "ray" and self.workers > 1:
            raise ValueError("workers forks processes on this machine; with backend = 'ray' each node of the "
                             "cluster runs one actor: leave workers = 1")
        return self

    def process_threads(self) -> int:
        """fedsim's own torch threads: `threads`, or this machine's share for each of the run's processes."""
        return self.threads or default_threads(self.workers)

    def with_resolved_paths(self, base_dir: Path | None) -> Self:
        config = super().with_resolved_paths(base_dir)
        return config.model_copy(update={"devices": trace_path(config.devices, base_dir)})


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> SimulationConfig:
    """Read and validate a TOML config (or the defaults when `path` is None); `overrides` replace top-level keys."""
    return load_run_config(SimulationConfig, path, overrides)
