"""Client-level differential privacy: DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018,
arXiv:1710.06963; docs/algorithms.md §5.5), around a strategy that holds its global state as tensors.

Each client clips its update Δ_i = θ_i − θ^t to L2 norm C over all its tensors jointly. The
server clips again (a no-op for honest clients; it is what bounds the sensitivity), takes the uniform
mean over the m sampled clients with the fixed denominator m (a lost reply counts as a zero update),
adds N(0, (z·C/m)²) to every coordinate (noise z·C on the sum) and gives θ^t + Δ̄ to the inner
strategy's `aggregate` as the round's single update. Sample weights n_i are not used under DP: every
client weighs 1/m, as in the paper's uniform-weight estimator and Flower's DP wrappers. Adaptive
clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, arXiv:1905.03871) moves C towards a
quantile of the update norms from the clients' noised "was not clipped" bits; the noise is split
between the bits and the update so that the combined multiplier stays z (their Theorem 1).

θ^t is the inner server half's `global_tensors` (the `HoldsGlobalTensors` seam); a strategy without
one (e.g. fedkseed, whose global state is a seed log) is refused when the server is initialised.

Accounting: one sampled-Gaussian step per aggregated round at q = m/N (q = 1 with full
participation). The inner strategy samples m clients uniformly without replacement; accounting that
as Poisson sampling at rate m/N is the convention of TFF and Flower, not a proof for fixed-size
sampling. A budget (`epsilon`) stops the run before the round that would exceed it; without
`noise_multiplier`, z is calibrated to stay within the budget over the planned rounds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from opacus.accountants import RDPAccountant

from fedtune.strategies.api import (
    C,
    ClientUpdate,
    DeviceProfile,
    HoldsGlobalTensors,
    Instruction,
    InvalidInstruction,
    InvalidUpdate,
    ReplyContract,
    ServerStrategy,
    TensorMap,
    W,
)
from fedtune.strategies.dp import Config, DpClientWrapper, calibrated_noise_multiplier, epsilon_of, private_generator
from fedtune.strategies.wrappers import ServerWrapper
from fedtune.tasks.data import TokenDataset

log = logging.getLogger(__name__)

CLIPPING_NORM = "dp_clipping_norm"
"""Instruction setting: the clipping norm C the client must apply this round."""
UNCLIPPED = "dp_unclipped"
"""Update metric under adaptive clipping: 1.0 when the client's update norm was ≤ C, else 0.0."""


