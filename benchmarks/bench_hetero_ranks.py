"""Devices of different memory in one federation: an adapter sized to each device (issue 12).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_hetero_ranks.py [--quick] [--seed S] [--runs abcde]

The packaged all-MiniLM-L6-v2 on SST-2, 12 clients with a label-Dirichlet(0.5) split, in three device
classes of 4 clients each, told apart only by the memory they report: phone, laptop, workstation (budgets
below). LoRA on query/value (+ the head), global rank 8. Every participating client runs the same local
steps per round, so client compute is the same in every run. Five runs, in one session:
  (a) smallest       everyone trains the phone's adapter (rank 2 on the last 2 layers);
  (b) weak excluded  everyone at the full adapter; devices whose budget it does not fit are refused;
  (c) hetlora        each device the largest adapter its budget fits (`fit_memory`), zero-padded mean;
  (d) rank-sliced    the same shapes, each rank component averaged over the clients that train it;
  (e) flexlora       the same shapes, SVD redistribution.
Printed: accuracy per round, adapter bytes up per class (payload_up.<class>, summed over the run), and
for each class's shape the estimated training memory (strategies.lora_shapes) beside the measured peak:
a fresh process per shape loads the model, resets its peak-RSS mark (/proc/self/clear_refs), trains
`--local-steps` steps of one client, and takes the peak RSS during that training above the RSS just before
it (glibc told to map every allocation of 64 KiB or more on its own, so that memory freed while loading the
model is not silently reused). The measured need is that increase plus the weights (parameter bytes, exact):
the interpreter, the
libraries and what the allocator kept from loading the model are in neither number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "sst2"
RESULTS = HERE / "results" / "hetero_ranks"
CLASSES = ("phone", "laptop", "workstation")
CANDIDATES = [{"rank": 8}, {"rank": 4, "depth": 4}, {"rank": 2, "depth": 2}]


def status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def base_config(args: argparse.Namespace, clients: int) -> dict[str, Any]:
    from bench_heterogeneous import minilm_path

    return {
        "strategy": "hetlora", "rounds": args.rounds, "seed": args.seed,
        "model": {"path": minilm_path(), "kind": "seq_cls", "max_length": 64},
        "data": {"train": str(args.data / "train.tsv"), "eval": str(args.data / "test.tsv"),
                 "max_train_examples": args.train_examples, "max_eval_examples": args.eval_examples},
        "partition": {"scheme": "dirichlet", "field": "label", "num_clients": clients, "alpha": 0.5},
        "train": {"local_steps": args.local_steps, "batch_size": args.batch_size, "learning_rate": args.lr},
        "options": {"rank": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "devices": {"classes": {name: {"share": 1 / len(CLASSES), "memory_mb": args.budgets[name]}
                                for name in CLASSES}},
    }


def run_configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    base = base_config(args, args.clients)
    smallest = {"by_compute_class": {name: CANDIDATES[-1] for name in CLASSES}}
    fit = {"fit_memory": True, "candidates": CANDIDATES}
    return {
        "(a) smallest": {**base, "options": {**base["options"], "capacity": smallest}},
        "(b) weak excluded": base,
        "(c) hetlora": {**base, "options": {**base["options"], "capacity": fit}},
        "(d) rank-sliced": {**base, "options": {**base["options"], "capacity": fit, "aggregation": "rank_sliced"}},
        "(e) flexlora": {**base, "strategy": "flexlora", "options": {**base["options"], "capacity": fit}},
    }


def measure(args: argparse.Namespace, rank: int, depth: int | None) -> dict[str, float]:
    """In this fresh process: one client's local training at (rank, depth); peak RSS above the imports."""
    import torch

    from fedtune.simulations.config import SimulationConfig
    from fedtune.simulations.runner import build_federation
    from fedtune.strategies.lora_shapes import training_memory_bytes
    from fedtune.strategies.peft_lora import AdapterShape

    torch.set_num_threads(1)
    raw = base_config(args, 1)
    shape = {"rank": rank, **({"depth": depth} if depth else {})}
    raw["options"] = {**raw["options"], "capacity": {"default": shape}}
    raw["devices"] = {}
    raw["data"] = {**raw["data"], "max_train_examples": args.batch_size * args.local_steps * 2,
                   "max_eval_examples": 8}
    federation = build_federation(SimulationConfig.model_validate(raw))
    (client_id, client), = federation.clients.items()
    estimate = training_memory_bytes(federation.workspace, AdapterShape(**shape), args.batch_size)
    instruction = federation.server.instruction(1, client_id)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: training, not the model's loading
    before = status_mib("VmRSS")
    client.fit(federation.workspace, instruction, federation.data.clients[client_id])
    training = status_mib("VmHWM") - before
    weights = estimate["weights"] / 2**20
    return {"estimate_mib": estimate["total"] / 2**20, "measured_mib": weights + training,
            "training_estimate_mib": (estimate["optimizer"] + estimate["activations"]) / 2**20,
            "training_measured_mib": training, "weights_mib": weights}


