"""Differential privacy around a tensor-valued strategy: client-level DP-FedAvg or sample-level DP-SGD.

Client level (DP-FedAvg: McMahan, Ramage, Talwar, Zhang, ICLR 2018, arXiv:1710.06963; algorithms.md
§5.5). Each client clips its update Δ_i = θ_i − θ^t to L2 norm C over all its tensors jointly. The
server clips again (a no-op for honest clients; it is what bounds the sensitivity), takes the uniform
mean over the m sampled clients with the fixed denominator m (a lost reply counts as a zero update),
adds N(0, (z·C/m)²) to every coordinate (noise z·C on the sum) and gives θ^t + Δ̄ to the inner
strategy's `aggregate` as the round's single update. Sample weights n_i are not used under DP: every
client weighs 1/m, as in the paper's uniform-weight estimator and Flower's DP wrappers. Adaptive
clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, arXiv:1905.03871) moves C towards a
quantile of the update norms from the clients' noised "was not clipped" bits; the noise is split
between the bits and the update so that the combined multiplier stays z (their Theorem 1).

Accounting is opacus' RDPAccountant: one sampled-Gaussian step per aggregated round at q = m/N
(q = 1 with full participation). The inner strategy samples m clients uniformly without replacement;
accounting that as Poisson sampling at rate m/N is the convention of TFF and Flower, not a proof for
fixed-size sampling. A budget (`epsilon`) stops the run before the round that would exceed it;
without `noise_multiplier`, z is calibrated (opacus `get_noise_multiplier`) to stay within the budget
over the planned rounds.

Sample level (DP-SGD: Abadi et al., CCS 2016, arXiv:1607.00133; FFA-LoRA's setting, algorithms.md
§2.2). Every client trains with opacus' GradSampleModule and DPOptimizer over its trainable adapter
tensors only (FFA-LoRA: B and the head; its frozen A gets no noise and is in no optimizer), with
Poisson sampling at q_i = batch/n_i, per-example clipping to C and noise z·C on each summed batch
gradient. Each client keeps its own RDP accountant (steps = local steps × rounds it trained), reports
`epsilon` and `delta` with every update, and retires (`ClientRetired`) before a round whose steps
would exceed its budget. Client-level and sample-level guarantees are different statements.

Noise and private sampling use torch generators seeded from the OS (`secrets`) unless `noise_seed`
is set for a reproducible experiment; a known seed voids the guarantee. torch's generator is not a
CSPRNG (opacus' secure_mode needs torchcsprng, which fedtune does not ship).
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn
from torch.nn import functional

from fedtune.strategies.api import (
    ClientRetired,
    ClientStrategy,
    ClientUpdate,
    DeviceProfile,
    Instruction,
    InvalidInstruction,
    InvalidUpdate,
    RunContext,
    ServerStrategy,
    StrategyConfig,
    StrategyDefinition,
    TensorMap,
    Workspace,
    hash_seed,
)
from fedtune.strategies.wrappers import ClientWrapper, ServerWrapper
from fedtune.tasks.data import IGNORE_INDEX, TokenDataset
from fedtune.tasks.training import make_optimizer, train_steps

log = logging.getLogger(__name__)

CLIPPING_NORM = "dp_clipping_norm"
"""Instruction setting: the clipping norm C the client must apply this round."""
UNCLIPPED = "dp_unclipped"
"""Update metric under adaptive clipping: 1.0 when the client's update norm was ≤ C, else 0.0."""


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
    target_quantile: float = Field(0.5, gt=0, lt=1, description="Adaptive clipping: γ, the share of updates left unclipped.")
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
# Pure kernels


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


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε after the given (noise multiplier, sample rate, steps) compositions, by opacus' RDP accountant."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def calibrated_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest z (opacus `get_noise_multiplier`, RDP, bisection to 0.01 in ε) whose ε after `steps`
    compositions at `sample_rate` stays within `epsilon`; cached, since clients of equal size share it."""
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps))


def private_generator(seed: int | None, *parts: object) -> torch.Generator:
    """A generator for noise or private sampling: OS-seeded, or derived from `seed` for experiments."""
    value = secrets.randbits(63) if seed is None else hash_seed(seed, *parts)
    return torch.Generator().manual_seed(value)


# ---------------------------------------------------------------------------------------------
# Client level: DP-FedAvg


class ClientLevelServer(ServerWrapper):
    """Clips, averages with the fixed denominator m, noises and accounts; stops before the budget."""

    def __init__(self, inner: ServerStrategy, dp: Config, strategy: str):
        super().__init__(inner)
        self.dp = dp
        self.strategy = strategy
        self.accountant = RDPAccountant()
        self.clipping_norm = dp.clipping_norm
        self.noise_multiplier = 0.0 if dp.noise_multiplier is None and dp.epsilon is None else dp.noise_multiplier
        self.registered: set[str] = set()
        self.population = 0
        self.round_sampled = 0
        self.round_rate: float | None = None

    @property
    def privatizes(self) -> bool:
        """Without clipping (and hence without noise) the wrapper is the identity on the inner strategy."""
        return self.clipping_norm is not None

    def initialize(self, workspace: Workspace) -> None:
        super().initialize(workspace)
        tensors = getattr(self.inner, "global_tensors", None)
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise TypeError(
                f"dp: strategy {self.strategy!r} exposes no global_tensors; client-level DP wraps "
                "tensor-valued strategies only (e.g. fedavg_lora, ffa_lora)"
            )

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
        if not self.privatizes:
            return instruction
        settings = {**instruction.settings, CLIPPING_NORM: float(self.clipping_norm)}
        return instruction.model_copy(update={"settings": settings})

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        super().validate_update(update, round)
        if self.privatizes and self.dp.adaptive_clipping and update.metrics.get(UNCLIPPED) not in (0.0, 1.0):
            raise InvalidUpdate(
                f"update from {update.client_id!r}: metric {UNCLIPPED!r} must be 0 or 1 under adaptive clipping, "
                f"got {update.metrics.get(UNCLIPPED)}"
            )

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        if not self.privatizes:
            self.inner.aggregate(round, updates)
            return
        ordered = sorted(updates, key=lambda update: update.client_id)
        reference: TensorMap = self.inner.global_tensors
        totals = {name: torch.zeros(base.shape, dtype=torch.float64) for name, base in reference.items()}
        for update in ordered:  # one float64 delta at a time: memory stays at two adapters
            clipped, _ = clip_update(update_delta(update.tensors, reference), self.clipping_norm)
            for name, delta in clipped.items():
                totals[name] += delta
        sampled = max(self.round_sampled, len(ordered))
        stddev = self.update_noise_multiplier(sampled) * self.clipping_norm
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
            self.adapt_clipping_norm(ordered, sampled, generator)
        self.round_sampled, self.round_rate = 0, None

    def adapt_clipping_norm(self, updates: Sequence[ClientUpdate], sampled: int, generator: torch.Generator) -> None:
        """Geometric update C ← C·exp(−η_C(b̄ − γ)), b̄ the noised share of unclipped updates
        (Andrew et al. 2021, Algorithm 1)."""
        unclipped = sum(update.metrics[UNCLIPPED] for update in updates)
        if self.current_noise_multiplier() > 0:
            unclipped += float(torch.normal(0.0, self.count_stddev(sampled), (1,), generator=generator,
                                            dtype=torch.float64))
        share = unclipped / sampled
        self.clipping_norm *= math.exp(-self.dp.clip_learning_rate * (share - self.dp.target_quantile))

    def round_metrics(self) -> dict[str, float]:
        metrics = super().round_metrics()
        if not self.privatizes:
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


class DpClientWrapper(ClientWrapper):
    """Common client half: the DP config, and the idle hook passed through to the inner client."""

    def __init__(self, inner: ClientStrategy, dp: Config):
        super().__init__(inner)
        self.dp = dp


class ClientLevelClient(DpClientWrapper):
    """Trains as the inner client, then sends θ^t + clip(θ_i − θ^t) with C from the instruction."""

    def fit(self, workspace: Workspace, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        update = self.inner.fit(workspace, instruction, data)
        if CLIPPING_NORM not in instruction.settings:
            return update
        clipping_norm = instruction.settings[CLIPPING_NORM]
        if isinstance(clipping_norm, bool) or not isinstance(clipping_norm, (int, float)) or not clipping_norm > 0:
            raise InvalidInstruction(f"instruction setting {CLIPPING_NORM!r} must be a positive number, got {clipping_norm!r}")
        clipped, norm = clip_update(update_delta(update.tensors, instruction.tensors), float(clipping_norm))
        tensors = {
            name: (instruction.tensors[name].double() + clipped[name]).to(instruction.tensors[name].dtype)
            for name in clipped
        }
        metrics = dict(update.metrics)
        if self.dp.adaptive_clipping:
            metrics[UNCLIPPED] = float(norm <= clipping_norm)
        return update.model_copy(update={"tensors": tensors, "metrics": metrics})


# ---------------------------------------------------------------------------------------------
# Sample level: DP-SGD with opacus on each client


@dataclass
class LossOutput:
    loss: torch.Tensor


class PerExampleLoss(nn.Module):
    """The mean over examples of each example's own loss, which per-example clipping needs.

    HF's causal-LM loss averages over every target token of the batch, so one example's gradient
    would depend on the other examples' lengths. A row whose labels are all ignored contributes 0.
    """

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        if self.kind == "seq_cls":
            per_example = functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        else:
            targets, logits = labels[:, 1:], logits[:, :-1]
            per_token = functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(targets.shape)
            per_example = per_token.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        return LossOutput(loss=per_example.mean())


def noise_only_batch(data: TokenDataset) -> dict[str, torch.Tensor]:
    """Stands in for an empty Poisson batch: one padding row with every label ignored, so the step adds
    noise to a zero gradient sum, as opacus does for empty batches (HF models reject zero rows)."""
    labels_shape = (1,) if data.kind == "seq_cls" else (1, 1)
    return {
        "input_ids": torch.full((1, 1), data.pad_token_id, dtype=torch.long),
        "attention_mask": torch.ones((1, 1), dtype=torch.long),
        "labels": torch.full(labels_shape, IGNORE_INDEX, dtype=torch.long),
    }


def poisson_batches(data: TokenDataset, sampler: UniformWithReplacementSampler, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches in which every example is drawn independently with the sampler's rate."""
    produced = 0
    while produced < steps:
        for indices in sampler:
            if produced == steps:
                return
            produced += 1
            yield data.collate([data.examples[i] for i in indices]) if indices else noise_only_batch(data)


