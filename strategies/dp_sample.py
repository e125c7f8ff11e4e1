"""Sample-level differential privacy: DP-SGD (Abadi et al., CCS 2016, arXiv:1607.00133; FFA-LoRA's
setting, docs/algorithms.md §2.2) with opacus on each client.

Every client trains with opacus' GradSampleModule and DPOptimizer over its trainable adapter
tensors only (FFA-LoRA: B and the head; its frozen A gets no noise and is in no optimizer), with
Poisson sampling at q_i = batch/n_i, per-example clipping to C and noise z·C on each summed batch
gradient. DP-SGD replaces the inner client's local loop through its `TrainsLocally` seam, so the inner
half still loads the instruction and builds the update; a strategy without that seam (fedkseed's
zeroth-order steps, admm's penalised local solve) is refused when its client half is built.

Each client keeps its own RDP accountant, reports `epsilon`, `delta` and `local_steps` with every
update, and retires (`ClientRetired`) before a round whose steps would exceed its budget; the server
checks each reported ε and reports the largest so far. A round's planned steps are
`training.planned_steps` of the client's own data size (with `train.local_epochs` they differ between
clients). The accountant counts only the steps that ran (opacus' step hook records each one), while the
budget check before a round and the calibration of z assume the full planned steps: when
`train.max_local_seconds` cuts a round short, the ε reported is the true one and the checks stay conservative.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.nn import functional

from fedtune.strategies.api import (
    C,
    ClientRetired,
    ClientStrategy,
    ClientUpdate,
    Instruction,
    InvalidUpdate,
    ServerStrategy,
    TrainsLocally,
    W,
)
from fedtune.strategies.dp import Config, DpClientWrapper, calibrated_noise_multiplier, epsilon_of, private_generator
from fedtune.strategies.wrappers import ServerWrapper
from fedtune.tasks.config import TaskConfig
from fedtune.tasks.data import IGNORE_INDEX, TokenDataset
from fedtune.tasks.training import LOCAL_STEPS, RunPosition, make_optimizer, planned_steps, train_steps


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


def poisson_batches(
    data: TokenDataset, sampler: UniformWithReplacementSampler, steps: int
) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches in which every example is drawn independently with the sampler's rate."""
    produced = 0
    while produced < steps:
        for indices in sampler:
            if produced == steps:
                return
            produced += 1
            yield data.collate([data.examples[i] for i in indices]) if indices else noise_only_batch(data)


def check_task(task: TaskConfig) -> None:
    """DP-SGD fixes how a step is made: one Poisson batch (the unit the accountant counts), each example's
    gradient clipped to dp.clipping_norm, noise from CPU generators."""
    if task.train.max_grad_norm is not None:
        raise ValueError("train.max_grad_norm: sample-level DP-SGD already clips every example's gradient to "
                         "dp.clipping_norm (its sensitivity bound); a second clip of the noised batch gradient would "
                         "only distort the step, so it is refused: remove train.max_grad_norm")
    if task.train.gradient_accumulation_steps != 1:
        raise ValueError("train.gradient_accumulation_steps: a DP-SGD step is one Poisson-sampled batch, the unit "
                         "its accountant counts; leave it at 1 (raise train.batch_size instead)")
    task.model.require_cpu("sample-level DP-SGD")


class SampleLevelClient(DpClientWrapper[C, W]):
    """DP-SGD in place of the inner client's local loop; its own accountant; retires before its budget."""

    def __init__(self, inner: ClientStrategy[C, W], dp: Config, strategy: str):
        super().__init__(inner, dp)
        if not isinstance(inner, TrainsLocally):
            raise TypeError(
                f"dp.level = 'sample': strategy {strategy!r} has no local_trainer hook for DP-SGD (its client half "
                f"{type(inner).__name__} does not implement TrainsLocally.use_local_trainer; supported: "
                "fedavg_lora, ffa_lora and their subclasses)"
            )
        inner.use_local_trainer(self.train_privately)
        self.accountant = RDPAccountant()
        self.noise_multiplier = dp.noise_multiplier

    def sample_rate(self, data: TokenDataset) -> float:
        return min(1.0, self.context.train.batch_size / len(data))

    def current_noise_multiplier(self, data: TokenDataset) -> float:
        """z as configured, or calibrated once so the planned rounds × this client's planned steps per round
        stay within the budget."""
        if self.noise_multiplier is None:
            assert self.dp.epsilon is not None
            steps = self.context.rounds * planned_steps(len(data), self.context.train)
            self.noise_multiplier = calibrated_noise_multiplier(
                self.dp.epsilon, self.dp.delta, self.sample_rate(data), steps
            )
        return self.noise_multiplier

    def epsilon(self) -> float:
        return epsilon_of(self.accountant.history, self.dp.delta)

    def accounted_steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def fit(self, workspace: W, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        rate = self.sample_rate(data)
        planned = (self.current_noise_multiplier(data), rate, planned_steps(len(data), self.context.train))
        if self.dp.epsilon is not None:
            spent = epsilon_of([*self.accountant.history, planned], self.dp.delta)
            if spent > self.dp.epsilon:
                raise ClientRetired(
                    f"client {self.client_id!r}: round {instruction.round} would bring its epsilon to {spent:.4f} > "
                    f"budget dp.epsilon = {self.dp.epsilon}; it retires with epsilon {self.epsilon():.4f}"
                )
        before = self.accounted_steps()
        update = self.inner.fit(workspace, instruction, data)
        metrics = {**update.metrics, LOCAL_STEPS: float(self.accounted_steps() - before), "epsilon": self.epsilon(),
                   "delta": self.dp.delta}
        return update.model_copy(update={"metrics": metrics})

    def train_privately(self, model: nn.Module, params: list[nn.Parameter], data: TokenDataset, round: int) -> float:
        """opacus DP-SGD over `params` only; the shared workspace model is left without hooks or
        per-sample state for the next client and for evaluation."""
        train = self.context.train
        rate = self.sample_rate(data)
        optimizer = DPOptimizer(
            make_optimizer(params, train),
            noise_multiplier=self.current_noise_multiplier(data),
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
                batches = poisson_batches(data, sampler, planned_steps(len(data), train))
                position = RunPosition.of(round, self.context.rounds, len(data), train)
                return train_steps(private_model, params, batches, train, optimizer=optimizer, position=position).loss
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


class SampleLevelServer(ServerWrapper[C, W]):
    """Aggregation is the inner strategy's (DP-SGD already privatised each client's data); it checks each
    reply's reported ε against the budget and reports the largest client ε so far."""

    def __init__(self, inner: ServerStrategy[C, W], dp: Config):
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


