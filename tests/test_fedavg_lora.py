"""FedAvg over LoRA: docs/algorithms.md §6.1 checks."""

from __future__ import annotations

import random

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import BertConfig, BertForSequenceClassification

from fedtune.fedserver.engine import RoundEngine
from fedtune.fedserver.metrics import MetricsLog
from fedtune.protos.convert import payload_size, update_to_proto
from fedtune.simulations.runner import build_federation, run_round, run_simulation
from fedtune.strategies import api
from fedtune.strategies.api import ClientUpdate, RunContext, hash_seed, weighted_mean
from fedtune.strategies.fedavg_lora import FedAvgLoraConfig, FedAvgLoraServer
from fedtune.strategies.ffa_lora import FfaLoraConfig, FfaLoraServer
from fedtune.strategies.peft_lora import LoraOptions, LoraWorkspace
from fedtune.tasks.builtin import char_tokenizer
from fedtune.tasks.config import ModelConfig, TrainConfig
from fedtune.tasks.models import ModelBundle, load_model
from tests.helpers import tiny_config


def test_one_client_equals_plain_local_training(tmp_path):
    """R rounds of one-client FedAvg (through the protobuf wire) == R blocks of local steps with a
    fresh optimizer, bit for bit (§6.1.1)."""
    config = tiny_config(rounds=3, partition={"scheme": "iid", "num_clients": 1})
    run_simulation(config, tmp_path, show_progress=False)
    federated = PeftModel.from_pretrained(load_model(config.model, config.seed).model, tmp_path / "global")

    reference = build_federation(config)  # fresh base, identical initial adapter
    model = reference.workspace.model
    initial = {name: t.clone() for name, t in get_peft_model_state_dict(model).items()}
    data = reference.data.clients["client-000"]
    params = [p for p in model.parameters() if p.requires_grad]
    for round in range(1, config.rounds + 1):
        generator = torch.Generator().manual_seed(hash_seed(config.seed, "client-000", round))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash_seed(config.seed, "client-000", round, "torch"))
            optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate, weight_decay=0.0)
            model.train()
            for batch in data.train_batches(config.train.local_steps, config.train.batch_size, generator):
                optimizer.zero_grad()
                model(**batch).loss.backward()
                optimizer.step()
    expected = get_peft_model_state_dict(model)
    got = get_peft_model_state_dict(federated)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert any(not torch.equal(expected[name], initial[name]) for name in expected), "adapter never moved"


def _server(values: dict[str, tuple[float, int]]) -> tuple[FedAvgLoraServer, list[ClientUpdate]]:
    context = RunContext(seed=0, rounds=1, train=TrainConfig(), model_kind="causal_lm")
    server = FedAvgLoraServer(FedAvgLoraConfig(), context)
    server.global_tensors = {"w": torch.zeros(2, 3)}
    updates = [
        ClientUpdate(client_id=cid, round=1, num_examples=n, tensors={"w": torch.full((2, 3), value)})
        for cid, (value, n) in values.items()
    ]
    return server, updates


def test_weighted_mean_hand_computed_and_order_invariant():
    server, updates = _server({"a": (1.0, 1), "b": (3.0, 3), "c": (-2.0, 4)})
    server.aggregate(1, updates)
    expected = (1.0 * 1 + 3.0 * 3 - 2.0 * 4) / 8  # 0.25
    assert torch.equal(server.global_tensors["w"], torch.full((2, 3), expected))
    first = server.global_tensors["w"].clone()
    for _ in range(5):
        shuffled = updates[:]
        random.shuffle(shuffled)
        server.aggregate(1, shuffled)
        assert torch.equal(server.global_tensors["w"], first)


