"""The run spec a server sends every client at registration (RegisterReply.run_spec_json).

It holds exactly what a client needs to build the same workspace and strategy half as the server:
the run fields every config shares (`strategies.runconfig.RunFields`), with the wrapper sections
gathered under one `wrappers` key on the wire.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from fedtune.strategies.runconfig import RunFields, WrapperSections


class RunSpec(RunFields):
    model_config = ConfigDict(serialize_by_alias=True)

    # Named apart from its wire key so that `wrappers()` means the same here as on every run config.
    wrapper_sections: WrapperSections = Field(default_factory=dict, alias="wrappers")

    @classmethod
    def of(cls, config: RunFields) -> RunSpec:
        """The part of `config` a client needs."""
        fields: dict[str, Any] = {name: getattr(config, name) for name in RunFields.model_fields}
        return cls.model_validate({**fields, "wrappers": config.wrappers()})

    def wrappers(self) -> WrapperSections:
        return self.wrapper_sections
