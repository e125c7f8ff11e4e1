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

import torch

from fedtune.simulations.config import ChannelConfig, Direction, LinkConfig
from fedtune.strategies.api import ClientUpdate, Instruction, TensorMap, hash_seed


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
            received[name] = _add_noise(tensor, noise_variance(link, tensor), generator) if noisy else tensor
        return {name: received[name] for name in tensors}

    def downlink(self, instruction: Instruction, client_id: str) -> Instruction | None:
        tensors = self.transmit(instruction.tensors, instruction.round, client_id, "down")
        return None if tensors is None else instruction.model_copy(update={"tensors": tensors})

    def uplink(self, update: ClientUpdate) -> ClientUpdate | None:
        tensors = self.transmit(update.tensors, update.round, update.client_id, "up")
        return None if tensors is None else update.model_copy(update={"tensors": tensors})


def noise_variance(link: LinkConfig, tensor: torch.Tensor) -> float:
    """The noise variance per element `link` adds to `tensor`."""
    if link.snr_db is not None:
        signal_power = float(tensor.detach().to(torch.float64).pow(2).mean()) if tensor.numel() else 0.0
        return signal_power / 10 ** (link.snr_db / 10)
    return link.noise_variance or 0.0


def _add_noise(tensor: torch.Tensor, variance: float, generator: torch.Generator) -> torch.Tensor:
    """`tensor + N(0, variance)` drawn in float64 for float64 tensors, float32 otherwise."""
    work_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    noise = torch.randn(tensor.shape, generator=generator, dtype=work_dtype) * variance**0.5
    return (tensor.to(work_dtype) + noise).to(tensor.dtype)
