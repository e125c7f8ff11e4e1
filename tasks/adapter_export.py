"""A LoRA adapter re-cut at a smaller rank for a small device, written again as a normal PEFT adapter.

Each LoRA module's update is ΔW = s·B·A (s = lora_alpha / r, or lora_alpha / √r under rsLoRA), with A of
shape (r, in) and B of shape (out, r). Two ways to keep rank k < r:

- `svd`: the best rank-k approximation of ΔW (Eckart–Young): B' = U_k·Σ_k^½, A' = Σ_k^½·V_kᵀ. Exact when
  k ≥ rank(ΔW); otherwise its squared Frobenius error is the sum of the dropped σ². The right choice for an
  adapter trained at one rank (FedAvg, FFA-LoRA).
- `truncate`: the first k rank components, B' = s·B[:, :k], A' = A[:k]. Right for adapters whose leading
  components carry the most (HetLoRA-style nested ranks, where a rank-k client trains exactly those).

The exported adapter has r = lora_alpha = k (scaling 1, the scale folded into B), so PEFT applies B'·A'.
Tensors that are not LoRA factors (a classifier head) are copied unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ExportMethod = Literal["svd", "truncate"]


class ExportError(ValueError):
    """An adapter that cannot be exported as asked; the message names the file or the setting."""


@dataclass(frozen=True)
class ExportReport:
    modules: int
    rank_from: int
    rank_to: int
    relative_error: float
    """‖ΔW − ΔW'‖_F / ‖ΔW‖_F over all modules together: 0 when nothing was lost."""


def export_adapter(source: Path, rank: int, method: ExportMethod, out: Path) -> ExportReport:
    """Write `source`'s adapter at rank `rank` into `out` (a PEFT adapter directory)."""
    config = _lora_config(source)
    old_rank = int(config["r"])
    if not 1 <= rank <= old_rank:
        raise ExportError(f"--rank: {rank} must be between 1 and the adapter's rank {old_rank}")
    scaling = config["lora_alpha"] / (old_rank ** 0.5 if config.get("use_rslora") else old_rank)
    tensors = load_file(source / WEIGHTS_FILE)
    exported: dict[str, torch.Tensor] = {}
    lost = total = 0.0
    modules = 0
    for name, tensor in tensors.items():
        if ".lora_B." in name:
            continue
        if ".lora_A." not in name:
            exported[name] = tensor
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name not in tensors:
            raise ExportError(f"{source / WEIGHTS_FILE}: {name} has no matching {b_name}")
        a, b = tensor.double(), tensors[b_name].double()
        update = scaling * b @ a
        new_b, new_a = _svd_factors(update, rank) if method == "svd" else (scaling * b[:, :rank], a[:rank])
        lost += float((update - new_b @ new_a).pow(2).sum())
        total += float(update.pow(2).sum())
        exported[name], exported[b_name] = new_a.to(tensor.dtype).contiguous(), new_b.to(tensor.dtype).contiguous()
        modules += 1
    if modules == 0:
        raise ExportError(f"{source / WEIGHTS_FILE}: no LoRA factors (lora_A / lora_B) in it")
    out.mkdir(parents=True, exist_ok=True)
    save_file(exported, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({**config, "r": rank, "lora_alpha": rank, "use_rslora": False},
                                              indent=2) + "\n")
    return ExportReport(modules, old_rank, rank, (lost / total) ** 0.5 if total else 0.0)


def _lora_config(source: Path) -> dict[str, Any]:
    path = source / CONFIG_FILE
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ExportError(f"{path}: no such file (is {source} a PEFT adapter directory?)") from error
    except json.JSONDecodeError as error:
        raise ExportError(f"{path}: not valid JSON: {error}") from error
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ExportError(f"{path}: a plain LoRA adapter is needed, this one is {config.get('peft_type')}"
                          + (" with DoRA" if config.get("use_dora") else ""))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ExportError(f"{path}: per-module ranks (rank_pattern / alpha_pattern) are not supported")
    return config


def _svd_factors(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B', A' with B'·A' the best rank-`rank` approximation of `update`, the singular values split evenly."""
    left, singular, right = torch.linalg.svd(update, full_matrices=False)
    root = singular[:rank].sqrt()
    return left[:, :rank] * root, root[:, None] * right[:rank]
