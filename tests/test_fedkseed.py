"""FedKSeed(-Pro): docs/algorithms.md §6.3 checks, plus Rouge-L and the Natural Instructions reader."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.protos.convert import wire_size
from fedtune.simulations.runner import build_federation, run_simulation
from fedtune.strategies.api import ClientUpdate, InvalidInstruction, InvalidUpdate, RunContext
from fedtune.strategies.fedkseed import (
    CHECKPOINT_PREFIX,
    SCALAR_GRAD,
    SEED_INDEX,
    SEED_LEVEL,
    FedKSeedClient,
    FedKSeedConfig,
    FedKSeedServer,
    SeedWorkspace,
)
from fedtune.strategies.fedkseed_history import GENESIS, LOG_INDEX, RoundDelta, encode_log, versions_along
from fedtune.strategies.fedkseed_kernels import (
    PERTURBATION_CHUNK,
    amplitude_levels,
    perturb,
    perturbation,
    seed_probabilities,
    zeroth_order_step,
)
from fedtune.tasks.builtin import char_tokenizer, ops_examples
from fedtune.tasks.config import DataConfig, ModelConfig, TrainConfig
from fedtune.tasks.data import encode, load_records
from fedtune.tasks.models import ModelBundle, load_model
from tests.helpers import tiny_config

REPLAY_SCRIPT = "from tests.test_fedkseed import replayed_digest; print(replayed_digest())"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These models are tiny: one intra-op thread is faster on a shared CPU (and results don't depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context(train: TrainConfig | None = None, seed: int = 0) -> RunContext:
    return RunContext(seed=seed, rounds=1, train=train or TrainConfig(), model_kind="causal_lm")


def llama_bundle(hidden: int, layers: int = 2) -> ModelBundle:
    """A seeded Llama of a chosen size over the built-in character tokenizer."""
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return ModelBundle(model=model, tokenizer=tokenizer, config=ModelConfig(max_length=16))


def ops_data(tokenizer, count: int = 64):
    return encode(ops_examples(count, seed=3), tokenizer, DataConfig(), "causal_lm", 16)


def synthetic_log(versions: int, pairs: int, pool_size: int, seed: int) -> list[RoundDelta]:
    """A seeded (seed index, scalar) history: distinct ascending indices, small scalars."""
    generator = torch.Generator().manual_seed(seed)
    log = []
    for _ in range(versions):
        index = torch.randperm(pool_size, generator=generator)[:pairs].sort().values
        log.append(RoundDelta(seed_index=index, value=torch.randn(pairs, generator=generator) * 10))
    return log


def replayed_digest() -> str:
    """w_0 of the built-in tiny model, then a fixed 3-version history replayed; SHA-256 of the result."""
    workspace = SeedWorkspace(
        load_model(ModelConfig(), seed=0), FedKSeedConfig(), context(TrainConfig(learning_rate=1e-3))
    )
    log = synthetic_log(versions=3, pairs=20, pool_size=4096, seed=7)
    workspace.catch_up(GENESIS, log, versions_along(GENESIS, log)[-1])
    return workspace.digest()


@pytest.mark.e2e  # two fresh Python processes
def test_replay_is_bit_identical_in_two_separate_processes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", REPLAY_SCRIPT], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    digests = [run.communicate(timeout=120)[0].strip() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    here = replayed_digest()
    assert digests == [here, here]
    untouched = SeedWorkspace(load_model(ModelConfig(), seed=0), FedKSeedConfig(), context())
    assert untouched.digest() != here  # the replay did move the weights


def play_round(server, clients, workspaces, datasets, round, participants):
    updates = []
    for client_id in participants:
        instruction = server.instruction(round, client_id)
        updates.append(clients[client_id].fit(workspaces[client_id], instruction, datasets[client_id]))
    for update in updates:
        server.validate_update(update, round)
    server.aggregate(round, updates)
    return updates


def test_skipped_client_catches_up_to_the_same_weights_by_replay():
    """Separate workspaces, as over gRPC: A takes part in rounds 1-3, B only in round 1; in round 4 both
    replay their logs and hold exactly the server's global model."""
    train = TrainConfig(local_steps=3, batch_size=4, learning_rate=1e-3)
    config, ctx = FedKSeedConfig(), context(train)
    server_space = SeedWorkspace(load_model(ModelConfig(), 0), config, ctx)
    workspaces = {cid: SeedWorkspace(load_model(ModelConfig(), 0), config, ctx) for cid in ("a", "b")}
    server = FedKSeedServer(config, ctx)
    server.initialize(server_space)
    clients = {cid: FedKSeedClient(config, ctx, cid) for cid in workspaces}
    data = ops_data(server_space.tokenizer)
    datasets = {"a": data, "b": data}
    play_round(server, clients, workspaces, datasets, 1, ["a", "b"])
    play_round(server, clients, workspaces, datasets, 2, ["a"])
    play_round(server, clients, workspaces, datasets, 3, ["a"])

    behind, current = server.instruction(4, "b"), server.instruction(4, "a")
    assert behind.settings["base_version"] == 0 and current.settings["base_version"] == 2
    clients["b"].receive(workspaces["b"], behind)
    clients["a"].receive(workspaces["a"], current)
    server.load_global_into(server_space)
    assert workspaces["b"].version == workspaces["a"].version == server_space.version
    assert workspaces["b"].digest() == workspaces["a"].digest() == server_space.digest()


