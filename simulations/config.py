"""The `fedsim` TOML config: every field has a default, so `strategy = "ffa_lora"` alone is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import Field

from fedtune.simulations.channel import ChannelConfig
from fedtune.simulations.clock import DevicesConfig, trace_path
from fedtune.strategies.runconfig import ConfigError, RunConfig, load_run_config
from fedtune.tasks.threads import default_threads

__all__ = ["ConfigError", "SimulationConfig", "load_config"]


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
    channel: ChannelConfig | None = Field(None, description="Noisy links (fedsim only); see simulations.channel.")
    devices: DevicesConfig = Field(
        default_factory=DevicesConfig, description="Simulated devices: classes, per-client devices, a trace; "
                                                   "see simulations.clock.")
    round_deadline_s: float | None = Field(
        None, gt=0, description="Simulated seconds a synchronous round waits for every selected client; "
                                "None = no deadline.")
    quorum: float = Field(1.0, gt=0, le=1, description="Share of the selected clients whose updates close a round "
                                                        "once its deadline has passed (as fedserver's).")

    def process_threads(self) -> int:
        """fedsim's own torch threads: `threads`, or this machine's share for each of the run's processes."""
        return self.threads or default_threads(self.workers)

    def with_resolved_paths(self, base_dir: Path | None) -> Self:
        config = super().with_resolved_paths(base_dir)
        return config.model_copy(update={"devices": trace_path(config.devices, base_dir)})


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> SimulationConfig:
    """Read and validate a TOML config (or the defaults when `path` is None); `overrides` replace top-level keys."""
    return load_run_config(SimulationConfig, path, overrides)
