"""Strategies by name: the built-in ones, plus any package's through the `fedtune.strategies` entry points.

A plug-in package declares, in its own pyproject.toml:

    [project.entry-points."fedtune.strategies"]
    my_strategy = "my_package.my_module:DEFINITION"

where DEFINITION is a `fedtune.strategies.api.StrategyDefinition`. Nothing in this repo changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ValidationError

from fedtune.strategies.definition import StrategyConfig, StrategyDefinition

ENTRY_POINT_GROUP = "fedtune.strategies"
BUILTIN_MODULES = {
    "fedavg_lora": "fedtune.strategies.fedavg_lora",
    "ffa_lora": "fedtune.strategies.ffa_lora",
    "hetlora": "fedtune.strategies.hetlora",
    "flexlora": "fedtune.strategies.flexlora",
    "fedkseed": "fedtune.strategies.fedkseed",
    "admm": "fedtune.strategies.admm",
}
# Update transforms that wrap any tensor-valued strategy, by config section, applied in this
# order (innermost first). Each module exposes `Config` (pydantic) and
# `wrap(definition, config) -> StrategyDefinition`. This is the only list of wrappers: run configs
# get their top-level sections from it (strategies.runconfig), the run spec its `wrappers`, and a
# resumed fedserver run the fields it must keep. Modules are imported only when a section is used.
WRAPPER_MODULES = {
    "asynchronous": "fedtune.strategies.fedbuff",
    "dp": "fedtune.strategies.dp",
    "compression": "fedtune.strategies.compression",
}
_registered: dict[str, StrategyDefinition] = {}


class UnknownStrategy(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register(definition: StrategyDefinition) -> StrategyDefinition:
    """Called by each strategy module at import; re-registering the same name replaces it."""
    _registered[definition.name] = definition
    return definition


def get_strategy(name: str) -> StrategyDefinition:
    if name in _registered:
        return _registered[name]
    if name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
        return _registered[name]
    for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
        definition = entry.load()
        if not isinstance(definition, StrategyDefinition):
            raise TypeError(f"entry point {entry.value!r} is not a StrategyDefinition")
        return register(definition)
    raise UnknownStrategy(f"strategy: unknown name {name!r}; available: {available_strategies()}")


def wrapper_config(section: str, options: Mapping[str, Any]) -> BaseModel:
    """Validate one wrapper section with the wrapper's own config model."""
    module = importlib.import_module(WRAPPER_MODULES[section])
    return module.Config.model_validate(dict(options))


def resolve(name: str, wrappers: Mapping[str, Mapping[str, Any] | None]) -> StrategyDefinition:
    """The named strategy wrapped by every configured wrapper section (in WRAPPER_MODULES order)."""
    definition = get_strategy(name)
    for section, module_name in WRAPPER_MODULES.items():
        options = wrappers.get(section)
        if options is not None:
            module = importlib.import_module(module_name)
            definition = module.wrap(definition, wrapper_config(section, options))
    return definition


def available_strategies() -> list[str]:
    plugins = {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(set(BUILTIN_MODULES) | set(_registered) | plugins)


def validate_run_options(
    name: str, options: Mapping[str, Any], wrappers: Mapping[str, Mapping[str, Any] | None]
) -> StrategyConfig:
    """A run config's strategy options and wrapper sections, each checked by its own model.

    Shared by every run config (fedsim's, fedserver's); the ValueError names each bad field as
    `options.<field>` or `<section>.<field>`.
    """
    try:
        definition = get_strategy(name)
    except UnknownStrategy as error:
        raise ValueError(str(error)) from error
    try:
        config = definition.parse_config(options)
    except ValidationError as error:
        raise ValueError(_fields("options", error)) from error
    for section in WRAPPER_MODULES:
        section_options = wrappers.get(section)
        if section_options is not None:
            try:
                wrapper_config(section, section_options)
            except ValidationError as error:
                raise ValueError(_fields(section, error)) from error
    return config


def _fields(prefix: str, error: ValidationError) -> str:
    return "; ".join(f"{prefix}.{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