def test_replayed_global_equals_weighted_average_of_client_models():
    """§6.3.4: by linearity the replay is the p-weighted mean of the clients' end-of-round models."""
    federation = build_federation(tiny_config(strategy="fedkseed", partition={"scheme": "dirichlet", "num_clients": 3},
                                              train={"local_steps": 4, "learning_rate": 1e-2}))
    workspace, server = federation.workspace, federation.server
    start = [p.detach().clone() for _, p in workspace.parameters]
    ends, updates = [], []
    for client_id, client in federation.clients.items():
        update = client.fit(workspace, server.instruction(1, client_id), federation.data.clients[client_id])
        ends.append([p.detach().clone() for _, p in workspace.parameters])
        updates.append(update)
    server.aggregate(1, updates)
    server.load_global_into(workspace)
    counts = [u.num_examples for u in updates]
    assert len(set(counts)) > 1  # unequal weights, so p matters
    moved = 0.0
    for index, (_, parameter) in enumerate(workspace.parameters):
        average = sum(n * end[index].double() for n, end in zip(counts, ends, strict=False)) / sum(counts)
        torch.testing.assert_close(parameter.double(), average, rtol=0, atol=1e-6)
        moved = max(moved, float((parameter - start[index]).abs().max()))
    assert moved > 1e-4


def test_upload_is_s_pairs_and_bytes_per_round_are_small_and_independent_of_model_size():
    """Paper defaults (K = 4096, τ = 200, m = 10 clients a round) on two model sizes: version 1 is ten
    valid 200-pair uploads, then a client downloads that log, trains τ steps and uploads its pairs."""
    train = TrainConfig(local_steps=200, batch_size=1, learning_rate=1e-4)
    config, ctx = FedKSeedConfig(), context(train)
    round_one = [
        ClientUpdate(client_id=f"client-{i:03d}", round=1, num_examples=50,
                     tensors={SEED_INDEX: delta.seed_index.to(torch.int16), SCALAR_GRAD: delta.value})
        for i, delta in enumerate(synthetic_log(10, 200, 4096, seed=1))
    ]
    measured = {}
    for hidden in (32, 128):
        bundle = llama_bundle(hidden)
        workspace = SeedWorkspace(bundle, config, ctx)
        server, client = FedKSeedServer(config, ctx), FedKSeedClient(config, ctx, "client-000")
        server.initialize(workspace)
        for update in round_one:
            server.validate_update(update, 1)
        server.aggregate(1, round_one)
        instruction = server.instruction(2, "client-000")
        update = client.fit(workspace, instruction, ops_data(bundle.tokenizer))
        drawn = client.draw_seeds(instruction, 200, client.seed_generator(2))
        assert update.tensors[SEED_INDEX].tolist() == sorted(set(drawn))  # S distinct seeds, S pairs
        assert update.tensors[SCALAR_GRAD].shape == update.tensors[SEED_INDEX].shape
        assert instruction.tensors[LOG_INDEX].numel() > 1500
        measured[hidden] = (wire_size(instruction), wire_size(update), sum(p.numel() for _, p in workspace.parameters))
    (down_small, up_small, size_small), (down_large, up_large, size_large) = measured.values()
    assert size_large > 8 * size_small
    assert (down_small, up_small) == (down_large, up_large)
    assert up_small <= 200 * 6 + 200
    assert down_small + up_small <= 18_000