def measured_in_subprocess(args: argparse.Namespace, shape: dict[str, int]) -> dict[str, float]:
    command = [sys.executable, __file__, "--measure", json.dumps(shape), *args.passthrough]
    # Every allocation of 64 KiB or more gets its own mapping, returned when freed: the peak RSS then follows
    # the live tensors instead of glibc's reuse of what loading the model freed (its default threshold adapts).
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 6 clients, 1,200 examples")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-examples", type=int, default=3000)
    parser.add_argument("--eval-examples", type=int, default=872)
    parser.add_argument("--budgets", default="phone=0,laptop=0,workstation=0",
                        help="memory_mb each class reports (MiB); 0 = measure the shapes and put each budget "
                             "between them (see the module docstring)")
    parser.add_argument("--runs", default="abcde", help="which of the five runs, by letter (default: all)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.clients, args.train_examples, args.eval_examples = 3, 6, 1200, 256
    args.passthrough = [f"--{key.replace('_', '-')}={value}" for key, value in (
        ("rounds", args.rounds), ("clients", args.clients), ("local_steps", args.local_steps),
        ("batch_size", args.batch_size), ("seed", args.seed), ("data", args.data),
        ("train_examples", args.train_examples), ("eval_examples", args.eval_examples))]
    args.budgets = {name: int(value) for name, value in (item.split("=") for item in args.budgets.split(","))}
    if args.measure:
        shape = json.loads(args.measure)
        print(json.dumps(measure(args, shape["rank"], shape.get("depth"))))
        return

    import torch

    from fedtune.simulations.config import SimulationConfig
    from fedtune.simulations.runner import run_simulation

    torch.set_num_threads(1)
    memory = {}
    for shape in CANDIDATES:
        memory[json.dumps(shape)] = measured_in_subprocess(args, shape)
        print(f"shape {shape}: estimate {memory[json.dumps(shape)]['estimate_mib']:.1f} MiB, measured peak "
              f"{memory[json.dumps(shape)]['measured_mib']:.1f} MiB", flush=True)
    if not any(args.budgets.values()):  # each class can afford its own shape's measured peak + 15 %, not the next
        peaks = [memory[json.dumps(shape)]["measured_mib"] for shape in CANDIDATES]
        estimates = [memory[json.dumps(shape)]["estimate_mib"] for shape in CANDIDATES]
        for name, peak, estimate in zip(reversed(CLASSES), peaks, estimates, strict=True):
            args.budgets[name] = int(max(peak, estimate) * 1.15) + 1
    print(f"budgets (memory_mb reported): {args.budgets}", flush=True)

    accuracy: dict[str, list[float]] = {}
    bytes_up: dict[str, dict[str, float]] = {}
    for name, raw in run_configs(args).items():
        if name[1] not in args.runs:
            continue
        started = time.perf_counter()
        out = RESULTS / f"seed{args.seed}" / name.split(" ", 1)[1]
        rows = run_simulation(SimulationConfig.model_validate(raw), out, show_progress=False)
        accuracy[name] = [row.eval_accuracy or 0.0 for row in rows]
        dumped = [row.model_dump() for row in rows]
        bytes_up[name] = {cls: sum(row.get(f"payload_up.{cls}", 0.0) for row in dumped) for cls in CLASSES}
        clients = [row.clients for row in rows[1:]]
        print(f"{name:18s} clients/round {clients[0]:2d}  final acc {accuracy[name][-1]:.4f}  best "
              f"{max(accuracy[name][1:]):.4f}  {time.perf_counter() - started:.0f} s", flush=True)

    print("\naccuracy per round (round 0 = before training)")
    for name, values in accuracy.items():
        print(f"{name:18s} " + " ".join(f"{value:.3f}" for value in values))
    print("\nadapter bytes up over the run, by class (KiB)")
    for name, by_class in bytes_up.items():
        print(f"{name:18s} " + "  ".join(f"{cls} {value / 1024:8.1f}" for cls, value in by_class.items()))
    print("\nmemory per class's shape (MiB): weights; training estimate, measured, error; total estimate, measured; "
          "budget")
    for cls, shape in zip(reversed(CLASSES), CANDIDATES, strict=True):
        row = memory[json.dumps(shape)]
        error = (row["training_estimate_mib"] - row["training_measured_mib"]) / row["training_measured_mib"]
        print(f"{cls:12s} {json.dumps(shape):28s} {row['weights_mib']:6.1f}; {row['training_estimate_mib']:6.1f} "
              f"{row['training_measured_mib']:6.1f} {error:+.1%}; {row['estimate_mib']:6.1f} "
              f"{row['measured_mib']:6.1f}; "
              f"{args.budgets[cls]}  within: {row['measured_mib'] <= args.budgets[cls]}")
    heterogeneous = [name for name in ("(c) hetlora", "(d) rank-sliced", "(e) flexlora") if name in accuracy]
    if heterogeneous:
        best = max(heterogeneous, key=lambda name: accuracy[name][-1])
        baselines = ", ".join(f"{name} {accuracy[name][-1]:.4f}" for name in ("(a) smallest", "(b) weak excluded")
                              if name in accuracy)
        print(f"\nbest heterogeneous run {best}: {accuracy[best][-1]:.4f} against {baselines or 'no baseline run'}")


if __name__ == "__main__":
    main()