def update_delta(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> TensorMap:
    """θ_i − θ^t per tensor in float64, over the reference's tensors."""
    delta = {}
    for name, base in reference.items():
        if not base.is_floating_point():
            raise ValueError(f"dp: tensor {name!r} is {base.dtype}; DP clips and noises floating-point tensors only")
        delta[name] = tensors[name].double() - base.double()
    return delta


def clip_update(delta: Mapping[str, torch.Tensor], clipping_norm: float) -> tuple[TensorMap, float]:
    """Flat clipping (§5.5 step 2): Δ·min(1, C/‖Δ‖₂), the norm over all tensors jointly, in float64.

    Returns the clipped tensors and the norm before clipping."""
    norm = math.sqrt(sum(float(tensor.double().square().sum()) for tensor in delta.values()))
    scale = 1.0 if norm <= clipping_norm else clipping_norm / norm
    return {name: tensor.double() * scale for name, tensor in delta.items()}, norm


class ClientLevelServer(ServerWrapper[C, W]):
    """Clips, averages with the fixed denominator m, noises and accounts; stops before the budget."""

    def __init__(self, inner: ServerStrategy[C, W], dp: Config, strategy: str):
        super().__init__(inner)
        if dp.clipping_norm is not None and getattr(inner.config, "step_normalization", "none") != "none":
            raise ValueError(
                "dp: client-level DP averages the clipped updates with weight 1/m and hands the inner strategy one "
                "noised mean, so options.step_normalization has no per-client steps to normalise; leave it 'none'"
            )
        self.dp = dp
        self.strategy = strategy
        self.accountant = RDPAccountant()
        # None: no clipping (and hence no noise), and the wrapper is the identity on the inner strategy.
        self.clipping_norm = dp.clipping_norm
        self.noise_multiplier = 0.0 if dp.noise_multiplier is None and dp.epsilon is None else dp.noise_multiplier
        self.registered: set[str] = set()
        self.population = 0
        self.round_sampled = 0
        self.round_rate: float | None = None

    def tensor_strategy(self) -> HoldsGlobalTensors:
        """The inner half through its `HoldsGlobalTensors` seam: θ^t, which every delta is taken against."""
        if not isinstance(self.inner, HoldsGlobalTensors):
            raise TypeError(
                f"dp: strategy {self.strategy!r} exposes no global_tensors (its server half "
                f"{type(self.inner).__name__} does not implement HoldsGlobalTensors); client-level DP wraps "
                "tensor-valued strategies only (e.g. fedavg_lora, ffa_lora, admm)"
            )
        return self.inner

    def initialize(self, workspace: W) -> None:
        """The inner strategy's initial state; a strategy without global tensors is refused here, before
        any client trains (they exist from `initialize` on)."""
        super().initialize(workspace)
        self.tensor_strategy()
        if self.inner.shapes_differ():
            raise TypeError(f"dp: strategy {self.strategy!r} gives its clients adapters of different shapes "
                            "(options.capacity); client-level DP clips every update against one global adapter, "
                            "so it needs every client at the full shape")

    def on_client_registered(self, client_id: str, profile: DeviceProfile) -> None:
        super().on_client_registered(client_id, profile)
        self.registered.add(client_id)
        self.population = max(self.population, len(self.registered))

    def sample_rate(self, population: int) -> float:
        """q = m/N for the inner strategy's sampling; q = 1 when N is not known yet (no amplification)."""
        if population <= 0:
            return 1.0
        wanted = self.config.clients_per_round or population
        return min(wanted, population) / population

    def current_noise_multiplier(self) -> float:
        """z as configured, or calibrated once from the budget and the planned rounds at the known q."""
        if self.noise_multiplier is None:
            assert self.dp.epsilon is not None
            self.noise_multiplier = calibrated_noise_multiplier(
                self.dp.epsilon, self.dp.delta, self.sample_rate(self.population), self.context.rounds
            )
        return self.noise_multiplier

    def update_noise_multiplier(self, sampled: int) -> float:
        """The share of z left for the update when adaptive clipping spends some on the bits:
        z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Theorem 1)."""
        total = self.current_noise_multiplier()
        if not self.dp.adaptive_clipping or total == 0:
            return total
        count_stddev = self.count_stddev(sampled)
        if 2 * count_stddev <= total:
            raise ValueError(
                f"dp.clipped_count_stddev: {count_stddev:g} leaves no noise for the update; it must exceed z/2 = "
                f"{total / 2:g}"
            )
        return (total ** -2 - (2 * count_stddev) ** -2) ** -0.5

    def count_stddev(self, sampled: int) -> float:
        return self.dp.clipped_count_stddev or sampled / 20

    def epsilon(self) -> float:
        return epsilon_of(self.accountant.history, self.dp.delta)

    def epsilon_after_one_more(self, rate: float) -> float:
        return epsilon_of([*self.accountant.history, (self.current_noise_multiplier(), rate, 1)], self.dp.delta)

    def stop_reason(self, next_round: int) -> str | None:
        reason = super().stop_reason(next_round)
        if reason or self.dp.epsilon is None:
            return reason
        spent = self.epsilon_after_one_more(self.sample_rate(self.population))
        if spent > self.dp.epsilon:
            return (
                f"dp: round {next_round} would bring epsilon to {spent:.4f} > budget dp.epsilon = "
                f"{self.dp.epsilon} (delta {self.dp.delta}); spent so far {self.epsilon():.4f}"
            )
        return None

    def sample_clients(self, round: int, available: Sequence[str]) -> list[str]:
        selected = self.inner.sample_clients(round, available)
        self.population = max(len(available), 1)
        rate = len(selected) / self.population
        if selected and self.dp.epsilon is not None and self.epsilon_after_one_more(rate) > self.dp.epsilon:
            log.warning("dp: round %d skipped: sampling %d of %d would exceed the budget", round, len(selected),
                        len(available))
            selected = []
        if selected:
            self.update_noise_multiplier(len(selected))  # a bad noise split fails before anyone trains
        self.round_sampled, self.round_rate = len(selected), rate
        return selected

    def instruction(self, round: int, client_id: str) -> Instruction:
        instruction = super().instruction(round, client_id)
        if self.clipping_norm is None:
            return instruction
        settings = {**instruction.settings, CLIPPING_NORM: float(self.clipping_norm)}
        return instruction.model_copy(update={"settings": settings})

    def reply_contract(self, client_id: str) -> ReplyContract:
        inner = super().reply_contract(client_id)
        clipped = (f"; the change from the received tensors clipped to L2 norm {CLIPPING_NORM} (a setting) over all "
                   f"tensors jointly, and under adaptive clipping the metric {UNCLIPPED} = 1 if it needed none, else 0")
        return inner.model_copy(update={"doc": inner.doc + clipped})

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        super().validate_update(update, round)
        adaptive = self.clipping_norm is not None and self.dp.adaptive_clipping
        if adaptive and update.metrics.get(UNCLIPPED) not in (0.0, 1.0):
            raise InvalidUpdate(
                f"update from {update.client_id!r}: metric {UNCLIPPED!r} must be 0 or 1 under adaptive clipping, "
                f"got {update.metrics.get(UNCLIPPED)}"
            )

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        clipping_norm = self.clipping_norm
        if clipping_norm is None:
            self.inner.aggregate(round, updates)
            return
        ordered = sorted(updates, key=lambda update: update.client_id)
        reference = self.tensor_strategy().global_tensors
        totals = {name: torch.zeros(base.shape, dtype=torch.float64) for name, base in reference.items()}
        for update in ordered:  # one float64 delta at a time: memory stays at two adapters
            clipped, _ = clip_update(update_delta(update.tensors, reference), clipping_norm)
            for name, delta in clipped.items():
                totals[name] += delta
        sampled = max(self.round_sampled, len(ordered))
        stddev = self.update_noise_multiplier(sampled) * clipping_norm
        generator = private_generator(self.dp.noise_seed, "dp-fedavg", round)
        privatized = {}
        for name in sorted(reference):
            base, total = reference[name], totals[name]
            if stddev > 0:
                total += torch.normal(0.0, stddev, base.shape, generator=generator, dtype=torch.float64)
            privatized[name] = (base.double() + total / sampled).to(base.dtype)
        mean = ClientUpdate(
            client_id="dp-fedavg-mean", round=round, num_examples=sum(u.num_examples for u in ordered),
            tensors=privatized,
        )
        self.inner.aggregate(round, [mean])
        if self.current_noise_multiplier() > 0:
            self.accountant.step(
                noise_multiplier=self.current_noise_multiplier(),
                sample_rate=self.round_rate if self.round_rate is not None else self.sample_rate(self.population),
            )
        if self.dp.adaptive_clipping:
            self.clipping_norm = self.adapted_clipping_norm(clipping_norm, ordered, sampled, generator)
        self.round_sampled, self.round_rate = 0, None

    def adapted_clipping_norm(
        self, clipping_norm: float, updates: Sequence[ClientUpdate], sampled: int, generator: torch.Generator
    ) -> float:
        """Geometric update C ← C·exp(−η_C(b̄ − γ)), b̄ the noised share of unclipped updates
        (Andrew et al. 2021, Algorithm 1)."""
        unclipped = sum(update.metrics[UNCLIPPED] for update in updates)
        if self.current_noise_multiplier() > 0:
            unclipped += float(torch.normal(0.0, self.count_stddev(sampled), (1,), generator=generator,
                                            dtype=torch.float64))
        share = unclipped / sampled
        return clipping_norm * math.exp(-self.dp.clip_learning_rate * (share - self.dp.target_quantile))

    def round_metrics(self) -> dict[str, float]:
        metrics = super().round_metrics()
        if self.clipping_norm is None:
            return metrics
        metrics["dp_clipping_norm"] = float(self.clipping_norm)
        if self.current_noise_multiplier() > 0:
            metrics.update(epsilon=self.epsilon(), delta=self.dp.delta,
                           dp_noise_multiplier=self.current_noise_multiplier())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "registered": sorted(self.registered),
            "population": self.population,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])
        self.noise_multiplier = state["noise_multiplier"]
        self.clipping_norm = state["clipping_norm"]
        self.registered = set(state["registered"])
        self.population = state["population"]


class ClientLevelClient(DpClientWrapper[C, W]):
    """Trains as the inner client, then sends θ^t + clip(θ_i − θ^t) with C from the instruction."""

    def fit(self, workspace: W, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        update = self.inner.fit(workspace, instruction, data)
        if CLIPPING_NORM not in instruction.settings:
            return update
        clipping_norm = instruction.settings[CLIPPING_NORM]
        if isinstance(clipping_norm, bool) or not isinstance(clipping_norm, (int, float)) or not clipping_norm > 0:
            raise InvalidInstruction(
                f"instruction setting {CLIPPING_NORM!r} must be a positive number, got {clipping_norm!r}"
            )
        clipped, norm = clip_update(update_delta(update.tensors, instruction.tensors), float(clipping_norm))
        tensors = {
            name: (instruction.tensors[name].double() + clipped[name]).to(instruction.tensors[name].dtype)
            for name in clipped
        }
        metrics = dict(update.metrics)
        if self.dp.adaptive_clipping:
            metrics[UNCLIPPED] = float(norm <= clipping_norm)
        return update.model_copy(update={"tensors": tensors, "metrics": metrics})


