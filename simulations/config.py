"""The `fedsim` TOML config: every field has a default, so `strategy = "ffa_lora"` alone is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from fedtune.simulations.channel import ChannelConfig
from fedtune.strategies.api import DeviceProfile
from fedtune.strategies.codecs import SUPPORTED_CODECS
from fedtune.strategies.runconfig import ConfigError, RunConfig, load_run_config

__all__ = ["VIRTUAL_DEVICE", "ConfigError", "SimulationConfig", "load_config"]

VIRTUAL_DEVICE = DeviceProfile(codecs=SUPPORTED_CODECS)


class SimulationConfig(RunConfig):
    """A run config plus how fedsim runs it on this machine."""

    workers: int = Field(
        1, ge=1, le=64, description="Processes running clients; >1 forks workers sharing the base model."
    )
    channel: ChannelConfig | None = Field(None, description="Noisy links (fedsim only); see simulations.channel.")
    devices: dict[str, DeviceProfile] = Field(
        default_factory=dict, description="Device profiles of virtual clients by id; others get VIRTUAL_DEVICE."
    )

    def device_profile(self, client_id: str) -> DeviceProfile:
        """What a virtual client registers with: fedsim's clients run this code, so every codec."""
        return self.devices.get(client_id, VIRTUAL_DEVICE)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> SimulationConfig:
    """Read and validate a TOML config (or the defaults when `path` is None); `overrides` replace top-level keys."""
    return load_run_config(SimulationConfig, path, overrides)
