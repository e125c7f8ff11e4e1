"""The peft LoRA workspace shared by the adapter strategies (fedavg_lora, ffa_lora, and wrappers).

Wire names are exactly the keys of peft's `get_peft_model_state_dict` (adapter name stripped), so
an upload holds only adapter tensors (+ the classification head peft keeps in `modules_to_save`)
and never a base weight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from pydantic import Field
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


class LoraWorkspace:
    """A peft model over the shared frozen base, with named access to its trainable tensors."""

    def __init__(self, bundle: ModelBundle, options: LoraOptions, context: RunContext, freeze_a: bool):
        task_type = TaskType.CAUSAL_LM if bundle.config.kind == "causal_lm" else TaskType.SEQ_CLS
        peft_config = LoraConfig(
            task_type=task_type,
            r=options.rank,
            # peft annotates lora_alpha as int, but scales by alpha / r in float: a fractional alpha works.
            lora_alpha=options.alpha,  # type: ignore[arg-type]
            lora_dropout=options.dropout,
            target_modules=options.target_modules,
        )
        self.model: PeftModel = get_peft_model(bundle.model, peft_config)
        self.tokenizer = bundle.tokenizer
        self.base_model_name = bundle.name
        self._by_wire_name = self._map_wire_names()
        self._seed_lora_a(context.seed)
        if freeze_a:
            for name, parameter in self._by_wire_name.items():
                if is_lora_a(name):
                    parameter.requires_grad_(False)
        self.model.eval()

    def _map_wire_names(self) -> dict[str, nn.Parameter]:
        """peft's state-dict keys, matched to the live parameters by storage."""
        by_pointer = {p.data_ptr(): p for p in self.model.parameters() if p.requires_grad}
        mapping = {}
        for name, tensor in get_peft_model_state_dict(self.model).items():
            if tensor.data_ptr() in by_pointer:
                mapping[name] = by_pointer[tensor.data_ptr()]
        return dict(sorted(mapping.items()))

    @torch.no_grad()
    def _seed_lora_a(self, run_seed: int) -> None:
        """Kaiming-uniform A (peft's bound 1/sqrt(fan_in)) from a CPU float32 generator seeded per
        (run seed, tensor name): identical on every machine, whatever peft's own init order."""
        for name, parameter in self._by_wire_name.items():
            if is_lora_a(name):
                generator = torch.Generator().manual_seed(hash_seed(run_seed, "lora_A", name))
                bound = parameter.shape[1] ** -0.5
                values = torch.rand(parameter.shape, generator=generator, dtype=torch.float32)
                parameter.copy_((values * 2 - 1) * bound)

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
        """SHA-256 over the named tensors' bytes, to check shared frozen tensors are identical."""
        hasher = hashlib.sha256()
        for name in names:
            hasher.update(name.encode())
            hasher.update(self._by_wire_name[name].detach().cpu().contiguous().numpy().tobytes())
        return hasher.hexdigest()

    def save(self, directory: Path) -> None:
        """PEFT format: adapter_config.json, recording the base model as configured (`ModelBundle.name`), and
        adapter_model.safetensors. The vocabulary is never resized here, so no embedding layer is saved (and
        peft need not look the base model up to decide)."""
        for config in self.model.peft_config.values():
            config.base_model_name_or_path = self.base_model_name
        self.model.save_pretrained(str(directory), save_embedding_layers=False)