class SampleLevelClient(DpClientWrapper):
    """DP-SGD in place of the inner client's local loop; its own accountant; retires before its budget."""

    def __init__(self, inner: ClientStrategy, dp: Config, strategy: str):
        super().__init__(inner, dp)
        if not hasattr(inner, "local_trainer"):
            raise TypeError(
                f"dp.level = 'sample': strategy {strategy!r} has no local_trainer hook for DP-SGD "
                "(supported: fedavg_lora, ffa_lora and their subclasses)"
            )
        inner.local_trainer = self.train_privately
        self.accountant = RDPAccountant()
        self.noise_multiplier = dp.noise_multiplier

    def sample_rate(self, data: TokenDataset) -> float:
        return min(1.0, self.context.train.batch_size / len(data))

    def current_noise_multiplier(self, rate: float) -> float:
        """z as configured, or calibrated once so the planned rounds × local steps stay within the budget."""
        if self.noise_multiplier is None:
            assert self.dp.epsilon is not None
            self.noise_multiplier = calibrated_noise_multiplier(
                self.dp.epsilon, self.dp.delta, rate, self.context.rounds * self.context.train.local_steps
            )
        return self.noise_multiplier

    def epsilon(self) -> float:
        return epsilon_of(self.accountant.history, self.dp.delta)

    def fit(self, workspace: Workspace, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        rate = self.sample_rate(data)
        planned = (self.current_noise_multiplier(rate), rate, self.context.train.local_steps)
        if self.dp.epsilon is not None:
            spent = epsilon_of([*self.accountant.history, planned], self.dp.delta)
            if spent > self.dp.epsilon:
                raise ClientRetired(
                    f"client {self.client_id!r}: round {instruction.round} would bring its epsilon to {spent:.4f} > "
                    f"budget dp.epsilon = {self.dp.epsilon}; it retires with epsilon {self.epsilon():.4f}"
                )
        update = self.inner.fit(workspace, instruction, data)
        metrics = {**update.metrics, "epsilon": self.epsilon(), "delta": self.dp.delta}
        return update.model_copy(update={"metrics": metrics})

    def train_privately(self, model: nn.Module, params: list[nn.Parameter], data: TokenDataset, round: int) -> float:
        """opacus DP-SGD over `params` only; the shared workspace model is left without hooks or
        per-sample state for the next client and for evaluation."""
        train = self.context.train
        rate = self.sample_rate(data)
        optimizer = DPOptimizer(
            make_optimizer(params, train),
            noise_multiplier=self.current_noise_multiplier(rate),
            max_grad_norm=self.dp.clipping_norm,
            expected_batch_size=min(train.batch_size, len(data)),
            generator=private_generator(self.dp.noise_seed, "dp-sgd-noise", self.client_id, round),
        )
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=rate))
        sampler = UniformWithReplacementSampler(
            num_samples=len(data), sample_rate=rate,
            generator=private_generator(self.dp.noise_seed, "dp-sgd-sampling", self.client_id, round),
        )
        private_model = GradSampleModule(PerExampleLoss(model, data.kind))
        try:
            with warnings.catch_warnings():
                # The frozen embeddings need no input gradients; torch warns once per module about it.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                return train_steps(private_model, params, poisson_batches(data, sampler, train.local_steps), train,
                                   optimizer=optimizer)
        finally:
            optimizer.zero_grad(set_to_none=True)
            private_model._close()
            for parameter in params:
                if hasattr(parameter, "summed_grad"):
                    del parameter.summed_grad

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountant": self.accountant.state_dict(),
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])
        self.noise_multiplier = state["noise_multiplier"]


