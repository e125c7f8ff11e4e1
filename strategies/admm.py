"""Noise-robust ADMM over LoRA adapters, derived from the description of "Noise-Robust and
Resource-Efficient ADMM-based Federated Learning" (Lari, Arablouei, Gogineni, Werner;
arXiv:2409.13451). The paper's equations were not at hand: its WLS rules are reconstructed in
`benchmarks/admm_wls.py` (docs/algorithms.md §4.3-4.4) and should be diffed against the paper.

From the paper (as described in its abstract): consensus ADMM with random client scheduling; the
dual variable is eliminated so a scheduled client uses ONE noisy copy of the global model per
round (one download, one upload); the server keeps every client's latest upload, so unscheduled
clients contribute their stale one; unscheduled clients may keep updating locally (`continual`).

This module's generalisation to adapter fine-tuning (docs/algorithms.md §4.6, NOT in the paper):
  - the exact WLS solve becomes the round's local work (`train.local_steps`, or `local_epochs`) on
    F_k(θ) = f_k(θ) + ⟨λ_k, θ − θ̃⟩ + (ρ/2)‖θ − θ̃‖² over the LoRA (+ head) tensors, θ̃ the one
    received global adapter, warm-started at the client's own θ_k (or at θ̃);
  - `dual = "eliminated"` (paper-style): λ_k = −ĝ_k(θ_k), a minibatch gradient estimate at the
    client's current adapter (in WLS λ_k = p_k − R_k w_k = −∇f_k(w_k) exactly); the upload is
    u_k = θ_k + λ_k/ρ with λ_k re-estimated after the local steps. No dual is stored, so downlink
    noise is never integrated; the price is two extra minibatch gradients per round;
  - `dual = "stored"`: FedADMM (Gong et al., arXiv:2204.03529) as the baseline,
    λ_k ← λ_k + ρ(θ_k − θ̃) kept by the client, upload θ_k + λ_k/ρ;
  - `dual = "none"`: λ ≡ 0, upload θ_k: FedProx with μ = ρ, and FedAvg at ρ = 0;
  - the server's global adapter is the sample-weighted mean of the latest uploads, Σ n_k u_k / Σ n_k,
    the consensus step for Σ_k n_k f_k with penalty ρ·n_k per client (uniform for the WLS sums);
  - `continual`: unscheduled clients run the same local solve towards the last global adapter they
    received, through the `ClientStrategy.idle` hook (fedsim calls it for every client that did
    not train in a round). In our WLS reconstruction this speeds convergence but raises the
    noisy steady-state MSD (benchmarks/README.md, "Noise-robust ADMM").
Per-client state (θ_k, the stored λ_k, the last received θ̃) lives in the client half and goes
through `state_dict`; fedsim's virtual clients share one workspace, so θ_k is loaded into it
before every local solve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, overload

import torch
from pydantic import Field, model_validator
from torch import nn

from fedtune.strategies.api import (
    ClientStrategy,
    ClientUpdate,
    Instruction,
    ReplyValues,
    RunContext,
    ServerStrategy,
    StrategyDefinition,
    TensorMap,
    TensorSpec,
    hash_seed,
    weighted_mean,
)
from fedtune.strategies.peft_lora import LoraOptions, LoraWorkspace
from fedtune.strategies.registry import register
from fedtune.tasks.config import TaskConfig
from fedtune.tasks.data import TokenDataset
from fedtune.tasks.models import ModelBundle
from fedtune.tasks.training import LocalWork, RunPosition, local_batches, train_steps

DualMode = Literal["eliminated", "stored", "none"]


class AdmmConfig(LoraOptions):
    """ADMM over LoRA: penalty, how the dual is handled, warm start and continual local updates."""

    rho: float = Field(1.0, ge=0, description="ADMM penalty ρ; the upload carries λ/ρ, a 1/ρ-scaled gradient step.")
    dual: DualMode = Field(
        "eliminated",
        description="eliminated: λ = −(minibatch gradient), the paper's noise-robust form; "
        "stored: FedADMM's running dual; none: λ = 0 and upload θ (FedProx, FedAvg at ρ = 0).",
    )
    warm_start: Literal["local", "global"] = Field(
        "local", description="Start the local steps from the client's own adapter or from the received one."
    )
    continual: bool = Field(False, description="Unscheduled clients keep updating locally (costs their compute).")
    gradient_batches: int = Field(1, ge=1, description="Minibatches averaged in each λ = −ĝ estimate.")

    @model_validator(mode="after")
    def _consistent(self) -> AdmmConfig:
        if self.rho == 0 and self.dual != "none":
            raise ValueError(f"rho: must be > 0 with dual = {self.dual!r} (the upload divides by rho)")
        if self.continual and self.warm_start == "global":
            raise ValueError("continual: needs warm_start = 'local', else the idle rounds' work is discarded")
        return self


class AdmmServer(ServerStrategy[AdmmConfig, LoraWorkspace]):
    """Keeps every client's latest upload; the global adapter is their sample-weighted mean."""

    global_tensors: TensorMap
    REPLY_VALUES = ReplyValues.OTHER
    REPLY_DOC = ("u_k = θ_k + λ_k/ρ: the client's locally solved adapter θ_k plus its dual λ_k over ρ (options.rho); "
                 "θ_k alone when options.dual = 'none' (docs/algorithms.md §4)")

    def __init__(self, config: AdmmConfig, context: RunContext):
        super().__init__(config, context)
        self.uploads: dict[str, TensorMap] = {}
        self.weights: dict[str, int] = {}

    def initialize(self, workspace: LoraWorkspace) -> None:
        self.global_tensors = workspace.get_tensors(workspace.wire_names)

    def instruction(self, round: int, client_id: str) -> Instruction:
        return Instruction(round=round, tensors=self.global_tensors)

    def update_specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec.like(tensor) for name, tensor in self.global_tensors.items()}

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        for update in updates:
            self.uploads[update.client_id] = dict(update.tensors)
            self.weights[update.client_id] = update.num_examples
        clients = sorted(self.uploads)
        weights = [self.weights[cid] for cid in clients]
        self.global_tensors = {
            name: weighted_mean([self.uploads[cid][name] for cid in clients], weights) for name in self.global_tensors
        }

    def load_global_into(self, workspace: LoraWorkspace) -> None:
        workspace.set_tensors(self.global_tensors)

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_tensors": _clone(self.global_tensors),
            "uploads": {cid: _clone(tensors) for cid, tensors in self.uploads.items()},
            "weights": dict(self.weights),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_tensors = _clone(state["global_tensors"])
        self.uploads = {cid: _clone(tensors) for cid, tensors in state["uploads"].items()}
        self.weights = dict(state["weights"])


