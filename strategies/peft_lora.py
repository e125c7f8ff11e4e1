"""The peft LoRA workspace shared by the adapter strategies (fedavg_lora, ffa_lora, and wrappers).

Wire names are exactly the keys of peft's `get_peft_model_state_dict` (adapter name stripped), so
an upload holds only adapter tensors (+ the classification head peft keeps in `modules_to_save`)
and never a base weight.

A workspace can also hold smaller adapters for devices of less capacity (`AdapterShape`: a lower
rank, LoRA on the last layers only; strategies/lora_shapes.py). Each is a peft adapter of its own over
the same frozen base, made on first use; the wire names stay the same at every shape (only the rank
dimension and the set of layers differ), and every shape keeps the run's scaling alpha / rank, so
factors truncated from the global adapter mean the same update B·A at any rank.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedtune.strategies.api import RunContext, StrategyConfig, TensorMap, hash_seed
from fedtune.tasks.models import ModelBundle


class LoraOptions(StrategyConfig):
    """LoRA hyperparameters (peft's names and defaults, except the targets)."""

    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the scaling is alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (0 keeps runs bit-reproducible).")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        "all-linear", description="Module names to adapt; 'all-linear', or None for peft's defaults."
    )


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name


class AdapterShape(BaseModel):
    """The adapter one device trains: a LoRA rank and how many of the model's last layers carry LoRA."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rank: int = Field(ge=1, description="LoRA rank r_k, at most the run's `rank`.")
    depth: int | None = Field(None, ge=1, description="LoRA on the last `depth` transformer layers only "
                                                      "(LEGEND-style); None = every layer the run targets.")

    def label(self) -> str:
        return f"r{self.rank}" + ("" if self.depth is None else f"_d{self.depth}")


_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_WIRE_PREFIX = "base_model.model."


def layer_of(name: str) -> int | None:
    """The transformer layer a tensor belongs to (its first numeric path component), None outside the
    layer stack (e.g. a pooler or a classification head, which every depth keeps)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def truncate(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The first `rank` components of a LoRA factor (rows of A, columns of B), as a contiguous copy; other
    tensors as they are."""
    if is_lora_a(name):
        return tensor[:rank].clone(memory_format=torch.contiguous_format)
    if is_lora_b(name):
        return tensor[:, :rank].clone(memory_format=torch.contiguous_format)
    return tensor


def zero_pad(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """A LoRA factor padded with zero components up to `rank`: B·A is unchanged (algorithms.md §6.7.3)."""
    if is_lora_a(name):
        return torch.cat([tensor, tensor.new_zeros(rank - tensor.shape[0], tensor.shape[1])])
    if is_lora_b(name):
        return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], rank - tensor.shape[1])], dim=1)
    return tensor


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names and bytes, in the given order: to check that shared frozen
    tensors are identical on both sides."""
    hasher = hashlib.sha256()
    for name, tensor in tensors.items():
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


class LoraWorkspace:
    """A peft model over the shared frozen base, with named access to its trainable tensors."""

    def __init__(self, bundle: ModelBundle, options: LoraOptions, context: RunContext, freeze_a: bool):
        self.task_type = TaskType.CAUSAL_LM if bundle.config.kind == "causal_lm" else TaskType.SEQ_CLS
        self.options = options
        self.freeze_a = freeze_a
        self.run_seed = context.seed
        self.max_length = bundle.config.max_length
        self.full_shape = AdapterShape(rank=options.rank)
        self.model: PeftModel = get_peft_model(bundle.model, self._peft_config(options.rank, options.target_modules))
        self.tokenizer = bundle.tokenizer
        self.base_model_name = bundle.name
        self._by_wire_name = self._map_wire_names("default")
        self._adapters = {self.full_shape: ("default", self._by_wire_name)}
        self.active_shape = self.full_shape
        self._seed_lora_a()
        self.model.eval()

    def _peft_config(self, rank: int, target_modules: list[str] | str | None) -> LoraConfig:
        """The run's LoRA at `rank`, with lora_alpha scaled along so that alpha / rank is the run's at every rank."""
        return LoraConfig(
            task_type=self.task_type,
            r=rank,
            # peft annotates lora_alpha as int, but scales by alpha / r in float: a fractional alpha works.
            lora_alpha=self.options.alpha * rank / self.options.rank,  # type: ignore[arg-type]
            lora_dropout=self.options.dropout,
            target_modules=target_modules,
        )

    def _map_wire_names(self, adapter: str) -> dict[str, nn.Parameter]:
        """peft's state-dict keys of `adapter` (the active one), matched to the live parameters by storage."""
        by_pointer = {p.data_ptr(): p for p in self.model.parameters() if p.requires_grad}
        mapping = {}
        for name, tensor in get_peft_model_state_dict(self.model, adapter_name=adapter).items():
            if tensor.data_ptr() in by_pointer:
                mapping[name] = by_pointer[tensor.data_ptr()]
        return dict(sorted(mapping.items()))

    @torch.no_grad()
    def _seed_lora_a(self) -> None:
        """Kaiming-uniform A (peft's bound 1/sqrt(fan_in)) from a CPU float32 generator seeded per
        (run seed, tensor name): identical on every machine, whatever peft's own init order. A smaller
        shape takes the first rows of the full rank's A, so FFA-LoRA's frozen A is shared across ranks.
        Under `freeze_a` the A matrices are frozen here."""
        for name, parameter in self._by_wire_name.items():
            if is_lora_a(name):
                generator = torch.Generator().manual_seed(hash_seed(self.run_seed, "lora_A", name))
                full = (self.options.rank, parameter.shape[1])
                values = torch.rand(full, generator=generator, dtype=torch.float32)[: parameter.shape[0]]
                parameter.copy_((values * 2 - 1) * parameter.shape[1] ** -0.5)
                parameter.requires_grad_(not self.freeze_a)

    def layer_count(self) -> int:
        """Transformer layers that carry LoRA at full depth."""
        return len({layer for name in self._adapters[self.full_shape][1] if (layer := layer_of(name)) is not None})

    def names_at(self, shape: AdapterShape) -> list[str]:
        """The wire names an adapter of `shape` has: the full adapter's, less the layers below its depth."""
        names = list(self._adapters[self.full_shape][1])
        if shape.depth is None:
            return names
        lowest = self.layer_count() - shape.depth
        return [name for name in names if (layer := layer_of(name)) is None or layer >= lowest]

    def use_shape(self, shape: AdapterShape) -> None:
        """Make the adapter of `shape` the active one, creating it on first use (A seeded as the full
        rank's first rows; B zero, as peft does). Training, evaluation and the tensor accessors then
        see that adapter alone."""
        if shape not in self._adapters:
            if shape.rank > self.options.rank:
                raise ValueError(f"adapter rank {shape.rank} is above the run's rank {self.options.rank}")
            if shape.depth is not None and shape.depth > self.layer_count():
                raise ValueError(f"adapter depth {shape.depth}: the model has {self.layer_count()} LoRA layers")
            modules = sorted({name.removeprefix(_WIRE_PREFIX).rsplit(".lora_", 1)[0]
                              for name in self.names_at(shape) if is_lora_a(name)})
            adapter = shape.label()
            self.model.add_adapter(adapter, self._peft_config(shape.rank, modules))
            self.model.set_adapter(adapter)
            self._by_wire_name = self._map_wire_names(adapter)
            self._adapters[shape] = (adapter, self._by_wire_name)
            self._seed_lora_a()
        adapter, self._by_wire_name = self._adapters[shape]
        self.model.set_adapter(adapter)
        if self.freeze_a:
            for name, parameter in self._by_wire_name.items():
                if is_lora_a(name):
                    parameter.requires_grad_(False)
        self.active_shape = shape
        self.model.eval()

    @property
    def wire_names(self) -> list[str]:
        """Every adapter (+ head) tensor name, sorted."""
        return list(self._by_wire_name)

    def parameters_for(self, names: Iterable[str]) -> list[nn.Parameter]:
        return [self._by_wire_name[name] for name in names]

    def get_tensors(self, names: Iterable[str]) -> TensorMap:
        """Copies on the CPU, where messages and aggregation live, whatever `model.device` is."""
        return {name: self._by_wire_name[name].detach().to("cpu", copy=True) for name in names}

    @torch.no_grad()
    def set_tensors(self, tensors: TensorMap) -> None:
        for name, tensor in tensors.items():
            self._by_wire_name[name].copy_(tensor)

    def digest(self, names: Iterable[str]) -> str:
        """SHA-256 over the named tensors of the active adapter (`tensor_digest`)."""
        return tensor_digest({name: self._by_wire_name[name] for name in names})

    def save(self, directory: Path) -> None:
        """PEFT format: adapter_config.json, recording the base model as configured (`ModelBundle.name`), and
        adapter_model.safetensors. The vocabulary is never resized here, so no embedding layer is saved (and
        peft need not look the base model up to decide)."""
        for config in self.model.peft_config.values():
            config.base_model_name_or_path = self.base_model_name
        self.model.save_pretrained(str(directory), save_embedding_layers=False, selected_adapters=["default"])