def test_seeded_fedsim_run_lowers_the_loss_and_logs_bytes(tmp_path):
    config = tiny_config(strategy="fedkseed", rounds=2, partition={"scheme": "iid", "num_clients": 2},
                         train={"local_steps": 10, "learning_rate": 1e-3}, options={"eps": 1e-3})
    history = run_simulation(config, tmp_path, show_progress=False)
    assert history[-1].eval_loss < history[0].eval_loss - 0.02
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < row["bytes_up"] <= 2 * (10 * 6 + 200) for row in rows[1:])
    assert rows[2]["bytes_down"] > rows[1]["bytes_down"]  # round 2 carries round 1's log
    assert (tmp_path / "global" / "model.safetensors").exists()


def test_weight_decay_is_rejected_for_seed_replay():
    with pytest.raises(ValueError, match="train.weight_decay"):
        build_federation(tiny_config(strategy="fedkseed", train={"weight_decay": 0.01}))


def test_two_point_estimator_is_unbiased_on_a_quadratic():
    """§6.3.7: on f(w) = ½ wᵀHw the mean of g·z over many seeds is Hw, within 3 standard errors."""
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]), requires_grad=False)
    parameters = [("w", weight)]
    hessian = torch.tensor(
        [[2.0, 0.5, 0, 0], [0.5, 1.0, 0, 0], [0, 0, 3.0, -1.0], [0, 0, -1.0, 4.0]], dtype=torch.float64
    )

    def quadratic() -> float:
        w = weight.detach().double()
        return float(0.5 * w @ hessian @ w)

    samples = []
    for seed in range(4000):
        step = zeroth_order_step(parameters, seed, eps=1e-2, learning_rate=0.0, loss_fn=quadratic)
        (_, z), = perturbation(parameters, seed)
        samples.append(step.scalar_grad * z.double())
    samples = torch.stack(samples)
    expected = hessian @ weight.detach().double()
    standard_error = samples.std(dim=0) / math.sqrt(len(samples))
    assert bool(((samples.mean(dim=0) - expected).abs() <= 3 * standard_error).all())


def test_perturbation_is_the_same_on_any_thread_count():
    """z is defined per chunk, so spreading chunks over threads must not change a single bit."""
    weight = torch.nn.Parameter(torch.zeros(5 * PERTURBATION_CHUNK + 3), requires_grad=False)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            weight.zero_()
            perturb([("w", weight)], seed=7, scale=1.0)
            results.append(weight.detach().clone())
    finally:
        torch.set_num_threads(threads)
    (_, z), = perturbation([("w", weight)], 7)
    assert all(torch.equal(result, z) for result in results)
    first, second = z[:PERTURBATION_CHUNK], z[PERTURBATION_CHUNK:2 * PERTURBATION_CHUNK]
    assert not torch.equal(first, second)  # every chunk is its own stream
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


def test_perturb_and_restore_stays_within_rounding():
    """§6.3.6 with g forced to 0 (η = 0): w + εz − 2εz + εz ends within 1.5 ulp(|w| + 2ε|z|) of w
    (three round-to-nearest additions whose exact terms cancel). The spec's ulp(ε·max|z|) leaves out
    the |w| term that each addition rounds at."""
    workspace = SeedWorkspace(load_model(ModelConfig(), 0), FedKSeedConfig(), context())
    batch = next(ops_data(workspace.tokenizer).train_batches(1, 4, torch.Generator().manual_seed(0)))
    before = [p.detach().clone() for _, p in workspace.parameters]
    eps = 1e-3
    step = zeroth_order_step(workspace.parameters, 11, eps, 0.0, lambda: float(workspace.model(**batch).loss))
    assert step is not None and step.scalar_grad != 0
    changed = 0
    for (parameter, z), old in zip(perturbation(workspace.parameters, 11), before, strict=False):
        reach = old.abs() + 2 * eps * z.abs()
        ulp = torch.nextafter(reach, torch.tensor(math.inf)) - reach
        error = (parameter.detach() - old).abs()
        assert bool((error <= 1.5 * ulp).all())
        changed += int((error > 0).sum())
    assert changed > 0  # the bound is not vacuous: rounding does leave traces


