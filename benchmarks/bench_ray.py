"""fedsim on a local two-node Ray cluster against fedsim with forked workers: the Ray path's overhead per round,
and how 1,000 virtual clients of the tiny model fare through it.

    .venv/bin/python benchmarks/bench_ray.py [--clients 8 1000] [--rounds 3]

Same config, same session, one run after the other: the tiny model (builtin:tiny-llama, fedavg_lora on
builtin:ops), every client training every round (1 local step of 4 examples; 4 examples per client),
once with `workers = 2` (two forked workers of one torch thread) and once with `backend = "ray"` on
a cluster of two nodes of one CPU each started here (tests/ray_cluster.py: one actor per node, one
torch thread). fedsim itself runs one torch thread. Each fedsim run is a child process of this
script, so peaks do not mix.

Reported per run: the median round's wall time (metrics.jsonl `seconds`: instructions out, local work,
updates in, aggregation, evaluation; round 1 left out as warm-up), the run's whole wall time (start-up
included: with Ray each actor builds its own federation on its node), the peak memory (PSS, and
distinct physical pages when root; process_tree.py) of fedsim's process tree (with workers, the forks
too) and, for Ray, of each node's processes (its `ray start`, raylet, GCS on the head, the actor),
with each node's idle footprint before the run beside it. Both runs must end with the same global
adapter (checked). Then the Ray/workers ratio of the median round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from process_tree import TreeMonitor, run_measured  # noqa: E402

from tests.ray_cluster import LocalRayCluster  # noqa: E402


def run_config(clients: int, rounds: int, backend: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's fedsim config as JSON: `backend` is {"workers": 2} or {"backend": "ray", ...}."""
    return {
        "strategy": "fedavg_lora", "rounds": rounds, "seed": 0, "threads": 1,
        "model": {"path": "builtin:tiny-llama", "kind": "causal_lm", "max_length": 32},
        "data": {"train": "builtin:ops", "max_train_examples": max(400, 4 * clients), "max_eval_examples": 64},
        "partition": {"scheme": "iid", "num_clients": clients},
        "train": {"local_steps": 1, "batch_size": 4, "learning_rate": 3e-3},
        **backend,
    }


def child_run(config_path: Path, out: Path) -> None:
    """One fedsim run in this process (the benchmark's child), single-threaded as fedsim's CLI sets it."""
    from fedtune.simulations.config import SimulationConfig
    from fedtune.simulations.runner import run_simulation
    from fedtune.tasks.threads import apply_threads

    config = SimulationConfig.model_validate(json.loads(config_path.read_text()))
    apply_threads(config.process_threads())
    run_simulation(config, out, show_progress=False)


def child_transport(config_path: Path, out: Path, repeats: int = 20) -> None:
    """The pool's own cost per round (the benchmark's child): `repeats` rounds with no instruction (a message to
    each worker or actor and its end-of-round reply, the idle hooks of fedavg_lora doing nothing), timed."""
    from fedtune.simulations.config import SimulationConfig
    from fedtune.simulations.ray_backend import RayPool
    from fedtune.simulations.runner import build_federation
    from fedtune.simulations.workers import WorkerPool
    from fedtune.tasks.threads import apply_threads

    config = SimulationConfig.model_validate(json.loads(config_path.read_text()))
    apply_threads(config.process_threads())
    federation = build_federation(config)
    pool = (RayPool(config, federation.clients) if config.backend == "ray" else
            WorkerPool(federation.clients, federation.workspace, federation.data.clients, config.workers))
    with pool:
        timings = []
        for round in range(1, repeats + 1):
            started = time.perf_counter()
            pool.run(round, {})
            timings.append(time.perf_counter() - started)
    out.write_text(json.dumps(timings))


def transport_ms(config: dict[str, Any], scratch: Path, name: str) -> float:
    """The median empty round of `config`'s pool, in ms."""
    config_path, out = scratch / f"{name}.json", scratch / f"{name}.times"
    config_path.write_text(json.dumps(config))
    run_measured([sys.executable, __file__, "--transport", str(config_path), str(out)], scratch / f"{name}.log",
                 cwd=ROOT)
    return 1000 * statistics.median(json.loads(out.read_text()))


