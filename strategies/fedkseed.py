"""FedKSeed (Qin et al., ICML 2024, arXiv:2312.06353): full-parameter zeroth-order tuning by seed exchange.

Every floating-point parameter of the plain transformers model is trained (no peft), yet only
(seed index, scalar) pairs cross the wire, whatever the model's size (docs/algorithms.md §3). This module
holds the strategy: its config, the workspace and both halves. Its building blocks are
`fedkseed_kernels` (the seed pool, the seeded perturbation z(s), the two-point step, Pro's seed
probabilities) and `fedkseed_history` (versions, ΔG per aggregation, the catch-up log).

- Client: catches up to the instruction's version, then takes τ two-point steps (docs/algorithms.md
  §3.3) on seeds drawn uniformly, or by FedKSeed-Pro's π when the instruction carries its levels,
  and uploads G_i[j] = Σ g over the steps that drew seed j: exactly S pairs for S distinct seeds,
  `seed_index` (int16 when K ≤ 32768, else int32) + `scalar_grad` (float32).
- Server (§3.4): ΔG_v = Σ_i p_i G_i with p_i ∝ n_i (float64 via `weighted_mean`, client-id order,
  sent as float32) becomes version v of the history. The server keeps that history, not the model.
- Downlink (§3.5): the catch-up log, i.e. each version's ΔG since the client's last accepted
  update (or since w_0 for a new client), which the client replays on its own copy. The server
  computes both candidates' bytes on the wire, the log's (pairs × (index bytes + 4) + 4 per version)
  and the checkpoint's (Σ numel × 4 over the trained parameters), each plus its tensors' names and
  about 32 bytes of protobuf framing per tensor, and sends the checkpoint instead of the log only
  when it is smaller. For a real LLM that never happens (a 7B checkpoint is 28 GB, a version
  ≤ 16 KB); for tiny models it does after some rounds. FedKSeed-Pro (§3.6) adds the K amplitude
  levels. The server's amplitude history records each uploaded scalar, i.e. one client's sum over
  the steps that drew that seed in a round (the reference records every step; the same when a seed
  is drawn at most once per client and round, the usual case for τ ≪ K).
- One workspace per process (fedsim shares it between the server and every virtual client): it
  knows which version its model holds, and keeps one snapshot of that version while local steps
  run, so any client, or the server, gets the exact synced model back. Memory is at most two
  models per process, whatever the number of clients; client state is empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from fedtune.strategies.api import (
    ClientStrategy,
    ClientUpdate,
    DeviceProfile,
    Instruction,
    InvalidInstruction,
    InvalidUpdate,
    ReplyValues,
    RunContext,
    ServerStrategy,
    Setting,
    StrategyConfig,
    StrategyDefinition,
    TensorMap,
    TensorSpec,
    hash_seed,
    weighted_mean,
)
from fedtune.strategies.fedkseed_history import (
    GENESIS,
    LOG_FRAMING,
    TENSOR_FRAMING,
    RoundDelta,
    Version,
    decode_log,
    encode_log,
    index_dtype,
    versions_along,
)
from fedtune.strategies.fedkseed_kernels import (
    NamedParameters,
    amplitude_levels,
    batch_loss,
    perturb,
    seed_pool,
    seed_probabilities,
    zeroth_order_step,
)
from fedtune.strategies.registry import register
from fedtune.tasks.config import TaskConfig, TrainConfig
from fedtune.tasks.data import TokenDataset
from fedtune.tasks.models import ModelBundle, load_model
from fedtune.tasks.progress import step_taken
from fedtune.tasks.training import LOCAL_STEPS, TimeBudget, local_batches, planned_steps, planned_work

SEED_INDEX = "seed_index"
SCALAR_GRAD = "scalar_grad"
SEED_LEVEL = "seed_level"
CHECKPOINT_PREFIX = "checkpoint/"


class FedKSeedConfig(StrategyConfig):
    """FedKSeed knobs; η, τ and the batch size are `train.learning_rate/local_steps/batch_size`
    (the reference: η = 3e-7, τ = 200, batch 1; τ may also come from `train.local_epochs`). Local training is
    always zeroth-order SGD, so `train.optimizer` is not used."""

    seed_pool_size: int = Field(4096, ge=1, le=2**31 - 1, description="K, the number of candidate seeds.")
    eps: float = Field(5e-4, gt=0, description="Perturbation scale ε (reference zo_eps).")
    loss_diff_clip: float | None = Field(
        None, gt=0, description="Skip a step when |L+ − L−| exceeds this (reference grad_clip; off)."
    )
    pro: bool = Field(False, description="FedKSeed-Pro: sample seeds by their gradient amplitude.")
    pro_clip: float = Field(1000.0, gt=0, description="Pro: |g| is clipped to this (reference bias_loss_clip).")


def check_replay_linear(train: TrainConfig) -> None:
    """Seed replay w_v = w_{v−1} − η Σ ΔG_j z_j needs plain constant-η SGD (docs/algorithms.md §3.11)."""
    if train.weight_decay != 0:
        raise ValueError(
            f"train.weight_decay: fedkseed replays the seed history linearly and needs weight decay 0, "
            f"got {train.weight_decay}"
        )
    if train.lr_schedule != "constant" or train.warmup_steps or train.warmup_ratio:
        raise ValueError("train.lr_schedule: fedkseed replays every client's seed history with one constant η "
                         "(train.learning_rate); leave lr_schedule = 'constant' without warm-up")


def check_task(task: TaskConfig) -> None:
    """Zeroth-order steps along CPU-generated seeds: no schedule (the replay is linear), no gradient to clip
    or accumulate, the CPU only."""
    check_replay_linear(task.train)
    if task.train.gradient_accumulation_steps != 1:
        raise ValueError("train.gradient_accumulation_steps: a fedkseed step is one two-point estimate on one "
                         "batch; leave it at 1 (raise train.batch_size instead)")
    if task.train.max_grad_norm is not None:
        raise ValueError("train.max_grad_norm: a fedkseed step's gradient is one scalar along a seed; bound it "
                         "with options.loss_diff_clip instead")
    task.model.require_cpu("fedkseed")


class SeedWorkspace:
    """The plain model in one process, the version it holds, and the snapshot kept during local steps.

    `model` holds the synced version unless a client is mid-way through (or finished) local steps;
    then `_snapshot` holds it and `restore` copies it back. Parameters keep requires_grad False:
    zeroth-order training never builds an autograd graph.

    It lives with the strategy, not the history: it is the strategy's Workspace, built from its
    config and run context and shared by both halves, and the one place where the history meets
    the kernels (a replay perturbs the model along each ΔG) and where the client's local steps and
    the server's checkpoints touch the model. The history stays plain data, the kernels plain math.
    """

    def __init__(self, bundle: ModelBundle, config: FedKSeedConfig, context: RunContext):
        check_replay_linear(context.train)
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        self.parameters: NamedParameters = sorted(
            (name, parameter) for name, parameter in self.model.named_parameters() if parameter.is_floating_point()
        )
        for _, parameter in self.parameters:  # perturbation adds into flat views of each parameter
            parameter.data = parameter.data.contiguous()
        self.pool = seed_pool(context.seed, config.seed_pool_size)
        self.learning_rate = context.train.learning_rate
        self.version = GENESIS
        self._reload = lambda: load_model(bundle.config, context.seed).model
        self._initial_digest = self.digest()
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_valid = False
        self._dirty = False
        self.model.eval()

    def digest(self) -> str:
        """SHA-256 over the trained parameters' names and bytes."""
        hasher = hashlib.sha256()
        for name, parameter in self.parameters:
            hasher.update(name.encode())
            hasher.update(parameter.detach().cpu().contiguous().numpy().tobytes())
        return hasher.hexdigest()

    def checkpoint_bytes(self) -> int:
        """Wire bytes of `checkpoint()`: float32 payload plus each tensor's name and framing."""
        return sum(
            parameter.numel() * 4 + len(CHECKPOINT_PREFIX + name) + TENSOR_FRAMING
            for name, parameter in self.parameters
        )

    @torch.no_grad()
    def restore(self) -> None:
        """Bring the synced version back into the model after local steps."""
        if self._dirty:
            assert self._snapshot is not None
            for (_, parameter), saved in zip(self.parameters, self._snapshot, strict=False):
                parameter.copy_(saved)
            self._dirty = False

    @torch.no_grad()
    def begin_local(self) -> None:
        """Keep the synced version before local steps change the model."""
        self.restore()
        if not self._snapshot_valid:
            if self._snapshot is None:
                self._snapshot = [parameter.detach().clone() for _, parameter in self.parameters]
            else:
                for (_, parameter), saved in zip(self.parameters, self._snapshot, strict=False):
                    saved.copy_(parameter)
            self._snapshot_valid = True
        self._dirty = True

    def apply(self, delta: RoundDelta) -> None:
        """w ← w − η Σ_j ΔG[j] z(s_j), ascending j: the canonical replay of one version."""
        self.restore()
        for index, value in zip(delta.seed_index.tolist(), delta.value.tolist(), strict=False):
            perturb(self.parameters, self.pool[index], -self.learning_rate * value)
        self.version = delta.next_version(self.version)
        self._snapshot_valid = False

    def catch_up(self, base: Version, log: Sequence[RoundDelta], target: Version) -> int:
        """Replay the part of `log` (the versions after `base`) this model lacks; returns how many.

        A model holding none of the log's versions (another history, or a later one after a
        server rolled back) is reloaded from w_0 when the log starts there, else refused.
        """
        self.restore()
        chain = versions_along(base, log)
        if chain[-1] != target:
            raise InvalidInstruction(
                f"catch-up log from version {base.number} does not reproduce target_digest {target.digest!r}"
            )
        if self.version in chain:
            start = chain.index(self.version)
        elif base == GENESIS:
            self.reset_to_initial()
            start = 0
        else:
            raise InvalidInstruction(
                f"base_version: the catch-up log starts at version {base.number}, but this model holds "
                f"version {self.version.number} of another history; the server must send the log from 0"
            )
        for delta in log[start:]:
            self.apply(delta)
        return len(log) - start

    @torch.no_grad()
    def reset_to_initial(self) -> None:
        """Reload w_0 (the pretrained weights every party has) and check it is the run's w_0."""
        fresh = dict(self._reload().named_parameters())
        for name, parameter in self.parameters:
            if name not in fresh or fresh[name].shape != parameter.shape:
                raise RuntimeError(f"reloading w_0: parameter {name!r} is missing or has another shape")
            parameter.copy_(fresh[name])
        if self.digest() != self._initial_digest:
            raise RuntimeError("reloading w_0: the reloaded weights differ from the ones this run started from")
        self.version = GENESIS
        self._snapshot_valid = False
        self._dirty = False

    def checkpoint(self) -> TensorMap:
        self.restore()
        return {CHECKPOINT_PREFIX + name: parameter.detach().clone() for name, parameter in self.parameters}

    @torch.no_grad()
    def load_checkpoint(self, tensors: TensorMap, version: Version) -> None:
        self.restore()
        expected = {CHECKPOINT_PREFIX + name: parameter for name, parameter in self.parameters}
        if set(tensors) != set(expected):
            missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise InvalidInstruction(
                f"checkpoint: tensor names differ from this model's "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for name, parameter in expected.items():
            if tensors[name].shape != parameter.shape:
                raise InvalidInstruction(f"checkpoint: tensor {name!r} has shape {tuple(tensors[name].shape)}")
            parameter.copy_(tensors[name])
        self.version = version
        self._snapshot_valid = False

    def save(self, directory: Path) -> None:
        """transformers format: the full fine-tuned model and its tokenizer."""
        self.restore()
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))


