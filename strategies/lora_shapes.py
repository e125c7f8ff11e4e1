"""Devices of different capacity in one LoRA federation: each client trains the adapter its device affords.

A client's `AdapterShape` is a LoRA rank r_k ≤ the run's rank r and a depth (LoRA on the last k layers
only, LEGEND, arXiv:2412.20004; None = every layer). The server decides it when the client registers
(`CapacityConfig`: a table by the profile's compute class, or the largest candidate whose estimated
training memory fits the memory the device reported), refuses a device that cannot fit even the
smallest, and tells the client its shape in every instruction (settings `lora.rank`, `lora.depth`).
The tensors it sends are the global adapter truncated to that shape (the first r_k rows of each A and
columns of B, the layers within the depth), and the reply contract asks for exactly those tensors, so
a client never trains a shape it was not told. The global adapter stays at the run's full shape.

Every shape keeps the run's scaling s = alpha / r (`LoraWorkspace`), so zero-padding or truncating a
factor pair leaves its meaning ΔW = s·B·A unchanged. How replies of different shapes are combined is
the strategy's: hetlora (zero-padding or per-slice averaging), flexlora (SVD redistribution), ffa_lora
(B padded under the shared frozen A, which is exact).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedtune.strategies.api import (
    ClientUpdate,
    DeviceProfile,
    Instruction,
    InvalidInstruction,
    Refusal,
    Refused,
    Setting,
    TensorMap,
    TensorSpec,
)
from fedtune.strategies.fedavg_lora import FedAvgLoraClient, FedAvgLoraConfig, FedAvgLoraServer
from fedtune.strategies.peft_lora import AdapterShape, LoraWorkspace, is_lora_a, is_lora_b, truncate
from fedtune.strategies.runconfig import ConfigError

RANK_SETTING = "lora.rank"
DEPTH_SETTING = "lora.depth"
"""Instruction settings: the adapter shape the client trains (depth 0 = every layer)."""
MiB = 1024 * 1024


class CapacityConfig(BaseModel):
    """`[options.capacity]`: which adapter each device trains. A compute class in the table gets its shape;
    otherwise, with `fit_memory`, the largest candidate whose estimated training memory fits the device's
    reported memory_mb; otherwise `default` (None: the run's full adapter). A device that reports its memory
    is refused at registration when the shape chosen for it does not fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    by_compute_class: dict[str, AdapterShape] = Field(default_factory=dict,
                                                      description="The shape for each compute class, e.g. phone.")
    default: AdapterShape | None = Field(None, description="Classes outside the table; None = the full adapter.")
    fit_memory: bool = Field(False, description="Choose from `candidates` by the memory the device reports.")
    candidates: list[AdapterShape] = Field(
        default_factory=list, description="fit_memory's shapes; empty = the run's rank halved down to 1, all layers.")


class HeterogeneousLoraConfig(FedAvgLoraConfig):
    """LoRA options plus the capacity policy that sizes each client's adapter."""

    capacity: CapacityConfig = Field(default_factory=CapacityConfig)

    @model_validator(mode="after")
    def _shapes_within_rank(self) -> HeterogeneousLoraConfig:
        capacity = self.capacity
        if capacity != CapacityConfig() and self.step_normalization != "none":
            raise ValueError("step_normalization: FedNova's normalisation is not defined here for adapters of "
                             "different shapes (options.capacity); use 'none'")
        named = {**{f"capacity.by_compute_class.{key}": shape for key, shape in capacity.by_compute_class.items()},
                 **({"capacity.default": capacity.default} if capacity.default else {}),
                 **{f"capacity.candidates[{i}]": shape for i, shape in enumerate(capacity.candidates)}}
        for field, shape in named.items():
            if shape.rank > self.rank:
                raise ValueError(f"{field}.rank: {shape.rank} is above the run's rank {self.rank}")
        return self


def shape_settings(shape: AdapterShape) -> dict[str, Setting]:
    return {RANK_SETTING: shape.rank, DEPTH_SETTING: shape.depth or 0}


def shape_of(instruction: Instruction) -> AdapterShape:
    """The shape an instruction tells its client to train; InvalidInstruction naming a bad setting."""
    rank, depth = instruction.settings.get(RANK_SETTING), instruction.settings.get(DEPTH_SETTING, 0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidInstruction(f"instruction {RANK_SETTING}: {rank!r} is not a positive integer")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise InvalidInstruction(f"instruction {DEPTH_SETTING}: {depth!r} is not a non-negative integer")
    return AdapterShape(rank=rank, depth=depth or None)


def training_memory_bytes(workspace: LoraWorkspace, shape: AdapterShape, batch_size: int) -> dict[str, int]:
    """Estimated peak memory of one client's local training at `shape`, by part:

    - weights: every base parameter once (the frozen model, in its dtype) plus the adapter;
    - optimizer: a gradient and AdamW's two moments per trainable adapter value;
    - activations: what autograd saves for the backward pass of one batch of `batch_size` examples at the
      model's max_length, counted exactly (saved-tensor hooks, shared storages once) on a forward pass here.
    Not counted: the interpreter and libraries, and short-lived temporaries; benchmarks/bench_hetero_ranks.py
    measures the error against the peak memory of real training.
    """
    previous = workspace.active_shape
    workspace.use_shape(shape)
    try:
        model = workspace.model
        adapter = workspace.parameters_for(workspace.wire_names)
        adapter_ids = {id(parameter) for parameter in adapter}
        base = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                   if ".lora_" not in name and ".modules_to_save." not in name and id(p) not in adapter_ids)
        weights = base + sum(p.numel() * p.element_size() for p in adapter)
        optimizer = sum(3 * p.numel() * p.element_size() for p in adapter if p.requires_grad)
        activations = _saved_activation_bytes(workspace, batch_size)
    finally:
        workspace.use_shape(previous)
    return {"weights": weights, "optimizer": optimizer, "activations": activations,
            "total": weights + optimizer + activations}


def _saved_activation_bytes(workspace: LoraWorkspace, batch_size: int) -> int:
    """Bytes autograd keeps for backward in one training forward pass (parameters themselves excluded)."""
    model = workspace.model
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    device = next(model.parameters()).device
    input_ids = torch.ones(batch_size, workspace.max_length, dtype=torch.long, device=device)
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    batch["labels"] = input_ids if workspace.task_type == "CAUSAL_LM" else torch.zeros(
        batch_size, dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.train()
        try:
            model(**batch).loss.backward()
        finally:
            model.eval()
            model.zero_grad(set_to_none=True)
    return sum(saved.values())


class HeterogeneousLoraServer(FedAvgLoraServer):
    """FedAvg-LoRA's server half with a shape per client: instructions and reply contracts truncated to
    it. Subclasses combine the replies (`aggregate`)."""

    config: HeterogeneousLoraConfig
    workspace: LoraWorkspace
    SHAPES_DIFFER = True  # a per-client shape: wrappers that need one tensor shape for all refuse it

    def initialize(self, workspace: LoraWorkspace) -> None:
        super().initialize(workspace)
        self.workspace = workspace
        self.full_shape = workspace.full_shape
        self.shapes: dict[str, AdapterShape] = {}
        self.compute_classes: dict[str, str] = {}
        self._estimates: dict[AdapterShape, dict[str, int]] = {}
        self._bytes: dict[str, int] = {}
        layers = workspace.layer_count()
        capacity = self.config.capacity
        for shape in (*capacity.by_compute_class.values(), capacity.default, *capacity.candidates):
            if shape is not None and shape.depth is not None and shape.depth > layers:
                raise ConfigError(f"options.capacity: depth {shape.depth} is above the model's {layers} LoRA layers")

    # -- which shape each client trains ---------------------------------------------------------------
    def estimate_mb(self, shape: AdapterShape) -> dict[str, int]:
        """`training_memory_bytes` in MiB (rounded up), cached per shape."""
        if shape not in self._estimates:
            parts = training_memory_bytes(self.workspace, shape, self.context.train.batch_size)
            self._estimates[shape] = {part: -(-value // MiB) for part, value in parts.items()}
        return self._estimates[shape]

    def candidates(self) -> list[AdapterShape]:
        """fit_memory's shapes, the largest estimate first."""
        listed = self.config.capacity.candidates
        if not listed:
            ranks = sorted({max(1, self.config.rank >> halvings) for halvings in range(self.config.rank.bit_length())})
            listed = [AdapterShape(rank=rank) for rank in ranks]
        layers = self.workspace.layer_count()
        return sorted(listed, key=lambda shape: (self.estimate_mb(shape)["total"], shape.depth or layers, shape.rank),
                      reverse=True)

    def choose_shape(self, client_id: str, profile: DeviceProfile) -> AdapterShape:
        """The policy (`CapacityConfig`); Refused(DEVICE_TOO_SMALL) naming the memory reported and needed."""
        capacity = self.config.capacity
        memory = profile.memory_mb
        shape = capacity.by_compute_class.get(profile.compute_class)
        if shape is None and capacity.fit_memory and memory > 0:
            fitting = [candidate for candidate in self.candidates() if self.estimate_mb(candidate)["total"] <= memory]
            shape = fitting[0] if fitting else self.candidates()[-1]
        shape = shape or capacity.default or self.full_shape
        if memory > 0 and (needed := self.estimate_mb(shape))["total"] > memory:
            parts = ", ".join(f"{part} {value} MiB" for part, value in needed.items() if part != "total")
            smallest = " (the smallest candidate)" if capacity.fit_memory else ""
            raise Refused(Refusal.DEVICE_TOO_SMALL,
                          f"client {client_id!r} reports memory_mb = {memory}, but training its adapter "
                          f"{shape.label()}{smallest} needs an estimated {needed['total']} MiB ({parts})")
        return shape

    def on_client_registered(self, client_id: str, profile: DeviceProfile) -> None:
        self.shapes[client_id] = self.choose_shape(client_id, profile)
        self.compute_classes[client_id] = profile.compute_class
        super().on_client_registered(client_id, profile)

    def shape(self, client_id: str) -> AdapterShape:
        """A client that never registered (e.g. a plain fedsim client) trains the full adapter."""
        return self.shapes.get(client_id, self.full_shape)

    # -- what each client is told and owes --------------------------------------------------------------
    def sent_tensors(self, client_id: str) -> TensorMap:
        """The global tensors truncated to the client's shape."""
        shape = self.shape(client_id)
        names = self.workspace.names_at(shape)
        return {name: truncate(name, self.global_tensors[name], shape.rank) for name in names
                if name in self.global_tensors}

    def instruction(self, round: int, client_id: str) -> Instruction:
        tensors = self.sent_tensors(client_id)
        self._count(client_id, "down", tensors)
        return Instruction(round=round, tensors=tensors, settings=shape_settings(self.shape(client_id)))

    def client_update_specs(self, client_id: str) -> dict[str, TensorSpec]:
        return {name: TensorSpec.like(tensor) for name, tensor in self.sent_tensors(client_id).items()}

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        super().validate_update(update, round)
        self._count(update.client_id, "up", update.tensors)

    def _count(self, client_id: str, direction: str, tensors: TensorMap) -> None:
        """Tensor payload bytes per compute class and direction, for `round_metrics`."""
        key = f"payload_{direction}.{self.compute_classes.get(client_id, 'unregistered')}"
        self._bytes[key] = self._bytes.get(key, 0) + sum(t.numel() * t.element_size() for t in tensors.values())

    def round_metrics(self) -> dict[str, float]:
        """The round's adapter tensor bytes by compute class (`payload_up.phone`, ...): before protobuf framing
        and any codec of a compression wrapper; counted when instructions are made and updates accepted."""
        values = {key: float(value) for key, value in sorted(self._bytes.items())}
        self._bytes = {}
        return {**super().round_metrics(), **values}

    def load_global_into(self, workspace: LoraWorkspace) -> None:
        workspace.use_shape(workspace.full_shape)
        super().load_global_into(workspace)

    def shapes_differ(self) -> bool:
        return self.config.capacity != CapacityConfig()

    # -- combining replies of different shapes --------------------------------------------------------
    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        """Each tensor's sample-weighted mean over the replies that hold it, factors zero-padded to the full
        rank (`padded_mean`); FedAvg-LoRA's own aggregation when no capacity policy is set."""
        if not self.shapes_differ():
            super().aggregate(round, updates)
            return
        self.combine(updates, per_slice=False)

    def combine(self, updates: Sequence[ClientUpdate], per_slice: bool,
                weight: Callable[[str, ClientUpdate], float] | None = None,
                include: Callable[[str], bool] | None = None) -> None:
        """`padded_mean` of every global tensor (or those `include` names) over the replies, in client-id order,
        that hold it, with `weight(name, update)` (default: the sample count); a tensor nobody sent keeps its value."""
        ordered = sorted(updates, key=lambda update: update.client_id)
        combined = {}
        for name, previous in self.global_tensors.items():
            holders = [update for update in ordered if name in update.tensors]
            if not holders or (include is not None and not include(name)):
                combined[name] = previous
                continue
            weights = [weight(name, update) if weight else update.num_examples for update in holders]
            combined[name] = padded_mean(name, previous, [update.tensors[name] for update in holders], weights,
                                         per_slice)
        self.global_tensors = combined

    def state_dict(self) -> dict[str, Any]:
        shapes = {cid: shape.model_dump() for cid, shape in self.shapes.items()}
        return {**super().state_dict(), "shapes": shapes, "compute_classes": dict(self.compute_classes)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.shapes = {cid: AdapterShape.model_validate(shape) for cid, shape in state.get("shapes", {}).items()}
        self.compute_classes = dict(state.get("compute_classes", {}))


def rank_axis(name: str) -> int | None:
    """The dimension of a tensor that runs over LoRA rank components (A: rows, B: columns), None for others."""
    return 0 if is_lora_a(name) else 1 if is_lora_b(name) else None


def padded_mean(name: str, previous: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                per_slice: bool) -> torch.Tensor:
    """The weighted mean of LoRA factors of ranks up to `previous`'s, each zero-padded to it (HetLoRA),
    accumulated in float64 in the given order as `weighted_mean` does (equal ranks give its result bit for
    bit). `per_slice`: each rank component is averaged only over the factors that have it (rank-partitioned
    averaging), which avoids zero-padding's dilution of the high-rank components; a component no factor has
    keeps its `previous` value."""
    axis = rank_axis(name)
    rank = previous.shape[axis] if axis is not None else 1
    sizes = [tensor.shape[axis] if axis is not None else 1 for tensor in tensors]
    totals = torch.zeros(rank, dtype=torch.float64)
    if per_slice:
        for size, weight in zip(sizes, weights, strict=True):
            totals[:size] += weight
    else:
        totals.fill_(float(sum(weights)))
    accumulator = torch.zeros(previous.shape, dtype=torch.float64)
    for tensor, size, weight in zip(tensors, sizes, weights, strict=True):
        share = weight / totals[:size]
        if axis == 0:
            accumulator[:size] += tensor.to(torch.float64) * share[:, None]
        elif axis == 1:
            accumulator[:, :size] += tensor.to(torch.float64) * share[None, :]
        else:
            accumulator += tensor.to(torch.float64) * share
    result = accumulator.to(previous.dtype)
    uncovered = totals == 0
    if axis == 0:
        result[uncovered] = previous[uncovered]
    elif axis == 1:
        result[:, uncovered] = previous[:, uncovered]
    return result


class HeterogeneousLoraClient(FedAvgLoraClient):
    """Switches to the adapter of the instruction's shape, then loads and trains it as FedAvg-LoRA does."""

    def receive(self, workspace: LoraWorkspace, instruction: Instruction) -> None:
        workspace.use_shape(shape_of(instruction))
        expected = set(workspace.wire_names)
        unknown = sorted(set(instruction.tensors) - expected)
        if unknown:
            raise InvalidInstruction(f"instruction tensors {unknown[:3]}: not in this client's "
                                     f"{workspace.active_shape.label()} adapter")
        super().receive(workspace, instruction)
