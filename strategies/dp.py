"""Differential privacy around a tensor-valued strategy: the `[dp]` section, the wrapper and the accounting
both levels share.

`level = "client"`: DP-FedAvg, clipped client updates and a noised mean (`fedtune.strategies.dp_client`).
`level = "sample"`: DP-SGD on each client with opacus (`fedtune.strategies.dp_sample`). Client-level and
sample-level guarantees are different statements.

Accounting is opacus' RDPAccountant; a budget (`epsilon`) stops the run (client level) or retires the
client (sample level) before the step that would exceed it, and without `noise_multiplier` z is
calibrated (opacus `get_noise_multiplier`) to stay within the budget over the planned steps.

Noise and private sampling use torch generators seeded from the OS (`secrets`) unless `noise_seed`
is set for a reproducible experiment; a known seed voids the guarantee. torch's generator is not a
CSPRNG (opacus' secure_mode needs torchcsprng, which fedtune does not ship).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fedtune.strategies.api import (
    C,
    ClientStrategy,
    RunContext,
    ServerStrategy,
    StrategyDefinition,
    W,
    hash_seed,
)
from fedtune.strategies.wrappers import ClientWrapper
from fedtune.tasks.config import TaskConfig


class Config(BaseModel):
    """The `[dp]` section. Field order matters: each cross-field check sits on the later field."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    level: Literal["client", "sample"] = Field(
        "client", description="client: DP-FedAvg (clip updates, noise the mean); sample: DP-SGD on each client."
    )
    clipping_norm: float | None = Field(
        None, gt=0, validate_default=True,
        description="C: L2 bound of a client's update (client level, initial value if adaptive) or of one "
        "example's gradient (sample level). None at client level: no clipping.",
    )
    noise_multiplier: float | None = Field(
        None, ge=0, validate_default=True,
        description="z: noise std is z·C. None: calibrated from `epsilon` over the planned rounds, or 0 without one.",
    )
    epsilon: float | None = Field(
        None, gt=0, validate_default=True,
        description="Budget: the run (client level) or the client (sample level) stops before exceeding it.",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the reported (ε, δ).")
    adaptive_clipping: bool = Field(
        False, validate_default=True, description="Client level: quantile-based adaptive clipping (Andrew et al. 2021)."
    )
    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="Adaptive clipping: γ, the share of updates left unclipped."
    )
    clip_learning_rate: float = Field(0.2, gt=0, description="Adaptive clipping: η_C of C ← C·exp(−η_C(b̄ − γ)).")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="Adaptive clipping: σ_b, noise on the count of unclipped updates; None: m/20."
    )
    noise_seed: int | None = Field(
        None, ge=0, description="Seed for noise and private sampling, for reproducible experiments only. "
        "None: fresh OS randomness (a known seed voids the guarantee).",
    )

    @field_validator("clipping_norm")
    @classmethod
    def _sample_level_clips(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None and info.data.get("level") == "sample":
            raise ValueError("sample-level DP-SGD needs the per-example clipping bound; set dp.clipping_norm")
        return value

    @field_validator("noise_multiplier")
    @classmethod
    def _noise_needs_clipping(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value and "clipping_norm" in info.data and info.data["clipping_norm"] is None:
            raise ValueError(
                "noise without clipping: the noise is z·C, so set dp.clipping_norm (the sensitivity bound)"
            )
        return value

    @field_validator("epsilon")
    @classmethod
    def _budget_is_reachable(cls, value: float | None, info: ValidationInfo) -> float | None:
        data = info.data
        if value is not None and "clipping_norm" in data and data["clipping_norm"] is None:
            raise ValueError("a budget needs clipping; set dp.clipping_norm")
        if value is not None and data.get("noise_multiplier") == 0:
            raise ValueError("a budget cannot hold with dp.noise_multiplier = 0; raise it or leave it unset")
        if value is None and data.get("level") == "sample" and not data.get("noise_multiplier"):
            raise ValueError(
                "sample-level DP-SGD needs noise: set dp.epsilon (z is calibrated) or dp.noise_multiplier > 0"
            )
        return value

    @field_validator("adaptive_clipping")
    @classmethod
    def _adaptive_is_client_level(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("level") == "sample":
            raise ValueError("adaptive clipping is client-level (Andrew et al.); use level = 'client'")
        if value and "clipping_norm" in info.data and info.data["clipping_norm"] is None:
            raise ValueError("adaptive clipping starts from dp.clipping_norm; set it")
        return value


# ---------------------------------------------------------------------------------------------
# Accounting and private randomness, shared by both levels


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε after the given (noise multiplier, sample rate, steps) compositions, by opacus' RDP accountant."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def calibrated_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest z (opacus `get_noise_multiplier`, RDP, bisection to 0.01 in ε) whose ε after `steps`
    compositions at `sample_rate` stays within `epsilon`; cached, since clients of equal size share it."""
    return float(
        get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps)
    )


def private_generator(seed: int | None, *parts: object) -> torch.Generator:
    """A generator for noise or private sampling: OS-seeded, or derived from `seed` for experiments."""
    value = secrets.randbits(63) if seed is None else hash_seed(seed, *parts)
    return torch.Generator().manual_seed(value)


# ---------------------------------------------------------------------------------------------
# The wrapper and what both levels' halves share


class DpClientWrapper(ClientWrapper[C, W]):
    """Common base of both levels' client halves: the inner half and the `[dp]` section."""

    def __init__(self, inner: ClientStrategy[C, W], dp: Config):
        super().__init__(inner)
        self.dp = dp


def wrap(definition: StrategyDefinition, config: Config) -> StrategyDefinition:
    """The strategy with client-level or sample-level DP, keeping its config and workspace.

    The registry applies DP before any other wrapper, so the halves it wraps are the strategy's own and
    their seams (`HoldsGlobalTensors`, `TrainsLocally`) are checked on the strategy itself."""
    if definition.asynchronous:
        raise ValueError("dp: differential privacy's accounting assumes synchronous sampled rounds; it cannot be "
                         "combined with the [asynchronous] section")
    # The level modules import this one (Config, accounting), so they are imported on first use.
    from fedtune.strategies import dp_client, dp_sample

    def server(options: Any, context: RunContext) -> ServerStrategy[Any, Any]:
        inner = definition.server(options, context)
        if config.level == "client":
            return dp_client.ClientLevelServer(inner, config, definition.name)
        return dp_sample.SampleLevelServer(inner, config)

    def client(options: Any, context: RunContext, client_id: str) -> ClientStrategy[Any, Any]:
        inner = definition.client(options, context, client_id)
        if config.level == "client":
            return dp_client.ClientLevelClient(inner, config)
        return dp_sample.SampleLevelClient(inner, config, definition.name)

    def check_task(task: TaskConfig) -> None:
        if config.level == "sample":
            dp_sample.check_task(task)
        definition.check_task(task)

    return replace(definition, server=server, client=client, check_task=check_task,
                   summary=f"{definition.summary} With {config.level}-level differential privacy.")
