"""The strategy plug-in API: typed messages, the server half, the client half and the definition
(`definition.py`, re-exported here).

A strategy is one module holding both halves of an algorithm. The server half decides which
clients a round uses and what each is told, checks each reply and aggregates them into the new
global state; the client half turns the global state, an instruction and local data into the
update that goes on the wire. How messages travel (in-process in `fedsim`, gRPC in
`fedserver`/`fedclient`) is not the strategy's business.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from typing_extensions import TypeVar

from fedtune.strategies.definition import DeviceProfile as DeviceProfile  # re-exported: the plug-in API
from fedtune.strategies.definition import RunContext as RunContext
from fedtune.strategies.definition import StrategyConfig as StrategyConfig
from fedtune.strategies.definition import StrategyDefinition as StrategyDefinition
from fedtune.strategies.mapped import release
from fedtune.tasks.data import TokenDataset
from fedtune.tasks.evaluation import evaluate

TensorMap = dict[str, torch.Tensor]
Setting = bool | int | float | str

EVALUATE = "fedtune.evaluate"
"""Instruction setting: evaluate the received global model on the held-out data before training, and
send the results with the update (metrics `eval_loss`, `eval_accuracy`, `eval_exact_match`, `eval_examples`)."""
EVALUATE_ONLY = "fedtune.evaluate_only"
"""Instruction setting: only evaluate the received global model; the update carries no tensors, the
evaluation metrics and `local_steps = 0` (the run's last exchange under federated evaluation)."""
EVAL_METRICS = ("eval_loss", "eval_accuracy", "eval_exact_match")


class InvalidUpdate(ValueError):
    """A client's reply was rejected; the message names the client, the tensor or field, and why."""


class InvalidInstruction(ValueError):
    """An instruction this client cannot act on; the message names the field and why."""


class ClientRetired(RuntimeError):
    """Raised by a client half that takes no further part in the run (e.g. its sample-level privacy
    budget is spent); every transport tells the server the client has left, with this message."""


class Refusal(Enum):
    """Why the server refuses a client's request, in words every transport maps to its own status
    (gRPC: fedserver.service; fedsim: a logged rejection)."""

    UNAUTHENTICATED = "unauthenticated"  # no credentials, or an unknown enrolment token
    NOT_REGISTERED = "not_registered"  # a known token that no client has registered with yet
    FORBIDDEN = "forbidden"  # acting as another client
    NAME_TAKEN = "name_taken"  # a client id registered with another token
    MALFORMED = "malformed"  # a request that does not parse or breaks a documented bound
    INVALID_UPDATE = "invalid_update"  # the strategy rejected the update (InvalidUpdate names why)
    UNSUPPORTED = "unsupported"  # e.g. a protocol version this server does not speak
    RUN_OVER = "run_over"  # the run has finished
    NO_ROUND = "no_round"  # no round is in progress (it may have just closed)
    WRONG_ROUND = "wrong_round"  # an update for another round than the current one
    STALE = "stale"  # asynchronous mode: an update computed on a global model older than max_staleness allows
    BUFFER_FULL = "buffer_full"  # asynchronous mode: the round has its updates and is closing; send again
    NOT_SELECTED = "not_selected"  # the client is not in the current round
    DUPLICATE = "duplicate"  # an update for this round was already accepted
    TOO_LARGE = "too_large"  # a payload over the server's limits
    DEVICE_TOO_SMALL = "device_too_small"  # the device's reported memory cannot train even its smallest adapter


class Refused(Exception):
    """A request the server refuses: `reason` says which kind, the message names what was wrong."""

    def __init__(self, reason: Refusal, message: str):
        super().__init__(message)
        self.reason = reason


class Message(BaseModel):
    """Base of the messages that cross the server/client boundary."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    @field_validator("tensors", mode="after", check_fields=False)
    @classmethod
    def _tensors_are_dense(cls, tensors: TensorMap) -> TensorMap:
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor) or tensor.is_sparse:
                raise ValueError(f"tensor {name!r} is not a dense torch.Tensor")
        return tensors


class TensorSpec(BaseModel):
    """Expected shape and dtype of a tensor on the wire; `None` in a shape means any length."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    shape: tuple[int | None, ...]
    dtype: torch.dtype

    @classmethod
    def like(cls, tensor: torch.Tensor) -> TensorSpec:
        """A server asks for these per client and tensor (each reply contract, each check), so a spec is
        made once per shape and dtype and shared (it is frozen)."""
        return _spec_for(cls, tuple(tensor.shape), tensor.dtype)


@functools.lru_cache(maxsize=4096)
def _spec_for(cls: type[TensorSpec], shape: tuple[int, ...], dtype: torch.dtype) -> TensorSpec:
    return cls(shape=shape, dtype=dtype)


class ReplyValues(StrEnum):
    """What the tensors of a valid reply hold (the wire contract; protos/fedtune.proto, ReplyContract)."""

    TRAINED = "trained"  # each received tensor's value after local training: same name, dtype and shape
    DELTA = "delta"  # trained minus received
    OTHER = "other"  # strategy-specific, described by the contract's `doc`
    NONE = "none"  # no tensors: an evaluate-only reply carries metrics alone


class ReplyContract(BaseModel):
    """The reply a client owes for one instruction, stated on the wire so that a client written from the proto
    alone can build it: exactly these tensors (a `None` in a shape: any length), holding `values`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    tensors: dict[str, TensorSpec]
    values: ReplyValues
    doc: str = Field(description="One sentence: what the tensors hold and how a client computes them.")
    codec: str = Field("none", description="'none': raw tensors; else each float tensor travels as a uint8 blob "
                                           "`<name>|enc` in this codec (its parameters in the instruction's settings).")


EVALUATION_REPLY = ReplyContract(
    tensors={}, values=ReplyValues.NONE,
    doc="no tensors, only metrics: eval_loss, eval_accuracy, eval_exact_match and eval_examples of the received "
        "model on the client's held-out data, with num_examples = eval_examples (at least 1)",
)
"""The reply to an EVALUATE_ONLY instruction, whatever the strategy."""


class Instruction(Message):
    """What the server tells one client for one round."""

    round: int = Field(ge=0)
    tensors: TensorMap = Field(default_factory=dict, description="Global state the client needs.")
    settings: dict[str, Setting] = Field(default_factory=dict, description="Typed per-round scalars.")
    reply: ReplyContract | None = Field(None, description="The reply owed; set by the round engine from the "
                                                          "server half's `reply_contract`, never by a strategy.")


class ClientUpdate(Message):
    """What one client sends back after local work."""

    client_id: str = Field(min_length=1)
    round: int = Field(ge=0)
    num_examples: int = Field(ge=1, description="Local training examples; the aggregation weight.")
    tensors: TensorMap = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict, description="e.g. train_loss.")


NUMPY_FLOATS = frozenset({torch.float16, torch.float32, torch.float64})
BATCHED_FINITE_ELEMENTS = 1 << 16
"""Float tensors up to this size are checked for NaN/Inf together, in one numpy call per update."""


def _numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values for numpy; bfloat16, which numpy lacks, widened to float32 (exactly)."""
    if tensor.requires_grad:
        tensor = tensor.detach()  # not always: detach() costs as much as numpy() itself
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _numpy_checkable(tensor: torch.Tensor) -> bool:
    return tensor.is_cpu and tensor.dtype in NUMPY_FLOATS


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf. numpy's check is ~17x faster than torch's on CPU (11 GB/s against 0.7), which
    matters when every upload is checked before it is acknowledged; bfloat16 has no numpy type."""
    if _numpy_checkable(tensor):
        return bool(np.isfinite(_numpy_view(tensor)).all())
    return bool(torch.isfinite(tensor).all())


def check_tensors(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec], origin: str) -> None:
    """Reject missing, unexpected, mis-shaped, mis-typed or non-finite tensors, naming the tensor.

    Small float tensors are checked for NaN/Inf together (one call instead of one each: a light update
    has dozens of tensors), after every tensor's dtype and shape."""
    missing = sorted(set(specs) - set(tensors))
    if missing:
        raise InvalidUpdate(f"{origin}: missing tensor(s) {missing}")
    unexpected = sorted(set(tensors) - set(specs))
    if unexpected:
        raise InvalidUpdate(f"{origin}: unexpected tensor(s) {unexpected}")
    small: list[tuple[str, np.ndarray]] = []  # (name, its values, flat)
    for name, spec in specs.items():
        tensor = tensors[name]
        if tensor.dtype != spec.dtype:
            raise InvalidUpdate(f"{origin}: tensor {name!r} has dtype {tensor.dtype}, expected {spec.dtype}")
        shape_ok = tensor.shape == spec.shape or len(tensor.shape) == len(spec.shape) and all(
            want is None or want == got for want, got in zip(spec.shape, tensor.shape, strict=False)
        )
        if not shape_ok:
            raise InvalidUpdate(
                f"{origin}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {spec.shape}"
            )
        if not tensor.is_floating_point():
            continue
        if _numpy_checkable(tensor) and tensor.numel() <= BATCHED_FINITE_ELEMENTS:
            small.append((name, _numpy_view(tensor).reshape(-1)))
        elif not all_finite(tensor):
            raise InvalidUpdate(f"{origin}: tensor {name!r} holds NaN or Inf")
    # widening to the widest dtype keeps NaN and Inf; only then is each one looked at, to name it
    if small and not np.isfinite(np.concatenate([values for _, values in small])).all():
        name = next(name for name, values in small if not np.isfinite(values).all())
        raise InvalidUpdate(f"{origin}: tensor {name!r} holds NaN or Inf")


class Workspace(Protocol):
    """The model a strategy trains and evaluates, built once per process from the frozen base."""

    @property
    def model(self) -> nn.Module:
        """Read-only here so that a workspace may hold a narrower model type (e.g. a PeftModel)."""

    def save(self, directory: Path) -> None:
        """Write the current (global) model in the format users load (e.g. PEFT)."""


C = TypeVar("C", bound=StrategyConfig, default=StrategyConfig)
W = TypeVar("W", bound=Workspace, default=Workspace)
"""The workspace type a strategy's halves work on (e.g. LoraWorkspace); a plug-in that names only
its config (`ServerStrategy[MyConfig]`) gets the plain Workspace protocol."""


@runtime_checkable
class HoldsGlobalTensors(Protocol):
    """A server half whose global state is a map of named tensors, the same names a client's update
    carries (fedavg_lora, ffa_lora, admm). What update transforms need of the strategy they wrap:
    client-level DP takes each update's delta against these tensors."""

    @property
    def global_tensors(self) -> TensorMap: ...


LocalTrainer = Callable[[nn.Module, list[nn.Parameter], "TokenDataset", int], float]
"""(model, trainable parameters, local data, round) -> mean training loss of the local work."""


@runtime_checkable
class TrainsLocally(Protocol):
    """A client half whose local training loop can be replaced (sample-level DP puts opacus DP-SGD
    there) while the half keeps loading the instruction and building the update."""

    def use_local_trainer(self, trainer: LocalTrainer) -> None: ...


MEAN_BLOCK_BYTES = 8 << 20
"""The float64 rows `weighted_mean` forms and sums per numpy call: enough for a thousand small
updates in one call, and a bound on its memory for large ones."""


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean accumulated in float64 in the given order, returned in the inputs' dtype.

    Summing in a canonical order makes the result independent of arrival order; float64 makes
    the mean of identical tensors exactly that tensor. Each input's product with its weight is
    added left to right from zero (`np.add.accumulate`, never numpy's pairwise sum), a block of
    inputs per call: the bits of a loop over the inputs, without three torch calls per input,
    which cost a round of 1,000 light clients (28 small tensors each) 0.3 s.
    """
    total = float(sum(weights))
    if not tensors or total <= 0:
        raise ValueError("weighted_mean needs at least one tensor and a positive total weight")
    first = tensors[0]
    block = max(1, MEAN_BLOCK_BYTES // (8 * max(first.numel(), 1)))
    scales = np.asarray(weights, dtype=np.float64) / total
    rows = np.zeros((min(block, len(tensors)) + 1, *first.shape), dtype=np.float64)  # row 0: the sum so far
    for start in range(0, len(tensors), block):
        inputs = tensors[start : start + block]
        part = rows[: len(inputs) + 1]
        np.stack([_numpy_view(tensor) for tensor in inputs], out=part[1:])
        part[1:] *= scales[start : start + len(inputs)].reshape((-1,) + (1,) * first.dim())
        np.add.accumulate(part, axis=0, out=part)
        rows[0] = part[-1]
        for tensor in inputs:
            release(tensor)  # a mapped update's pages (on the server) are not needed again
    return torch.from_numpy(np.array(rows[0])).to(first.dtype)


class ServerStrategy(ABC, Generic[C, W]):
    """The server half: sampling, instructions, checking and aggregating replies, resumable state."""

    def __init__(self, config: C, context: RunContext):
        self.config = config
        self.context = context

    @abstractmethod
    def initialize(self, workspace: W) -> None:
        """Take the initial global state from the freshly built workspace."""

    def sample_clients(self, round: int, available: Sequence[str]) -> list[str]:
        """Uniform sampling without replacement, seeded by (run seed, round); sorted ids."""
        ordered = sorted(available)
        wanted = self.config.clients_per_round
        if wanted is None or wanted >= len(ordered):
            return ordered
        return sorted(random.Random(f"{self.context.seed}:{round}").sample(ordered, wanted))

    @abstractmethod
    def instruction(self, round: int, client_id: str) -> Instruction:
        """What `client_id` is told for `round`."""

    @abstractmethod
    def update_specs(self) -> dict[str, TensorSpec]:
        """The tensors a valid reply carries."""

    def client_update_specs(self, client_id: str) -> dict[str, TensorSpec]:
        """The tensors a valid reply from `client_id` carries: `update_specs`, unless clients train adapters of
        different shapes (strategies.lora_shapes)."""
        del client_id
        return self.update_specs()

    def shapes_differ(self) -> bool:
        """Whether clients' replies may differ in tensor shape; a wrapper that takes every reply against one
        global tensor (client-level DP, FedBuff) refuses such a strategy."""
        return False

    REPLY_VALUES: ClassVar[ReplyValues] = ReplyValues.OTHER
    REPLY_DOC: ClassVar[str] = ""
    """What a strategy's replies hold, for the wire contract: set both in every strategy (a plug-in that does not
    says OTHER with its class name)."""

    def reply_contract(self, client_id: str) -> ReplyContract:
        """The reply `client_id` owes for its instruction: `update_specs`, and what they hold."""
        return ReplyContract(tensors=self.client_update_specs(client_id), values=self.REPLY_VALUES,
                             doc=self.REPLY_DOC or f"the tensors {type(self).__name__} expects (plug-in strategy)")

    def validate_update(self, update: ClientUpdate, round: int) -> None:
        """Raise InvalidUpdate naming what is wrong; the caller drops that reply and goes on."""
        origin = f"update from {update.client_id!r}"
        if update.round != round:
            raise InvalidUpdate(f"{origin}: round {update.round} is not the current round {round}")
        check_tensors(update.tensors, self.client_update_specs(update.client_id), origin)
        for name, value in update.metrics.items():
            if not math.isfinite(value):
                raise InvalidUpdate(f"{origin}: metric {name!r} is not finite")

    @abstractmethod
    def aggregate(self, round: int, updates: Sequence[ClientUpdate]) -> None:
        """Fold validated replies (sorted by client id) into the global state."""

    @abstractmethod
    def load_global_into(self, workspace: W) -> None:
        """Write the global state into the workspace model, for evaluation and saving."""

    def on_client_registered(self, client_id: str, profile: DeviceProfile) -> None:
        """A client joined with this device profile (e.g. to choose its codec); default: ignore."""

    def stop_reason(self, next_round: int) -> str | None:
        """Why the run must stop before `next_round` (e.g. a spent privacy budget), or None."""
        return None

    def round_metrics(self) -> dict[str, float]:
        """Extra per-round values for metrics.jsonl (e.g. epsilon, delta); default none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


class ClientStrategy(ABC, Generic[C, W]):
    """The client half: local work on private data; state that must persist lives here."""

    def __init__(self, config: C, context: RunContext, client_id: str):
        self.config = config
        self.context = context
        self.client_id = client_id

    @abstractmethod
    def fit(self, workspace: W, instruction: Instruction, data: TokenDataset) -> ClientUpdate:
        """Train locally from the instruction's global state and return the update to send."""

    def idle(self, workspace: W, round: int, data: TokenDataset) -> None:
        """A round this client takes no part in (not scheduled, or its instruction was lost).
        Default: nothing; noise-robust ADMM keeps updating locally here (arXiv:2409.13451)."""

    def receive(self, workspace: W, instruction: Instruction) -> None:
        """Make the workspace hold the instruction's global model, as `fit` does first; idempotent.
        What federated evaluation evaluates; a strategy that does not implement it cannot use it."""
        raise InvalidInstruction(f"{type(self).__name__} cannot load a global model for federated evaluation")

    def respond(self, workspace: W, instruction: Instruction, data: TokenDataset,
                eval_data: TokenDataset | None) -> ClientUpdate:
        """What the client sends for `instruction`: `fit`'s update, after evaluating the received global model
        on `eval_data` when the instruction asks (EVALUATE), or only that evaluation (EVALUATE_ONLY)."""
        evaluated: dict[str, float] = {}
        if eval_data is not None and (instruction.settings.get(EVALUATE) or instruction.settings.get(EVALUATE_ONLY)):
            self.receive(workspace, instruction)
            result = evaluate(workspace.model, eval_data, self.context.train.eval_batch_size)
            evaluated = {"eval_loss": result.loss, "eval_accuracy": result.accuracy,
                         "eval_exact_match": result.exact_match, "eval_examples": float(result.examples)}
        if instruction.settings.get(EVALUATE_ONLY):
            return ClientUpdate(client_id=self.client_id, round=instruction.round,
                                num_examples=max(len(eval_data) if eval_data is not None else 1, 1),
                                metrics={**evaluated, "local_steps": 0.0})
        update = self.fit(workspace, instruction, data)
        return update.model_copy(update={"metrics": {**update.metrics, **evaluated}}) if evaluated else update

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state

    def batch_generator(self, round: int) -> torch.Generator:
        """Seeded per (run, client, round) so that data order is reproducible anywhere."""
        return torch.Generator().manual_seed(hash_seed(self.context.seed, self.client_id, round))

    @contextmanager
    def seeded(self, round: int) -> Iterator[None]:
        """Seed torch's global RNG (dropout) per (run, client, round), restoring it afterwards,
        so a client's round gives the same result in fedsim and over gRPC."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash_seed(self.context.seed, self.client_id, round, "torch"))
            yield


def hash_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