def measured(config: dict[str, Any], scratch: Path, name: str,
             nodes: list[TreeMonitor] | None = None) -> dict[str, Any]:
    """Run `config` as a child process while sampling its tree (and the Ray nodes' trees); its numbers."""
    config_path, out = scratch / f"{name}.json", scratch / name
    config_path.write_text(json.dumps(config))
    with ExitStack() as stack:
        for monitor in nodes or []:
            stack.enter_context(monitor)
        peak = run_measured([sys.executable, __file__, "--run", str(config_path), str(out)],
                            scratch / f"{name}.log", cwd=ROOT, timeout_s=3600)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"name": name, "wall_s": peak.wall_s, "round_s": statistics.median(row["seconds"] for row in rounds[1:]),
            "rounds_s": [row["seconds"] for row in rounds], "pss_mb": peak.pss_mb, "unique_mb": peak.unique_mb,
            "nodes": [(monitor.peak.pss_mb, monitor.peak.unique_mb) for monitor in nodes or []],
            "adapter": load_file(out / "global" / "adapter_model.safetensors")}


def idle_footprint(cluster: LocalRayCluster) -> list[tuple[float, float | None]]:
    """Each node's memory with no run on it (PSS, distinct pages)."""
    footprints = []
    for process in cluster.processes:
        monitor = TreeMonitor(process.pid)
        monitor.sample()
        footprints.append((monitor.peak.pss_mb, monitor.peak.unique_mb))
    return footprints


def megabytes(pss: float, unique: float | None) -> str:
    return f"{pss:6.0f} MB PSS" + ("" if unique is None else f" / {unique:6.0f} MB distinct")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--transport", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run or args.transport:
        (child_run if args.run else child_transport)(*(Path(arg) for arg in args.run or args.transport))
        return
    torch.set_num_threads(1)  # this process only reads the adapters back
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as scratch, LocalRayCluster(nodes=2, cpus=1) as cluster:
        time.sleep(5)  # the nodes' start-up work settles before the idle footprint
        idle = idle_footprint(cluster)
        print("idle Ray nodes: " + "; ".join(megabytes(*node) for node in idle), flush=True)
        ray_backend = {"backend": "ray", "ray_address": cluster.address}
        empty = {name: transport_ms(run_config(8, 1, backend), Path(scratch), f"transport-{name}")
                 for name, backend in (("workers", {"workers": 2}), ("ray", ray_backend))}
        print(f"empty round (the pool's own round trip), median of 20: workers {empty['workers']:.1f} ms, "
              f"Ray {empty['ray']:.1f} ms", flush=True)
        for clients in args.clients:
            workers = measured(run_config(clients, args.rounds, {"workers": 2}), Path(scratch), f"workers-{clients}")
            monitors = [TreeMonitor(process.pid) for process in cluster.processes]
            ray = measured(run_config(clients, args.rounds, ray_backend), Path(scratch), f"ray-{clients}", monitors)
            same = all(torch.equal(workers["adapter"][key], ray["adapter"][key]) for key in workers["adapter"])
            print(f"\n{clients} clients, {args.rounds} rounds; same global adapter: {same}", flush=True)
            for run in (workers, ray):
                peak = megabytes(run["pss_mb"], run["unique_mb"])
                print(f"  {run['name']:<12} median round {run['round_s']:7.2f} s (rounds {run['rounds_s']}), "
                      f"whole run {run['wall_s']:6.1f} s; fedsim's tree peak {peak}", flush=True)
            for index, (peak, base) in enumerate(zip(ray["nodes"], idle, strict=True)):
                print(f"  Ray node {index} ({'head' if index == 0 else 'worker'}): peak {megabytes(*peak)} "
                      f"(idle {megabytes(*base)})", flush=True)
            print(f"  Ray / workers: median round x{ray['round_s'] / workers['round_s']:.2f}, "
                  f"whole run x{ray['wall_s'] / workers['wall_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
