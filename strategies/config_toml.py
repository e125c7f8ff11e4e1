"""A resolved run config written back as commented TOML: every section and field, with its meaning.

`fedsim config` and `fedserver config` print it, so a user sees every field a config may hold,
its default and its description, and what a file plus `--set` overrides resolves to. The strategy's
`[options]` are shown with its own config model. Sections not in use (a wrapper not applied, fedsim's
`[channel]`) are shown with their defaults but commented out, so the output, saved as a file, loads
back to the same config.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from fedtune.strategies.registry import WRAPPER_MODULES, wrapper_config
from fedtune.strategies.runconfig import RunConfig

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def commented_toml(config: RunConfig) -> str:
    """The whole config as TOML, each field followed by its description as a comment."""
    sections: dict[str, tuple[BaseModel | None, bool]] = {"options": (config.strategy_config(), True)}
    for section in WRAPPER_MODULES:
        given = getattr(config, section)
        try:
            sections[section] = (wrapper_config(section, given or {}), given is not None)
        except ValidationError:  # a wrapper whose defaults alone are not a valid section
            sections[section] = (None, False)
    header = "# Every field, with its default unless set; sections commented out are not in use."
    return "\n".join([header, *_table(None, config, sections, active=True)]) + "\n"


def _table(header: str | None, model: BaseModel, replaced: dict[str, tuple[BaseModel | None, bool]],
           active: bool) -> list[str]:
    """A table's own fields, then its sub-tables (model-valued fields, and `replaced` ones) in field order."""
    values = model.model_dump(mode="json")
    own: list[str] = []
    tables: list[str] = []
    for name, field in type(model).model_fields.items():
        path = f"{header}.{name}" if header else name
        value = getattr(model, name)
        comment = f"  # {field.description}" if field.description else ""
        if name in replaced:
            inner, in_use = replaced[name]
            tables += [""] + (_table(path, inner, {}, active and in_use) if inner is not None
                              else [f"# [{path}]{comment}"])
        elif isinstance(value, BaseModel):
            tables += [""] + _table(path, value, {}, active)
        elif value is None and (optional_table := _model_of(model, name)) is not None:
            tables += [""] + _table(path, optional_table(), {}, active=False)
        elif value is None:
            own.append(f"# {name} = (unset){comment}")
        else:
            own.append(f"{name} = {_value(values[name])}{comment}")
    doc = (type(model).__doc__ or "").strip().splitlines()
    heading = [] if header is None else [f"[{header}]" + (f"  # {doc[0]}" if doc else "")]
    return [line if active or line.startswith("#") else f"# {line}" for line in [*heading, *own]] + tables


def _model_of(model: BaseModel, name: str) -> type[BaseModel] | None:
    """The model class an optional sub-table field holds (e.g. `channel: ChannelConfig | None`), if any."""
    annotation = type(model).model_fields[name].annotation
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else json.dumps(key)


def _value(value: Any) -> str:
    """A JSON-mode value as TOML (inline tables for mappings; None inside a collection cannot occur in TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + " }" \
            if value else "{}"
    raise TypeError(f"no TOML form for {value!r}")