def _mean_by_loop(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The definition weighted_mean keeps: each product added to a float64 sum, left to right from zero."""
    total = float(sum(weights))
    accumulator = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights, strict=True):
        accumulator += tensor.to(torch.float64) * (weight / total)
    return accumulator.to(tensors[0].dtype)


@pytest.mark.parametrize("block_bytes", [8 << 20, 24])  # one numpy call per mean, and three inputs per call
def test_weighted_mean_is_the_left_to_right_float64_sum_bit_for_bit(monkeypatch, block_bytes):
    """Numpy's pairwise summation would differ in the last bits for single-element tensors (shape (1,))
    and for large magnitudes that cancel; -0.0 inputs give +0.0 as the loop does."""
    monkeypatch.setattr(api, "MEAN_BLOCK_BYTES", block_bytes)
    generator = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for shape in ((), (1,), (3, 4)):
            count = 101
            scales = 10.0 ** torch.randint(-4, 12, (count,), generator=generator)
            tensors = [(torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
                       for scale in scales]
            weights = [float(w) for w in torch.randint(1, 50, (count,), generator=generator)]
            mean = weighted_mean(tensors, weights)
            expected = _mean_by_loop(tensors, weights)
            assert mean.dtype == dtype and mean.shape == shape
            assert torch.equal(mean.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)), (dtype, shape)
    zeros = weighted_mean([torch.tensor([-0.0])] * 3, [1, 2, 3])
    assert not zeros.signbit().item()
    cancelling = [torch.tensor([1e16], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)] * 3
    assert torch.equal(weighted_mean(cancelling, [1] * 6), _mean_by_loop(cancelling, [1] * 6))


def test_discordance_identity():
    """sum p_i B_i A_i - B̄Ā == sum p_i (B_i-B̄)(A_i-Ā); non-zero in general, zero for shared A (§1.3)."""
    generator = torch.Generator().manual_seed(0)
    weights = [1.0, 2.0, 5.0]
    p = [w / sum(weights) for w in weights]
    Bs = [torch.randn(6, 2, generator=generator, dtype=torch.float64) for _ in weights]
    As = [torch.randn(2, 5, generator=generator, dtype=torch.float64) for _ in weights]
    B_bar, A_bar = weighted_mean(Bs, weights), weighted_mean(As, weights)
    gap = sum(pi * B @ A for pi, B, A in zip(p, Bs, As, strict=False)) - B_bar @ A_bar
    torch.testing.assert_close(gap, sum(pi * (B - B_bar) @ (A - A_bar) for pi, B, A in zip(p, Bs, As, strict=False)))
    assert gap.abs().max() > 1e-3
    shared = sum(pi * B @ As[0] for pi, B in zip(p, Bs, strict=False)) - B_bar @ weighted_mean([As[0]] * 3, weights)
    assert shared.abs().max() < 1e-12


def test_zero_b_adapter_equals_base_model():
    config = tiny_config()
    bundle = load_model(config.model, config.seed)
    batch = next(iter(build_federation(config).data.eval.eval_batches(4)))
    with torch.no_grad():
        base_logits = bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    workspace = LoraWorkspace(bundle, LoraOptions(), RunContext(0, 1, TrainConfig(), "causal_lm"), freeze_a=False)
    with torch.no_grad():
        adapted = workspace.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(adapted, base_logits)


def minilm_shaped_bundle() -> ModelBundle:
    """A randomly initialised BERT with all-MiniLM-L6-v2's shapes (hidden 384, 6 layers), small vocab."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
        intermediate_size=1536, num_labels=2,
    ))
    model.requires_grad_(False)
    return ModelBundle(model, tokenizer, ModelConfig(path="test:minilm-shaped", kind="seq_cls"))


def test_only_adapters_travel_with_exact_payload_bytes():
    """§0.4 / §6.1.5 / §6.2.2: MiniLM q,v r=8 → 294,912 B of LoRA (147,456 B for FFA) + 3,080 B head."""
    context = RunContext(seed=0, rounds=1, train=TrainConfig(), model_kind="seq_cls")
    sizes = {}
    strategies = (("lora", FedAvgLoraServer, FedAvgLoraConfig, False), ("ffa", FfaLoraServer, FfaLoraConfig, True))
    for name, server_class, config_class, freeze_a in strategies:
        options = config_class(rank=8, target_modules=["query", "value"])
        workspace = LoraWorkspace(minilm_shaped_bundle(), options, context, freeze_a=freeze_a)
        server = server_class(options, context)
        server.initialize(workspace)
        tensors = server.instruction(1, "client-000").tensors
        assert set(workspace.wire_names) == set(get_peft_model_state_dict(workspace.model))
        assert set(tensors) <= set(workspace.wire_names)
        head = {n: t for n, t in tensors.items() if "lora_" not in n}
        assert payload_size(head) == 3_080
        sizes[name] = payload_size(tensors) - 3_080
        update = ClientUpdate(client_id="client-000", round=1, num_examples=1, tensors=tensors)
        framing = update_to_proto(update).ByteSize() - payload_size(tensors)
        assert 0 < framing <= 0.01 * payload_size(tensors) + 300 * len(tensors)
    assert sizes == {"lora": 294_912, "ffa": 147_456}


def test_saved_adapter_loads_with_peft_and_gives_same_logits(tmp_path):
    config = tiny_config(rounds=1)
    federation = build_federation(config)
    engine = RoundEngine(federation.server, federation.workspace, None, 8, MetricsLog(tmp_path))
    run_round(federation, engine, 1)
    engine.save_global(tmp_path / "global")
    assert (tmp_path / "global" / "adapter_config.json").exists()
    assert (tmp_path / "global" / "adapter_model.safetensors").exists()

    loaded = PeftModel.from_pretrained(load_model(config.model, config.seed).model, tmp_path / "global").eval()
    batch = next(iter(federation.data.eval.eval_batches(8)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = federation.workspace.model(**inputs).logits
        got = loaded(**inputs).logits
        base_logits = load_model(config.model, config.seed).model(**inputs).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, base_logits)