class FedKSeedServer(ServerStrategy[FedKSeedConfig, SeedWorkspace]):
    """Keeps the ΔG history (not the model), each client's synced version and Pro's amplitudes."""

    REPLY_VALUES = ReplyValues.OTHER
    REPLY_DOC = (f"{SEED_INDEX}: the indices (ascending, distinct) into the run's seed pool of the directions the "
                 f"client stepped along; {SCALAR_GRAD}: the summed projected gradient for each; both may be empty")

    def __init__(self, config: FedKSeedConfig, context: RunContext):
        check_replay_linear(context.train)
        super().__init__(config, context)
        self.history: list[RoundDelta] = []
        self.synced: dict[str, int] = {}
        self.amplitude_sum = torch.zeros(config.seed_pool_size, dtype=torch.float64)
        self.amplitude_count = torch.ones(config.seed_pool_size, dtype=torch.float64)  # grad_initial = 0
        self._chain = [GENESIS]
        self._index_bytes = torch.empty((), dtype=index_dtype(config.seed_pool_size)).element_size()

    def initialize(self, workspace: SeedWorkspace) -> None:
        self.workspace = workspace

    def on_client_registered(self, client_id: str, profile: DeviceProfile) -> None:
        """A (re)starting client process holds w_0, so its log starts at version 0."""
        self.synced.pop(client_id, None)

    def instruction(self, round: int, client_id: str) -> Instruction:
        base = self.synced.get(client_id, 0)
        log = self.history[base:]
        target = self._chain[-1]
        settings: dict[str, Setting] = {
            "base_version": base,
            "base_digest": self._chain[base].digest,
            "target_version": target.number,
            "target_digest": target.digest,
        }
        log_bytes = sum(delta.payload_bytes(self._index_bytes) for delta in log) + LOG_FRAMING
        if log_bytes > self.workspace.checkpoint_bytes():
            self.load_global_into(self.workspace)
            tensors = self.workspace.checkpoint()
        else:
            tensors = encode_log(log, self.config.seed_pool_size)
        if self.config.pro:
            tensors[SEED_LEVEL] = self.amplitude_levels()
        return Instruction(round=round, tensors=tensors, settings=settings)

    def amplitude_levels(self) -> torch.Tensor:
        return amplitude_levels(self.amplitude_sum / self.amplitude_count)

    def update_specs(self) -> dict[str, TensorSpec]:
        return {
            SEED_INDEX: TensorSpec(shape=(None,), dtype=index_dtype(self.config.seed_pool_size)),
            SCALAR_GRAD: TensorSpec(shape=(None,), dtype=torch.float32),
        }

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        super().validate_update(update, round)
        origin = f"update from {update.client_id!r}"
        index, value = update.tensors[SEED_INDEX], update.tensors[SCALAR_GRAD]
        if index.numel() != value.numel():
            raise InvalidUpdate(
                f"{origin}: tensor {SEED_INDEX!r} has {index.numel()} entries but {SCALAR_GRAD!r} has {value.numel()}"
            )
        # At most one pair per step; with local_epochs the steps follow the client's own (reported) data size.
        # A client overstating num_examples gains no unbounded upload: indices are distinct and below K.
        if index.numel() > planned_steps(update.num_examples, self.context.train):
            raise InvalidUpdate(
                f"{origin}: tensor {SEED_INDEX!r} holds {index.numel()} pairs, more than "
                f"{planned_work(update.num_examples, self.context.train)}"
            )
        if index.numel() == 0:
            return
        size = self.config.seed_pool_size
        if int(index.min()) < 0 or int(index.max()) >= size:
            raise InvalidUpdate(f"{origin}: tensor {SEED_INDEX!r} holds an index outside [0, {size})")
        if torch.unique(index).numel() != index.numel():
            raise InvalidUpdate(f"{origin}: tensor {SEED_INDEX!r} repeats a seed index")

    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        ordered = sorted(updates, key=lambda update: update.client_id)
        size = self.config.seed_pool_size
        dense = []
        for update in ordered:
            index = update.tensors[SEED_INDEX].to(torch.int64)
            value = update.tensors[SCALAR_GRAD]
            dense.append(torch.zeros(size, dtype=torch.float32).index_put_((index,), value))
            self.synced[update.client_id] = len(self.history)
            self.amplitude_sum.index_add_(0, index, value.abs().clamp(max=self.config.pro_clip).to(torch.float64))
            self.amplitude_count.index_add_(0, index, torch.ones(index.numel(), dtype=torch.float64))
        mean = weighted_mean(dense, [update.num_examples for update in ordered])
        touched = torch.unique(torch.cat([update.tensors[SEED_INDEX].to(torch.int64) for update in ordered]))
        self._append(RoundDelta(seed_index=touched, value=mean[touched]))

    def _append(self, delta: RoundDelta) -> None:
        self.history.append(delta)
        self._chain.append(delta.next_version(self._chain[-1]))

    def load_global_into(self, workspace: SeedWorkspace) -> None:
        workspace.catch_up(GENESIS, self.history, self._chain[-1])

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [(delta.seed_index.clone(), delta.value.clone()) for delta in self.history],
            "synced": dict(self.synced),
            "amplitude_sum": self.amplitude_sum.clone(),
            "amplitude_count": self.amplitude_count.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history, self._chain = [], [GENESIS]
        for index, value in state["history"]:
            self._append(RoundDelta(seed_index=index.clone(), value=value.clone()))
        self.synced = dict(state["synced"])
        self.amplitude_sum = state["amplitude_sum"].clone()
        self.amplitude_count = state["amplitude_count"].clone()


