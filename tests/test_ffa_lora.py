"""FFA-LoRA: docs/algorithms.md §6.2 checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedtune.simulations.runner import build_federation, run_simulation
from fedtune.strategies.api import InvalidInstruction
from fedtune.strategies.ffa_lora import A_DIGEST, frozen_names
from tests.helpers import tiny_config

DIGEST_SCRIPT = """
from fedtune.simulations.runner import build_federation
from fedtune.strategies.ffa_lora import frozen_names
from tests.helpers import tiny_config
federation = build_federation(tiny_config(strategy="ffa_lora"))
print(federation.workspace.digest(frozen_names(federation.workspace)))
"""


@pytest.mark.e2e  # fresh Python processes
def test_frozen_a_is_identical_across_processes_and_never_changes(tmp_path):
    federation = build_federation(tiny_config(strategy="ffa_lora", train={"weight_decay": 0.1}))
    workspace = federation.workspace
    digest = workspace.digest(frozen_names(workspace))
    other_process = subprocess.run(
        [sys.executable, "-c", DIGEST_SCRIPT], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other_process == digest
    assert all(not p.requires_grad for p in workspace.parameters_for(frozen_names(workspace)))

    for round in (1, 2):
        for client_id, client in federation.clients.items():
            instruction = federation.server.instruction(round, client_id)
            assert instruction.settings[A_DIGEST] == digest
            assert not any(".lora_A." in name for name in instruction.tensors)
            update = client.fit(workspace, instruction, federation.data.clients[client_id])
            assert not any(".lora_A." in name for name in update.tensors)
            # AdamW's decoupled weight decay (0.1 here) would move A if A were in the optimizer.
            assert workspace.digest(frozen_names(workspace)) == digest


def test_client_with_a_different_a_refuses_to_train():
    federation = build_federation(tiny_config(strategy="ffa_lora"))
    other_seed = build_federation(tiny_config(strategy="ffa_lora", seed=1))
    instruction = other_seed.server.instruction(1, "client-000")
    with pytest.raises(InvalidInstruction, match=A_DIGEST):
        federation.clients["client-000"].fit(federation.workspace, instruction, federation.data.clients["client-000"])


def delta_w(federation, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """s·B·A per adapted module, from B tensors and the workspace's frozen A."""
    workspace = federation.workspace
    scale = federation.config.strategy_config().alpha / federation.config.strategy_config().rank
    frozen = workspace.get_tensors(frozen_names(workspace))
    return {
        name: scale * tensors[name].double() @ frozen[name.replace(".lora_B.", ".lora_A.")].double()
        for name in tensors if ".lora_B." in name
    }


def test_aggregating_b_is_exactly_the_mean_of_client_updates():
    federation = build_federation(tiny_config(strategy="ffa_lora"))
    server, workspace, data = federation.server, federation.workspace, federation.data.clients
    updates = [
        client.fit(workspace, server.instruction(1, cid), data[cid]) for cid, client in federation.clients.items()
    ]
    federation.server.aggregate(1, updates)
    total = sum(u.num_examples for u in updates)
    client_deltas = [delta_w(federation, u.tensors) for u in updates]
    global_delta = delta_w(federation, federation.server.global_tensors)
    for name, value in global_delta.items():
        mean = sum(u.num_examples / total * d[name] for u, d in zip(updates, client_deltas, strict=False))
        torch.testing.assert_close(value, mean, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("c", [2.0, 4.0])
def test_alpha_is_a_learning_rate_reparametrisation_under_sgd(c):
    """(alpha, lr) and (c·alpha, lr/c²) give the same ΔW with plain SGD and B starting at 0 (§2.2)."""
    results = []
    for alpha, lr in ((8.0, 0.5), (8.0 * c, 0.5 / c**2)):
        federation = build_federation(tiny_config(
            strategy="ffa_lora", options={"alpha": alpha}, train={"optimizer": "sgd", "learning_rate": lr}
        ))
        update = federation.clients["client-000"].fit(
            federation.workspace, federation.server.instruction(1, "client-000"), federation.data.clients["client-000"]
        )
        results.append(delta_w(federation, update.tensors))
    for name in results[0]:
        assert results[0][name].abs().max() > 0
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-9)


def test_ffa_sends_half_the_bytes_of_lora_for_square_modules(tmp_path):
    bytes_up = {}
    for strategy in ("fedavg_lora", "ffa_lora"):
        config = tiny_config(strategy=strategy, rounds=1, options={"target_modules": ["q_proj", "v_proj"]})
        history = run_simulation(config, tmp_path / strategy, show_progress=False)
        bytes_up[strategy] = history[-1].bytes_up
        rows = [json.loads(line) for line in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["bytes_up"] == history[-1].bytes_up
    ratio = bytes_up["ffa_lora"] / bytes_up["fedavg_lora"]
    assert 0.49 < ratio < 0.51, ratio
