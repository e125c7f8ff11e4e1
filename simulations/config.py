"""The `fedsim` TOML config: every field has a default, so `strategy = "ffa_lora"` alone is valid."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from fedtune.simulations.channel import ChannelConfig
from fedtune.strategies.api import DeviceProfile, StrategyConfig
from fedtune.strategies.codecs import SUPPORTED_CODECS
from fedtune.strategies.registry import WRAPPER_MODULES, validate_run_options
from fedtune.tasks.config import DataConfig, ModelConfig, TaskConfig, format_validation_error, resolve_path


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and each bad field."""


VIRTUAL_DEVICE = DeviceProfile(codecs=SUPPORTED_CODECS)


class SimulationConfig(TaskConfig):
    strategy: str = Field("fedavg_lora", description="Registered strategy name.")
    options: dict[str, Any] = Field(default_factory=dict, description="The strategy's own config.")
    rounds: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    workers: int = Field(
        1, ge=1, le=64, description="Processes running clients; >1 forks workers sharing the base model."
    )
    dp: dict[str, Any] | None = Field(None, description="Differential privacy wrapper; see strategies.dp.")
    compression: dict[str, Any] | None = Field(None, description="Update codecs; see strategies.compression.")
    channel: ChannelConfig | None = Field(None, description="Noisy links (fedsim only); see simulations.channel.")
    devices: dict[str, DeviceProfile] = Field(
        default_factory=dict, description="Device profiles of virtual clients by id; others get VIRTUAL_DEVICE."
    )

    @model_validator(mode="after")
    def _strategy_options(self) -> SimulationConfig:
        self.strategy_config()
        return self

    def device_profile(self, client_id: str) -> DeviceProfile:
        """What a virtual client registers with: fedsim's clients run this code, so every codec."""
        return self.devices.get(client_id, VIRTUAL_DEVICE)

    def wrappers(self) -> dict[str, dict[str, Any] | None]:
        return {section: getattr(self, section) for section in WRAPPER_MODULES}

    def strategy_config(self) -> StrategyConfig:
        """The options and wrapper sections, each validated by its own model (errors name the field)."""
        return validate_run_options(self.strategy, self.options, self.wrappers())


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> SimulationConfig:
    """Read and validate a TOML config (or the defaults when `path` is None)."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise ConfigError(f"{source}: no such file") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{source}: not valid TOML: {error}") from error
    raw.update(overrides or {})
    try:
        config = SimulationConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: invalid config\n{format_validation_error(error)}") from error
    return _resolve_paths(config, Path(path).resolve().parent if path else None)


def _resolve_paths(config: SimulationConfig, base_dir: Path | None) -> SimulationConfig:
    """Relative data and model paths are relative to the config file, as users expect."""
    data: DataConfig = config.data.model_copy(update={
        "train": resolve_path(config.data.train, base_dir),
        "eval": resolve_path(config.data.eval, base_dir) if config.data.eval else None,
    })
    model: ModelConfig = config.model.model_copy(update={"path": resolve_path(config.model.path, base_dir)})
    return config.model_copy(update={"data": data, "model": model})
