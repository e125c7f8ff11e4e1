"""A noisy-link simulator for fedsim: additive Gaussian noise and packet loss on each direction.

The noise model is the one used for "Noise-Robust and Resource-Efficient ADMM-based Federated
Learning" (Lari et al., arXiv:2409.13451; docs/algorithms.md §4.2): a client receives `w + η` and the
server receives `u + ζ`, with η, ζ zero-mean Gaussian, independent across clients, rounds and
directions. The noise level is a variance per element, or an SNR in dB turned into one per tensor
as `σ² = ‖x‖² / (numel · 10^(SNR/10))` (docs/algorithms.md §4.6). Only floating-point tensors are
noised (integer tensors such as seed indices stand for digitally coded fields); settings and
metrics pass untouched. A lost packet means the message never arrives.

Every draw comes from a generator seeded by (channel seed, round, client, direction), so a run is
reproducible whatever the order clients are served in. The channel is off by default.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedtune.strategies.api import ClientUpdate, Instruction, TensorMap, hash_seed

Direction = Literal["down", "up"]


class LinkConfig(BaseModel):
    """One direction of the link: Gaussian noise (SNR or variance, not both) and packet loss."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    snr_db: float | None = Field(None, description="Per-tensor signal-to-noise ratio in dB.")
    noise_variance: float | None = Field(None, ge=0, description="Noise variance per element.")
    loss_rate: float = Field(0.0, ge=0, lt=1, description="Probability that a whole message is lost.")

    @model_validator(mode="after")
    def _one_noise_level(self) -> LinkConfig:
        if self.snr_db is not None and self.noise_variance is not None:
            raise ValueError("give snr_db or noise_variance, not both")
        return self

    @property
    def noisy(self) -> bool:
        return self.snr_db is not None or bool(self.noise_variance)

    def variance_for(self, tensor: torch.Tensor) -> float:
        """The noise variance per element this link adds to `tensor`."""
        if self.snr_db is not None:
            signal_power = float(tensor.detach().to(torch.float64).pow(2).mean()) if tensor.numel() else 0.0
            return signal_power / 10 ** (self.snr_db / 10)
        return self.noise_variance or 0.0


class ChannelConfig(BaseModel):
    """The `[channel]` section of a fedsim config; absent or empty means perfect links."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    downlink: LinkConfig = Field(default_factory=LinkConfig, description="Server to client.")
    uplink: LinkConfig = Field(default_factory=LinkConfig, description="Client to server.")
    seed: int | None = Field(None, ge=0, description="Seed of the noise and losses; default: the run seed.")


class Channel:
    """Applies a `ChannelConfig` to messages; `Channel(None, seed)` is the perfect channel."""

    def __init__(self, config: ChannelConfig | None, run_seed: int):
        self.config = config or ChannelConfig()
        self.seed = run_seed if self.config.seed is None else self.config.seed

    def link(self, direction: Direction) -> LinkConfig:
        return self.config.downlink if direction == "down" else self.config.uplink

    def transmit(self, tensors: TensorMap, round: int, client_id: str, direction: Direction) -> TensorMap | None:
        """What arrives at the other end, or None when the message is lost."""
        link = self.link(direction)
        if not link.noisy and link.loss_rate == 0:
            return tensors
        generator = torch.Generator().manual_seed(hash_seed(self.seed, "channel", round, client_id, direction))
        if link.loss_rate and float(torch.rand((), generator=generator, dtype=torch.float64)) < link.loss_rate:
            return None
        if not link.noisy:
            return tensors
        received = {}
        for name in sorted(tensors):
            tensor = tensors[name]
            noisy = tensor.is_floating_point()
            received[name] = _add_noise(tensor, link.variance_for(tensor), generator) if noisy else tensor
        return {name: received[name] for name in tensors}

    def downlink(self, instruction: Instruction, client_id: str) -> Instruction | None:
        tensors = self.transmit(instruction.tensors, instruction.round, client_id, "down")
        return None if tensors is None else instruction.model_copy(update={"tensors": tensors})

    def uplink(self, update: ClientUpdate) -> ClientUpdate | None:
        tensors = self.transmit(update.tensors, update.round, update.client_id, "up")
        return None if tensors is None else update.model_copy(update={"tensors": tensors})


def _add_noise(tensor: torch.Tensor, variance: float, generator: torch.Generator) -> torch.Tensor:
    """`tensor + N(0, variance)` drawn in float64 for float64 tensors, float32 otherwise."""
    work_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    noise = torch.randn(tensor.shape, generator=generator, dtype=work_dtype) * variance**0.5
    return (tensor.to(work_dtype) + noise).to(tensor.dtype)