class AdmmClient(ClientStrategy[AdmmConfig, LoraWorkspace]):
    """Solves the local ADMM subproblem inexactly and uploads θ_k + λ_k/ρ (or θ_k with no dual).

    Not `TrainsLocally`: its local loop does not fit a `LocalTrainer` (model, parameters, data, round).
    The steps minimise F_k, whose penalty ⟨λ_k, θ − θ̃⟩ + (ρ/2)‖θ − θ̃‖² a replacement trainer would
    drop, and the upload θ_k + λ_k/ρ adds minibatch gradients taken outside that loop, so DP-SGD in
    its place would neither solve the ADMM subproblem nor bound what the upload reveals.
    """

    def __init__(self, config: AdmmConfig, context: RunContext, client_id: str):
        super().__init__(config, context, client_id)
        self.local: TensorMap | None = None  # θ_k after the client's latest local solve
        self.dual: TensorMap | None = None  # λ_k, kept only with dual = "stored"
        self.received: TensorMap | None = None  # the last global adapter received (target of idle rounds)

    def receive(self, workspace: LoraWorkspace, instruction: Instruction) -> None:
        """The (noisy) global adapter as received; federated evaluation evaluates that."""
        workspace.set_tensors(instruction.tensors)

    def fit(self, workspace: LoraWorkspace, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        received = _clone(instruction.tensors)
        start = self.local if self.config.warm_start == "local" and self.local is not None else received
        with self.seeded(instruction.round):
            work = self._local_solve(workspace, start, received, data, instruction.round)
            upload = self._upload(workspace, data, instruction.round)
        self.received = received
        return ClientUpdate(
            client_id=self.client_id,
            round=instruction.round,
            num_examples=len(data),
            tensors=upload,
            metrics=work.metrics(),
        )

    def idle(self, workspace: LoraWorkspace, round: int, data: TokenDataset) -> None:
        """Continual variant: keep solving towards the last received global adapter."""
        if not self.config.continual or self.local is None or self.received is None:
            return
        with self.seeded(round):
            self._local_solve(workspace, self.local, self.received, data, round)

    def _local_solve(
        self, workspace: LoraWorkspace, start: TensorMap, target: TensorMap, data: TokenDataset, round: int
    ) -> LocalWork:
        """The round's local steps on F_k from `start` towards `target`; returns the mean task loss and steps."""
        names = list(target)
        params = workspace.parameters_for(names)
        if self.config.dual == "eliminated":  # λ_k = −ĝ_k at the client's own adapter θ_k (§4.6 step 1)
            workspace.set_tensors(self.local if self.local is not None else start)
            dual = self._negative_gradient(workspace, names, data, round, "before")
        elif self.config.dual == "stored":
            dual = self.dual or {name: torch.zeros_like(tensor) for name, tensor in target.items()}
        else:
            dual = None
        workspace.set_tensors(start)
        train = self.context.train
        batches = local_batches(data, train, self.batch_generator(round))
        duals = None if dual is None else [dual[name] for name in names]
        extra = admm_penalty(params, [target[name] for name in names], duals, self.config.rho)
        position = RunPosition.of(round, self.context.rounds, len(data), train)
        work = train_steps(workspace.model, params, batches, train, extra_loss=extra, position=position)
        self.local = workspace.get_tensors(names)
        if self.config.dual == "stored":
            assert dual is not None
            rho = self.config.rho
            self.dual = {name: dual[name] + rho * (self.local[name] - target[name]) for name in names}
        return work

    def _upload(self, workspace: LoraWorkspace, data: TokenDataset, round: int) -> TensorMap:
        """u_k = θ_k + λ_k/ρ, with λ_k re-estimated at θ_k (eliminated) or the stored dual."""
        assert self.local is not None
        if self.config.dual == "none":
            return _clone(self.local)
        if self.config.dual == "eliminated":
            dual = self._negative_gradient(workspace, list(self.local), data, round, "after")
        else:
            assert self.dual is not None
            dual = self.dual
        return {name: tensor + dual[name] / self.config.rho for name, tensor in self.local.items()}

    def _negative_gradient(
        self, workspace: LoraWorkspace, names: list[str], data: TokenDataset, round: int, when: str
    ) -> TensorMap:
        """λ_k = −ĝ_k(θ): the task-loss gradient at the workspace's adapter, averaged over
        `gradient_batches` minibatches drawn from their own seeded stream."""
        generator = torch.Generator().manual_seed(hash_seed(self.context.seed, self.client_id, round, "admm", when))
        batches = data.train_batches(self.config.gradient_batches, self.context.train.batch_size, generator)
        gradients = minibatch_gradient(workspace.model, workspace.parameters_for(names), batches)
        return {name: -gradient for name, gradient in zip(names, gradients, strict=False)}

    def state_dict(self) -> dict[str, Any]:
        return {name: _clone(getattr(self, name)) for name in ("local", "dual", "received")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in ("local", "dual", "received"):
            setattr(self, name, _clone(state[name]))


def admm_penalty(
    params: Sequence[nn.Parameter],
    targets: Sequence[torch.Tensor],
    duals: Sequence[torch.Tensor] | None,
    rho: float,
) -> Callable[[], torch.Tensor] | None:
    """The ADMM terms ⟨λ, θ − θ̃⟩ + (ρ/2)‖θ − θ̃‖² as a `train_steps` extra loss; None when both vanish."""
    if rho == 0 and duals is None:
        return None

    def penalty() -> torch.Tensor:
        total = torch.zeros((), dtype=params[0].dtype)
        for index, (param, target) in enumerate(zip(params, targets, strict=False)):
            gap = param - target
            total = total + 0.5 * rho * gap.pow(2).sum()
            if duals is not None:
                total = total + (duals[index] * gap).sum()
        return total

    return penalty


def minibatch_gradient(
    model: nn.Module, params: list[nn.Parameter], batches: Iterable[dict[str, torch.Tensor]]
) -> list[torch.Tensor]:
    """Mean task-loss gradient over the batches (train mode, like the local steps)."""
    totals = [torch.zeros_like(param) for param in params]
    count = 0
    model.train()
    for batch in batches:
        gradients = torch.autograd.grad(model(**batch).loss, params, allow_unused=True)
        for total, gradient in zip(totals, gradients, strict=False):
            if gradient is not None:
                total += gradient
        count += 1
    model.eval()
    return [total / max(count, 1) for total in totals]


@overload
def _clone(tensors: Mapping[str, torch.Tensor]) -> TensorMap: ...
@overload
def _clone(tensors: None) -> None: ...
def _clone(tensors: Mapping[str, torch.Tensor] | None) -> TensorMap | None:
    return None if tensors is None else {name: tensor.detach().clone() for name, tensor in tensors.items()}


def build_workspace(bundle: ModelBundle, config: AdmmConfig, context: RunContext) -> LoraWorkspace:
    return LoraWorkspace(bundle, config, context, freeze_a=False)


def check_task(task: TaskConfig) -> None:
    """The proximal and dual terms mix the received (CPU) tensors into every step: the CPU only."""
    task.model.require_cpu("admm")


DEFINITION = register(
    StrategyDefinition(
        name="admm",
        config=AdmmConfig,
        server=AdmmServer,
        client=AdmmClient,
        build_workspace=build_workspace,
        summary="Noise-robust ADMM (dual eliminated, one noisy download per round) over LoRA, after arXiv:2409.13451.",
        async_unsupported="its clients keep updating between rounds against the last download (the idle step), "
                          "which assumes synchronous rounds",
        check_task=check_task,
    )
)
