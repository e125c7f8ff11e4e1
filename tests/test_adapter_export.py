"""`fedsim export-adapter`: a trained adapter re-cut at a smaller rank, still a PEFT adapter (issue 12, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedtune.simulations.cli import main as fedsim_main
from fedtune.simulations.runner import run_simulation
from fedtune.tasks.adapter_export import export_adapter
from fedtune.tasks.config import ModelConfig
from fedtune.tasks.models import load_model
from tests.helpers import tiny_config

RANK = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A rank-8 adapter after one round of training (B is no longer zero)."""
    out = tmp_path_factory.mktemp("run")
    run_simulation(tiny_config(rounds=1, options={"rank": RANK, "alpha": 16.0}), out, show_progress=False)
    return out


def updates(adapter: Path) -> dict[str, torch.Tensor]:
    """Each module's ΔW = s·B·A, as PEFT applies it."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    return {name: scaling * tensors[name.replace(".lora_A.", ".lora_B.")].double() @ tensor.double()
            for name, tensor in tensors.items() if ".lora_A." in name}


def test_svd_at_the_full_rank_keeps_every_update_and_the_models_output(trained: Path, tmp_path: Path):
    report = export_adapter(trained / "global", RANK, "svd", tmp_path)
    assert report.relative_error < 1e-6 and report.modules == len(updates(trained / "global"))
    before, after = updates(trained / "global"), updates(tmp_path)
    assert all(torch.allclose(before[name], after[name], atol=1e-6) for name in before)
    config = json.loads((trained / "config.json").read_text())
    tokens = torch.tensor([[5, 9, 3, 7, 11]])
    logits = []
    for adapter in (trained / "global", tmp_path):
        base = load_model(ModelConfig(**config["model"]), seed=config["seed"])
        logits.append(PeftModel.from_pretrained(base.model, str(adapter))(tokens).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_svd_below_the_rank_loses_exactly_the_dropped_singular_values(trained: Path, tmp_path: Path):
    rank = 2
    export_adapter(trained / "global", rank, "svd", tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == rank
    before, after = updates(trained / "global"), updates(tmp_path)
    losses = []
    for name, update in before.items():
        dropped = torch.linalg.svdvals(update)[rank:].pow(2).sum()
        assert torch.isclose((update - after[name]).pow(2).sum(), dropped, rtol=1e-4, atol=1e-12)  # Eckart–Young
        losses.append(float(dropped))
    assert max(losses) > 0  # the trained updates have rank > 2, so something was dropped


def test_truncation_keeps_the_first_components_with_the_scale_folded_into_b(trained: Path, tmp_path: Path):
    rank = 3
    export_adapter(trained / "global", rank, "truncate", tmp_path)
    original, exported = load_file(trained / "global" / "adapter_model.safetensors"), load_file(
        tmp_path / "adapter_model.safetensors")
    scaling = 16.0 / RANK
    for name, tensor in original.items():
        if ".lora_A." in name:
            assert torch.equal(exported[name], tensor[:rank])
        elif ".lora_B." in name:
            assert torch.allclose(exported[name], scaling * tensor[:, :rank])
        else:
            assert torch.equal(exported[name], tensor)


@pytest.mark.parametrize("argv, named", [
    (["--rank", "0"], "--rank: 0 must be between 1 and the adapter's rank 8"),
    (["--rank", "9"], "--rank: 9 must be between 1"),
])
def test_the_command_writes_the_adapter_or_says_what_is_wrong(trained: Path, tmp_path: Path, capsys, argv, named):
    assert fedsim_main(["export-adapter", str(trained / "global"), "--rank", "4", "--out", str(tmp_path)]) == 0
    assert "from rank 8 to 4 (svd)" in capsys.readouterr().out
    assert fedsim_main(["export-adapter", str(trained / "global"), *argv, "--out", str(tmp_path / "x")]) == 2
    assert named in capsys.readouterr().err
    assert fedsim_main(["export-adapter", str(tmp_path / "nothing"), "--rank", "2", "--out", str(tmp_path)]) == 2
    assert "adapter_config.json: no such file" in capsys.readouterr().err
