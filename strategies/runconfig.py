"""What a run is, shared by every side: the fields, their validation and the TOML file they come from.

`RunFields` is what a client needs to take part (`protos.runspec.RunSpec` carries exactly these);
`RunConfig` is the file users write: those fields, plus one top-level table per registered wrapper
(`[dp]`, `[compression]`: `registry.WRAPPER_MODULES` is the only list of them), `[partition]` and
`[tracking]`.
fedsim's and fedserver's configs add their own sections to it, so an experiment moves between them
unchanged. `load_run_config` reads any of them, with one set of error messages.
"""

from __future__ import annotations

import tomllib
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from pydantic import Field, ValidationError, create_model, model_validator

from fedtune.strategies.definition import RunContext, StrategyConfig, StrategyDefinition
from fedtune.strategies.registry import WRAPPER_MODULES, resolve, validate_run_options
from fedtune.tasks.config import (
    PartitionConfig,
    StrictModel,
    TaskConfig,
    format_validation_error,
    resolve_model_path,
    resolve_path,
)

if TYPE_CHECKING:
    from fedtune.strategies import fedbuff

WrapperSections = dict[str, dict[str, Any] | None]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and each bad field."""


class RunFields(TaskConfig):
    """The run as every client must see it: the strategy, its options and wrappers, the task, rounds and seed."""

    strategy: str = Field("fedavg_lora", description="Registered strategy name.")
    options: dict[str, Any] = Field(default_factory=dict, description="The strategy's own config.")
    rounds: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)

    @abstractmethod
    def wrappers(self) -> WrapperSections:
        """Every wrapper section by name (None: not applied), in `WRAPPER_MODULES` order."""

    def strategy_config(self) -> StrategyConfig:
        """The options and wrapper sections, each validated by its own model (errors name the field)."""
        return validate_run_options(self.strategy, self.options, self.wrappers())

    def definition(self) -> StrategyDefinition:
        return resolve(self.strategy, self.wrappers())

    def context(self) -> RunContext:
        return RunContext(seed=self.seed, rounds=self.rounds, train=self.train, model_kind=self.model.kind)

    def asynchronous_mode(self) -> fedbuff.Config | None:
        """The `[asynchronous]` section (FedBuff rounds), or None for synchronous rounds."""
        from fedtune.strategies import fedbuff  # imports torch: not while a config file is only being checked

        section = self.wrappers().get("asynchronous")
        return None if section is None else fedbuff.Config.model_validate(section)


def with_wrapper_sections(base: type[RunFields]) -> type[RunFields]:
    """`base` plus one optional top-level table per registered wrapper: adding a wrapper adds its section."""
    sections: dict[str, Any] = {
        section: (dict[str, Any] | None, Field(None, description=f"Options of {module}; absent: not applied."))
        for section, module in WRAPPER_MODULES.items()
    }
    return create_model(f"{base.__name__}WithWrapperSections", __base__=base, __module__=__name__, **sections)


if TYPE_CHECKING:  # the sections are generated from the table, so a type checker sees only the base
    _RunFieldsWithWrapperSections = RunFields
else:
    _RunFieldsWithWrapperSections = with_wrapper_sections(RunFields)


class TrackingConfig(StrictModel):
    """`[tracking]`: experiment trackers that get every metrics.jsonl value, and each accepted update's metrics.

    Output only: clients are never sent it, and a resumed run may change it. <out> is fedsim's --out and
    fedserver's server.run_dir.
    """

    tensorboard: bool = Field(False, description="TensorBoard event files in <out>/tensorboard "
                                                  "(pip install 'fedtune[tensorboard]').")
    mlflow: bool = Field(False, description="An MLflow run (pip install 'fedtune[mlflow]').")
    mlflow_tracking_uri: str | None = Field(None, description="Where the MLflow run goes: a file store "
                                                              "(file:///abs/path), sqlite:///..., http://host:5000; "
                                                              "default: a file store in <out>/mlruns.")
    mlflow_experiment: str = Field("fedtune", min_length=1, description="MLflow experiment (created if absent).")
    mlflow_run_name: str | None = Field(None, description="MLflow run name; default: the out dir's name.")


class RunConfig(_RunFieldsWithWrapperSections):
    """The run part of a config file, which fedsim's and fedserver's configs extend."""

    # Which table command-line overrides replace keys of (None: the top level).
    OVERRIDES_SECTION: ClassVar[str | None] = None

    partition: PartitionConfig = PartitionConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _strategy_and_wrappers(self) -> Self:
        self.strategy_config()
        # a wrapper that cannot wrap this strategy (e.g. [asynchronous] over fedkseed) says so here, and the
        # wrapped strategy refuses task settings it cannot honour (e.g. train.max_grad_norm under DP-SGD)
        self.definition().check_task(self)
        if self.evaluation.federated and self.wrappers().get("asynchronous") is not None:
            raise ValueError("evaluation.federated: clients evaluate the model a round starts from, which asynchronous "
                             "rounds do not share; use central evaluation with [asynchronous]")
        return self

    def wrappers(self) -> WrapperSections:
        return {section: getattr(self, section) for section in WRAPPER_MODULES}

    @classmethod
    def spec_fields(cls) -> tuple[str, ...]:
        """The fields every client is sent (RunFields' and the wrapper sections): a resumed run must keep them."""
        return (*RunFields.model_fields, *WRAPPER_MODULES)

    def with_resolved_paths(self, base_dir: Path | None) -> Self:
        """Relative data and model paths are relative to the config file, as users expect."""
        data = {"train": self.data.train, "eval": self.data.eval}
        return self.model_copy(update={
            "data": self.data.model_copy(update={key: resolve_path(value, base_dir) for key, value in data.items()
                                                 if value}),
            "model": self.model.model_copy(update={"path": resolve_model_path(self.model.path, base_dir)}),
        })


ConfigT = TypeVar("ConfigT", bound=RunConfig)


def load_run_config(config_class: type[ConfigT], path: Path | None,
                    overrides: Mapping[str, Any] | None = None, assignments: Sequence[str] = ()) -> ConfigT:
    """Read and validate a TOML config file (None: every default) into `config_class`.

    `assignments` are `--set SECTION.FIELD=VALUE` strings from the command line, merged into the file's
    tables before validation, so an error names the field; see `parse_run_config`.
    """
    if path is None:
        return parse_run_config(config_class, {}, "defaults", None, overrides, assignments)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: no such file") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error
    return parse_run_config(config_class, raw, str(path), Path(path).resolve().parent, overrides, assignments)


def parse_run_config(config_class: type[ConfigT], raw: Mapping[str, Any], source: str, base_dir: Path | None,
                     overrides: Mapping[str, Any] | None = None, assignments: Sequence[str] = ()) -> ConfigT:
    """Validate `raw` (from `source`) and resolve its paths.

    `assignments` (`--set`) are applied first, at any depth; `overrides` (a command's dedicated flags, such
    as `--rounds` or `--port`) then replace keys of the class's OVERRIDES_SECTION, so a flag wins.
    """
    if assignments:
        raw = with_assignments(raw, assignments)
        source = f"{source} with --set {' '.join(assignments)}"
    if overrides:
        section = config_class.OVERRIDES_SECTION
        raw = {**raw, **overrides} if section is None else {**raw, section: {**raw.get(section, {}), **overrides}}
    try:
        config = config_class.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: invalid config\n{format_validation_error(error)}") from error
    return config.with_resolved_paths(base_dir)


def parse_assignment(text: str) -> tuple[tuple[str, ...], Any]:
    """One `--set SECTION.FIELD=VALUE` as (key path, value).

    The value is read as a TOML value (`5`, `1e-3`, `true`, `"ffa_lora"`, `["q_proj", "v_proj"]`); what is
    not valid TOML is taken as a string, so `--set strategy=ffa_lora` works once the shell has eaten quotes.
    """
    key, equals, value = text.partition("=")
    path = tuple(part.strip() for part in key.split("."))
    if not equals or not all(path):
        raise ConfigError(f"--set {text!r}: expected SECTION.FIELD=VALUE, e.g. --set train.local_steps=5")
    try:
        return path, tomllib.loads(f"value = {value.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        return path, value.strip()


def with_assignments(raw: Mapping[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """`raw` with each `--set` applied in order (tables on the way are created or copied, never mutated)."""
    merged = dict(raw)
    for text in assignments:
        path, value = parse_assignment(text)
        table = merged
        for part in path[:-1]:
            inner = table.get(part)
            table[part] = dict(inner) if isinstance(inner, Mapping) else {}
            table = table[part]
        table[path[-1]] = value
    return merged