class SampleLevelServer(ServerWrapper):
    """Aggregation is the inner strategy's (DP-SGD already privatised each client's data); it checks each
    reply's reported ε against the budget and reports the largest client ε so far."""

    def __init__(self, inner: ServerStrategy, dp: Config):
        super().__init__(inner)
        self.dp = dp
        self.largest_epsilon = 0.0

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        super().validate_update(update, round)
        spent = update.metrics.get("epsilon")
        if spent is None:
            raise InvalidUpdate(f"update from {update.client_id!r}: metric 'epsilon' is missing under sample-level DP")
        if self.dp.epsilon is not None and spent > self.dp.epsilon:
            raise InvalidUpdate(
                f"update from {update.client_id!r}: metric 'epsilon' = {spent} exceeds the budget dp.epsilon = "
                f"{self.dp.epsilon}"
            )

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        super().aggregate(round, updates)
        self.largest_epsilon = max([self.largest_epsilon, *(u.metrics["epsilon"] for u in updates)])

    def round_metrics(self) -> dict[str, float]:
        return {**super().round_metrics(), "epsilon": self.largest_epsilon, "delta": self.dp.delta}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "largest_epsilon": self.largest_epsilon}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.largest_epsilon = state["largest_epsilon"]


def wrap(definition: StrategyDefinition, config: Config) -> StrategyDefinition:
    """The strategy with client-level or sample-level DP, keeping its config and workspace."""
    server: Callable[[StrategyConfig, RunContext], ServerStrategy]
    client: Callable[[StrategyConfig, RunContext, str], ClientStrategy]
    if config.level == "client":
        def server(options, context):
            return ClientLevelServer(definition.server(options, context), config, definition.name)

        def client(options, context, client_id):
            return ClientLevelClient(definition.client(options, context, client_id), config)
    else:
        def server(options, context):
            return SampleLevelServer(definition.server(options, context), config)

        def client(options, context, client_id):
            return SampleLevelClient(definition.client(options, context, client_id), config, definition.name)
    return replace(definition, server=server, client=client,
                   summary=f"{definition.summary} With {config.level}-level differential privacy.")
