"""The Flower side of bench_vs_flower.py: FedAvg over peft LoRA on Flower's own simulation engine.

Runs in the benchmark's own environment (benchmarks/.venv-flower: flwr[simulation]==1.41.0, ray,
torch, transformers, peft; not fedtune). bench_vs_flower.py prepares the task once (tokenised
client partitions, each client's batch order and dropout seed per round, the initial adapter) so
that both frameworks train on exactly the same batches from the same start; this file is what a
Flower user would write for it: a ClientApp that loads the global adapter with peft, runs the
local AdamW steps and replies with the adapter, and a ServerApp with Flower's FedAvg and a
centralised evaluation of the global adapter after every round.

Each Ray actor builds its model once and keeps it for later rounds (Flower's quickstarts rebuild
it per call; caching is the fast choice), so Flower is measured at its best here.

    benchmarks/.venv-flower/bin/python benchmarks/flower_app.py TASK_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification

TASK_ENV = "FEDTUNE_FLOWER_TASK"
_loaded: dict[str, Any] = {}  # per process: the task and one peft model over its own base copy


def load_task(task_dir: str) -> dict[str, Any]:
    """task.json (hyperparameters) and data.pt (partitions, batch orders, seeds, initial adapter)."""
    if _loaded.get("dir") != task_dir:
        spec = json.loads((Path(task_dir) / "task.json").read_text())
        data = torch.load(Path(task_dir) / "data.pt", weights_only=True)
        _loaded.clear()
        _loaded.update(dir=task_dir, spec=spec, data=data, model=build_model(spec))
    return _loaded


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = AutoModelForSequenceClassification.from_pretrained(
        spec["model_path"], num_labels=spec["num_labels"], dtype="float32"
    )
    base.config.pad_token_id = spec["pad_token_id"]
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
        target_modules=spec["target_modules"],
    )
    model = get_peft_model(base, lora)
    model.eval()
    return model


def collate(input_ids: list[list[int]], labels: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in input_ids)
    batch = torch.full((len(input_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, ids in enumerate(input_ids):
        batch[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return {"input_ids": batch, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long)}


client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Local AdamW steps over this client's batches for the round, from the global adapter."""
    torch.set_num_threads(1)
    config = message.content["config"]
    loaded = load_task(str(config["task-dir"]))
    spec, data, model = loaded["spec"], loaded["data"], loaded["model"]
    client_id = spec["client_ids"][int(context.node_config["partition-id"])]
    round_key = str(int(config["server-round"]))
    examples = data["clients"][client_id]
    set_peft_model_state_dict(model, message.content["arrays"].to_torch_state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["learning_rate"], weight_decay=spec["weight_decay"])
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data["seeds"][client_id][round_key])
        model.train()
        for order in data["orders"][client_id][round_key]:
            batch = collate([examples["input_ids"][i] for i in order], [examples["labels"][i] for i in order],
                            spec["pad_token_id"])
            optimizer.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
    state = {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}
    metrics = MetricRecord({"train_loss": sum(losses) / len(losses), "num-examples": len(examples["labels"])})
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=message)


@torch.no_grad()
def evaluate_global(spec: dict[str, Any], data: dict[str, Any], model: torch.nn.Module) -> dict[str, float]:
    """Loss and accuracy of the global model on the evaluation set (as tasks.evaluation does)."""
    model.eval()
    eval_set, size = data["eval"], len(data["eval"]["labels"])
    loss_sum, correct = 0.0, 0
    for start in range(0, size, spec["eval_batch_size"]):
        stop = min(start + spec["eval_batch_size"], size)
        batch = collate(eval_set["input_ids"][start:stop], eval_set["labels"][start:stop], spec["pad_token_id"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return {"eval_loss": loss_sum / size, "eval_accuracy": correct / size}


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    task_dir, out_dir = os.environ[TASK_ENV].split(os.pathsep)
    loaded = load_task(task_dir)  # the server's own model: evaluation only
    spec, data, model = loaded["spec"], loaded["data"], loaded["model"]
    rows: list[dict[str, float]] = []
    started = time.perf_counter()

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_peft_model_state_dict(model, arrays.to_torch_state_dict())
        row = {"round": server_round, **evaluate_global(spec, data, model),
               "elapsed": round(time.perf_counter() - started, 3)}
        rows.append(row)
        (Path(out_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return MetricRecord({k: v for k, v in row.items() if k != "round"})

    clients = len(spec["client_ids"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                      min_available_nodes=clients)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(data["initial"]),
        num_rounds=spec["rounds"],
        train_config=ConfigRecord({"task-dir": task_dir}),
        evaluate_fn=central_evaluation,
    )


def run(task_dir: str, out_dir: str) -> None:
    """Flower's simulation engine (ray backend): 2 actors with one CPU (and one thread) each."""
    spec = json.loads((Path(task_dir) / "task.json").read_text())
    os.environ[TASK_ENV] = os.pathsep.join((task_dir, out_dir))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(spec["client_ids"]),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": spec["workers"], "num_gpus": 0, "logging_level": "WARNING"},
        },
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_app  # the apps must come from an importable module, not __main__, for the Ray actors

    flower_app.run(*sys.argv[1:3])