def test_nan_loss_skips_the_step_and_records_nothing():
    federation = build_federation(tiny_config(strategy="fedkseed"))
    with torch.no_grad():
        dict(federation.workspace.parameters)["lm_head.weight"][0, 0] = math.nan  # injected fault
    client_id = "client-000"
    update = federation.clients[client_id].fit(
        federation.workspace, federation.server.instruction(1, client_id), federation.data.clients[client_id]
    )
    assert update.tensors[SEED_INDEX].numel() == 0 and update.tensors[SCALAR_GRAD].numel() == 0
    assert update.metrics["skipped_steps"] == federation.config.train.local_steps
    assert "train_loss" not in update.metrics
    federation.server.validate_update(update, 1)


@pytest.fixture(scope="module")
def federation():
    return build_federation(tiny_config(strategy="fedkseed", partition={"scheme": "iid", "num_clients": 2}))


@pytest.fixture(scope="module")
def good_update(federation):
    client_id = "client-000"
    return federation.clients[client_id].fit(
        federation.workspace, federation.server.instruction(1, client_id), federation.data.clients[client_id]
    )


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        ([4096], [1.0], "outside \\[0, 4096\\)"),
        ([-1], [1.0], "outside \\[0, 4096\\)"),
        ([5, 5], [1.0, 2.0], "'seed_index' repeats a seed index"),
        ([1, 2], [1.0], "'seed_index' has 2 entries but 'scalar_grad' has 1"),
        (list(range(4)), [1.0] * 4, "'seed_index' holds 4 pairs, more than train.local_steps=3"),
        ([1], [math.nan], "'scalar_grad' holds NaN"),
    ],
)
def test_malformed_upload_is_rejected_naming_the_field(federation, good_update, index, value, message):
    federation.server.validate_update(good_update, 1)
    tensors = {
        SEED_INDEX: torch.tensor(index, dtype=torch.int16), SCALAR_GRAD: torch.tensor(value, dtype=torch.float32)
    }
    with pytest.raises(InvalidUpdate, match=message):
        federation.server.validate_update(good_update.model_copy(update={"tensors": tensors}), 1)


def test_index_dtype_is_part_of_the_spec(federation, good_update):
    tensors = {**good_update.tensors, SEED_INDEX: good_update.tensors[SEED_INDEX].to(torch.int64)}
    with pytest.raises(InvalidUpdate, match="'seed_index' has dtype torch.int64"):
        federation.server.validate_update(good_update.model_copy(update={"tensors": tensors}), 1)


def test_pro_probabilities():
    generator = torch.Generator().manual_seed(0)
    amplitudes = torch.rand(4096, generator=generator, dtype=torch.float64) * 50
    levels = amplitude_levels(amplitudes)
    assert int(levels.min()) == 0 and int(levels.max()) == 255
    pi = seed_probabilities(levels)
    assert abs(float(pi.sum()) - 1) < 1e-9
    assert float(pi.max() / pi.min()) <= math.e * (1 + 1e-12)
    assert int(pi.argmax()) in torch.nonzero(levels == 255).flatten().tolist()
    exact = torch.softmax((amplitudes - amplitudes.min()) / (amplitudes.max() - amplitudes.min()), dim=0)
    assert float((pi / exact).log().abs().max()) <= 1 / 255 + 1e-12  # rounding: ±1/510 in each exponent and in the sum
    uniform = seed_probabilities(amplitude_levels(torch.full((4096,), 3.0, dtype=torch.float64)))
    torch.testing.assert_close(uniform, torch.full((4096,), 1 / 4096, dtype=torch.float64), rtol=1e-12, atol=0)


def test_pro_server_favours_seeds_with_large_gradients_and_clients_sample_from_pi():
    federation = build_federation(tiny_config(strategy="fedkseed", options={"pro": True, "seed_pool_size": 64}))
    server, workspace = federation.server, federation.workspace
    first = server.instruction(1, "client-000")
    assert first.tensors[SEED_LEVEL].tolist() == [0] * 64  # equal histories: uniform
    updates = [
        client.fit(workspace, server.instruction(1, cid), federation.data.clients[cid])
        for cid, client in federation.clients.items()
    ]
    server.aggregate(1, updates)
    levels = server.instruction(2, "client-000").tensors[SEED_LEVEL]
    pairs = [
        (abs(float(v)), int(i))
        for u in updates
        for i, v in zip(u.tensors[SEED_INDEX], u.tensors[SCALAR_GRAD], strict=False)
    ]
    strongest = max(pairs)[1]
    assert int(levels[strongest]) == 255
    assert all(level == 0 for index, level in enumerate(levels.tolist()) if index not in {i for _, i in pairs})
    client = federation.clients["client-000"]
    skewed = server.instruction(2, "client-000")
    drawn = client.draw_seeds(skewed, 2000, client.seed_generator(2))
    uniform_share = 2000 / 64
    assert drawn.count(strongest) > 1.3 * uniform_share  # level 255 weighs up to e times a level-0 seed
    broken = skewed.model_copy(update={"tensors": {**skewed.tensors, SEED_LEVEL: torch.ones(64)}})
    with pytest.raises(InvalidInstruction, match="seed_level"):
        client.draw_seeds(broken, 20, client.seed_generator(2))


