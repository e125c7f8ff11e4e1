"""Base classes for update transforms (DP, compression) that wrap another strategy's halves.

A wrapper holds the inner half and forwards every hook of the API to it; a concrete wrapper
overrides only what it changes (e.g. the client clips after `fit`, the server adds noise after
`aggregate`). The wrapped definition keeps the inner strategy's config and workspace, so the bases
are generic over them. `ClientStrategy.batch_generator` and `seeded` are not hooks but helpers a
half calls on itself, keyed on its own client id, which the wrapper shares with its inner half.

Seams (`api.HoldsGlobalTensors`, `api.TrainsLocally`) are not forwarded: a wrapper uses those of the
half it wraps directly, and does not pass them on, because it may change exactly what they promise
(compression sends `<name>|enc` blobs, not the global tensors' names; sample-level DP has taken the
local loop). DP, the one wrapper that needs seams, is applied innermost (`registry.WRAPPER_MODULES`),
so it always sees the strategy itself; a wrapper that is ever placed inside it must declare the
seams it keeps, with a method or property of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedtune.strategies.api import (
    C,
    ClientStrategy,
    ClientUpdate,
    DeviceProfile,
    Instruction,
    ReplyContract,
    ServerStrategy,
    TensorSpec,
    W,
)
from fedtune.tasks.data import TokenDataset


class ServerWrapper(ServerStrategy[C, W]):
    """Forwards every server hook to `inner`; state is saved under 'inner' plus the wrapper's own."""

    def __init__(self, inner: ServerStrategy[C, W]):
        super().__init__(inner.config, inner.context)
        self.inner = inner

    def initialize(self, workspace: W) -> None:
        self.inner.initialize(workspace)

    def sample_clients(self, round: int, available: Sequence[str]) -> list[str]:
        return self.inner.sample_clients(round, available)

    def instruction(self, round: int, client_id: str) -> Instruction:
        return self.inner.instruction(round, client_id)

    def update_specs(self) -> dict[str, TensorSpec]:
        return self.inner.update_specs()

    def client_update_specs(self, client_id: str) -> dict[str, TensorSpec]:
        return self.inner.client_update_specs(client_id)

    def shapes_differ(self) -> bool:
        return self.inner.shapes_differ()

    def reply_contract(self, client_id: str) -> ReplyContract:
        return self.inner.reply_contract(client_id)

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        self.inner.validate_update(update, round)

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        self.inner.aggregate(round, updates)

    def load_global_into(self, workspace: W) -> None:
        self.inner.load_global_into(workspace)

    def on_client_registered(self, client_id: str, profile: DeviceProfile) -> None:
        self.inner.on_client_registered(client_id, profile)

    def stop_reason(self, next_round: int) -> str | None:
        return self.inner.stop_reason(next_round)

    def round_metrics(self) -> dict[str, float]:
        return self.inner.round_metrics()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])


class ClientWrapper(ClientStrategy[C, W]):
    """Forwards every client hook to `inner`; state is saved under 'inner' plus the wrapper's own."""

    def __init__(self, inner: ClientStrategy[C, W]):
        super().__init__(inner.config, inner.context, inner.client_id)
        self.inner = inner

    def fit(self, workspace: W, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        return self.inner.fit(workspace, instruction, data)

    def idle(self, workspace: W, round: int, data: TokenDataset) -> None:
        self.inner.idle(workspace, round, data)

    def receive(self, workspace: W, instruction: Instruction) -> None:
        self.inner.receive(workspace, instruction)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
