"""What a strategy is to the rest of fedtune, without torch: the config base its options extend, the
device profile a client registers with, the run facts both halves get, and the registry entry.

Config files are validated against these alone (plus pydantic), so `fedsim run bad.toml` or
`fedserver start bad.toml` names a wrong field before torch, transformers or peft are loaded; only a
strategy's own options need its module. `fedtune.strategies.api` re-exports all of them, and plug-in
strategies keep importing them from there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fedtune.strategies.api import ClientStrategy, ServerStrategy, Workspace
    from fedtune.tasks.config import TaskConfig, TrainConfig
    from fedtune.tasks.models import ModelBundle


class StrategyConfig(BaseModel):
    """Fields every strategy understands; a strategy's own config subclasses this."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    clients_per_round: int | None = Field(None, ge=1, description="Clients sampled per round; None = all.")


class DeviceProfile(BaseModel):
    """What a client says about its device when it registers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    memory_mb: int = Field(0, ge=0, description="Usable memory; 0 = unknown.")
    compute_class: str = Field("cpu", max_length=64, description="e.g. cpu, gpu, phone.")
    codecs: tuple[str, ...] = Field(("none",), description="Update codecs the client can encode.")
    threads: int = Field(0, ge=0, description="CPU threads the client trains with; 0 = unknown.")
    accelerator: str = Field("", max_length=200, description="What it trains on besides the CPU, e.g. "
                                                             "'cuda: NVIDIA H200'; empty = the CPU alone.")
    step_ms: float = Field(0.0, ge=0, allow_inf_nan=False, description="Milliseconds one training step (forward and "
                           "backward of one batch) took in the client's probe on the run's model; 0 = not measured.")


@dataclass(frozen=True)
class RunContext:
    """Run-wide facts both halves may need."""

    seed: int
    rounds: int
    train: TrainConfig
    model_kind: str


def accept_any_task(task: TaskConfig) -> None:
    """`StrategyDefinition.check_task` of a strategy whose local work honours every task setting."""
    del task


@dataclass(frozen=True)
class StrategyDefinition:
    """A registry entry: the config model, both halves and how to build the workspace.

    `server` and `client` are classes or any factories with the same signature, which is how
    wrappers (DP, compression) build a definition around another one.
    """

    name: str
    config: type[StrategyConfig]
    server: Callable[[Any, RunContext], ServerStrategy[Any, Any]]
    client: Callable[[Any, RunContext, str], ClientStrategy[Any, Any]]
    build_workspace: Callable[[ModelBundle, Any, RunContext], Workspace]
    summary: str = ""
    async_unsupported: str | None = "it does not declare that it can aggregate updates computed on older global models"
    """Why the `[asynchronous]` mode (FedBuff) cannot wrap this strategy; None when it can. A strategy
    that sets None promises: its server half `HoldsGlobalTensors`, its instruction tensors are those
    global tensors, and `aggregate` is a weighted mean of client states in their space (fedavg_lora)."""
    asynchronous: bool = False
    """Set by the `[asynchronous]` wrapper: updates may have been computed on older global models, which
    a wrapper applied outside it (DP, compression) must either handle or refuse at config time."""
    check_task: Callable[[TaskConfig], None] = accept_any_task
    """Refuses task settings its local work cannot honour (e.g. `train.max_grad_norm` under DP-SGD, a
    `model.device` its own tensors cannot follow) with a ValueError naming the field; run on every config
    at validation time. A wrapper that adds constraints chains the inner definition's check."""

    def parse_config(self, options: Mapping[str, Any]) -> StrategyConfig:
        return self.config.model_validate(dict(options))