class FedKSeedClient(ClientStrategy[FedKSeedConfig, SeedWorkspace]):
    """Catches up by replay (or a checkpoint), runs τ zeroth-order steps, uploads (index, scalar) pairs.

    Holds no state: which version a model holds is the workspace's business (one per process).
    """

    def receive(self, workspace: SeedWorkspace, instruction: Instruction) -> None:
        """Make the workspace hold the instruction's target version (idempotent: a model already there
        replays nothing)."""
        settings = instruction.settings
        try:
            base = Version(int(settings["base_version"]), str(settings["base_digest"]))
            target = Version(int(settings["target_version"]), str(settings["target_digest"]))
        except KeyError as missing:
            raise InvalidInstruction(f"setting {missing.args[0]!r} is missing") from None
        checkpoint = {name: t for name, t in instruction.tensors.items() if name.startswith(CHECKPOINT_PREFIX)}
        if checkpoint:
            workspace.load_checkpoint(checkpoint, target)
        else:
            workspace.catch_up(base, decode_log(instruction.tensors, self.config.seed_pool_size), target)

    def seed_generator(self, round: int) -> torch.Generator:
        """Which seeds a client draws is seeded per (run, client, round), like its batches."""
        return torch.Generator().manual_seed(hash_seed(self.context.seed, self.client_id, round, "fedkseed-seeds"))

    def draw_seeds(self, instruction: Instruction, steps: int, generator: torch.Generator) -> list[int]:
        """τ seed indices: uniform, or FedKSeed-Pro's π when the instruction carries the levels."""
        size = self.config.seed_pool_size
        levels = instruction.tensors.get(SEED_LEVEL)
        if levels is None:
            return torch.randint(0, size, (steps,), generator=generator).tolist()
        if levels.shape != (size,) or levels.dtype != torch.uint8:
            raise InvalidInstruction(
                f"tensor {SEED_LEVEL!r}: expected {size} uint8 levels, got {levels.dtype} {tuple(levels.shape)}"
            )
        return torch.multinomial(seed_probabilities(levels), steps, replacement=True, generator=generator).tolist()

    def fit(self, workspace: SeedWorkspace, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        self.receive(workspace, instruction)
        train = self.context.train
        batches = local_batches(data, train, self.batch_generator(instruction.round))
        indices = self.draw_seeds(instruction, planned_steps(len(data), train), self.seed_generator(instruction.round))
        accumulated: dict[int, float] = {}
        losses: list[float] = []
        steps = 0
        budget = TimeBudget(train.max_local_seconds)
        workspace.begin_local()
        for index, batch in zip(indices, batches, strict=False):
            step = zeroth_order_step(
                workspace.parameters, workspace.pool[index], self.config.eps, train.learning_rate,
                partial(batch_loss, workspace.model, batch), self.config.loss_diff_clip,
            )
            steps += 1
            step_taken(steps)
            if step is not None:
                accumulated[index] = accumulated.get(index, 0.0) + step.scalar_grad
                losses.append(step.loss)
            if budget.spent():
                break
        order = sorted(accumulated)
        metrics = {LOCAL_STEPS: float(steps), "skipped_steps": float(steps - len(losses))}
        if losses:
            metrics["train_loss"] = sum(losses) / len(losses)
        return ClientUpdate(
            client_id=self.client_id,
            round=instruction.round,
            num_examples=len(data),
            tensors={
                SEED_INDEX: torch.tensor(order, dtype=index_dtype(self.config.seed_pool_size)),
                SCALAR_GRAD: torch.tensor([accumulated[index] for index in order], dtype=torch.float32),
            },
            metrics=metrics,
        )


def build_workspace(bundle: ModelBundle, config: FedKSeedConfig, context: RunContext) -> SeedWorkspace:
    return SeedWorkspace(bundle, config, context)


DEFINITION = register(
    StrategyDefinition(
        name="fedkseed",
        config=FedKSeedConfig,
        server=FedKSeedServer,
        client=FedKSeedClient,
        build_workspace=build_workspace,
        summary="FedKSeed(-Pro): full-parameter zeroth-order tuning; only (seed, scalar) pairs travel.",
        check_task=check_task,
        async_unsupported="its updates are scalar gradients along the round's shared seeds, replayed in order on "
                          "every client, not model states that could be rebased",
    )
)