def test_far_behind_client_gets_the_checkpoint_when_it_is_fewer_bytes():
    """A micro model (~2.3k parameters, ~10 KB) after ten 200-pair versions (~12 KB of log): the server
    sends the checkpoint to a new client and the log to one a version behind, each the smaller on the
    wire; both clients end exactly on the global model."""
    train = TrainConfig(local_steps=200, learning_rate=1e-3)
    config, ctx = FedKSeedConfig(), context(train)
    server_space = SeedWorkspace(llama_bundle(hidden=8, layers=1), config, ctx)
    server = FedKSeedServer(config, ctx)
    server.initialize(server_space)
    for version, delta in enumerate(synthetic_log(10, 200, 4096, seed=2), start=1):
        update = ClientUpdate(client_id="client-old", round=version, num_examples=1,
                              tensors={SEED_INDEX: delta.seed_index.to(torch.int16), SCALAR_GRAD: delta.value})
        server.validate_update(update, version)
        server.aggregate(version, [update])
    fresh, recent = server.instruction(11, "client-new"), server.instruction(11, "client-old")
    assert all(name.startswith(CHECKPOINT_PREFIX) for name in fresh.tensors)
    assert LOG_INDEX in recent.tensors and recent.settings["base_version"] == 9
    full_log = fresh.model_copy(update={"tensors": encode_log(server.history, 4096)})
    as_checkpoint = recent.model_copy(update={"tensors": fresh.tensors})
    assert wire_size(fresh) < wire_size(full_log) and wire_size(recent) < wire_size(as_checkpoint)
    assert abs(server_space.checkpoint_bytes() - wire_size(fresh)) < 0.02 * wire_size(fresh)

    server.load_global_into(server_space)
    for client_id, instruction in (("client-new", fresh), ("client-old", recent)):
        space = SeedWorkspace(llama_bundle(hidden=8, layers=1), config, ctx)
        if client_id == "client-old":
            space.catch_up(GENESIS, server.history[:9], versions_along(GENESIS, server.history[:9])[-1])
        FedKSeedClient(config, ctx, client_id).receive(space, instruction)
        assert space.digest() == server_space.digest() and space.version == server_space.version


def test_log_from_another_history_is_refused():
    workspace = SeedWorkspace(load_model(ModelConfig(), 0), FedKSeedConfig(), context())
    ours, theirs = synthetic_log(2, 3, 4096, seed=1), synthetic_log(2, 3, 4096, seed=2)
    workspace.catch_up(GENESIS, ours, versions_along(GENESIS, ours)[-1])
    their_chain = versions_along(GENESIS, theirs)
    with pytest.raises(InvalidInstruction, match="base_version"):
        workspace.catch_up(their_chain[1], theirs[1:], their_chain[-1])
    with pytest.raises(InvalidInstruction, match="target_digest"):
        workspace.catch_up(GENESIS, theirs, versions_along(GENESIS, ours)[-1])


def test_natural_instructions_task_file_reads_as_rows(tmp_path: Path):
    task = {"Definition": ["Answer with A or B."], "Instances": [
        {"id": "t-1", "input": "Premise. (A) x (B) y", "output": ["A", "a"]},
        {"id": "t-2", "input": "Other. (A) x (B) y", "output": ["B"]},
    ]}
    (tmp_path / "task1393_copa.json").write_text(json.dumps(task))
    rows = load_records(str(tmp_path))
    assert rows == [
        {"instruction": "Answer with A or B.", "context": "Premise. (A) x (B) y", "response": "A",
         "category": "task1393_copa"},
        {"instruction": "Answer with A or B.", "context": "Other. (A) x (B) y", "response": "B",
         "category": "task1393_copa"},
    ]
