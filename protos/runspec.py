"""The run spec a server sends every client at registration (RegisterReply.run_spec_json).

It holds exactly what a client needs to build the same workspace and strategy half as the server:
the run fields every config shares (`strategies.runconfig.RunFields`), with the wrapper sections
gathered under one `wrappers` key on the wire.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema

from fedtune.strategies.registry import BUILTIN_MODULES, WRAPPER_MODULES, get_strategy, wrapper_config
from fedtune.strategies.runconfig import RunFields, WrapperSections


class RunSpec(RunFields):
    model_config = ConfigDict(serialize_by_alias=True)

    # Named apart from its wire key so that `wrappers()` means the same here as on every run config.
    wrapper_sections: WrapperSections = Field(default_factory=dict, alias="wrappers")

    @classmethod
    def of(cls, config: RunFields) -> RunSpec:
        """The part of `config` a client needs, fully resolved: the strategy's options and each wrapper
        section with every field and its value, defaults included, so a client never needs Python's defaults."""
        fields: dict[str, Any] = {name: getattr(config, name) for name in RunFields.model_fields}
        options = config.strategy_config().model_dump(mode="json")
        wrappers = {section: None if raw is None else wrapper_config(section, raw).model_dump(mode="json")
                    for section, raw in config.wrappers().items()}
        return cls.model_validate({**fields, "options": options, "wrappers": wrappers})

    def wrappers(self) -> WrapperSections:
        return self.wrapper_sections


SCHEMA_FILE = Path(__file__).resolve().parent / "runspec.schema.json"


def run_spec_schema() -> dict[str, Any]:
    """The JSON Schema of `RegisterReply.run_spec_json` for the built-in strategies and every wrapper.

    One branch per strategy (discriminated by `strategy`), each with that strategy's own options model, and
    each wrapper section typed by its own model, so a client can check a spec, and learn every option, from
    the schema alone. Shipped as protos/runspec.schema.json (`python -m fedtune.protos.generate`).
    """
    wrapper_fields: dict[str, Any] = {section: (importlib.import_module(module).Config | None, None)
                                      for section, module in WRAPPER_MODULES.items()}
    wrappers = create_model("Wrappers", __config__=ConfigDict(extra="forbid"), **wrapper_fields)
    branches = [
        create_model(
            f"RunSpec_{name}", __base__=RunSpec,
            strategy=(str, Field(description="Registered strategy name.", json_schema_extra={"const": name})),
            options=(get_strategy(name).config, Field(description="The strategy's options, every one resolved.")),
            wrapper_sections=(wrappers, Field(alias="wrappers", description="Wrapper sections; null: not applied.")),
        )
        for name in BUILTIN_MODULES
    ]
    references, definitions = models_json_schema([(branch, "validation") for branch in branches], by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "fedtune run spec",
            "oneOf": [references[(branch, "validation")] for branch in branches], **definitions}


def write_schema(path: Path = SCHEMA_FILE) -> None:
    path.write_text(json.dumps(run_spec_schema(), indent=1, sort_keys=True) + "\n")
