"""Loaders and partitioners of the task layer."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fedtune.tasks.builtin import char_tokenizer, ops_examples
from fedtune.tasks.config import DataConfig, PartitionConfig
from fedtune.tasks.data import DataError, encode, load_records, partition

ROWS = [{"text": f"row {i}", "label": i % 2, "category": "abc"[i % 3]} for i in range(60)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv"])
def test_loaders_read_every_format(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        path.write_text(sep.join(ROWS[0]) + "\n" + "\n".join(sep.join(str(v) for v in r.values()) for r in ROWS))
    rows = load_records(str(path))
    assert len(rows) == 60 and str(rows[7]["label"]) == "1" and rows[7]["text"] == "row 7"


def test_directory_of_files_and_bad_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    assert len(load_records(str(tmp_path))) == 2
    (tmp_path / "c.json").write_text("{broken")
    with pytest.raises(DataError, match="c.json"):
        load_records(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "missing.tsv"))


def test_natural_partition_is_one_client_per_value():
    clients = partition(ROWS, PartitionConfig(scheme="natural", field="category"), seed=0)
    assert len(clients) == 3
    assert all(len({r["category"] for r in rows}) == 1 for rows in clients.values())


def test_iid_partition_covers_every_row_once():
    clients = partition(ROWS, PartitionConfig(scheme="iid", num_clients=7), seed=3)
    sizes = sorted(len(rows) for rows in clients.values())
    assert sum(sizes) == 60 and sizes[-1] - sizes[0] <= 1
    assert sorted(r["text"] for rows in clients.values() for r in rows) == sorted(r["text"] for r in ROWS)


def test_dirichlet_partition_is_seeded_and_skewed():
    config = PartitionConfig(scheme="dirichlet", num_clients=5, field="label", alpha=0.1, min_examples=1)
    first = partition(ROWS * 5, config, seed=1)
    assert first == partition(ROWS * 5, config, seed=1)
    assert sum(len(rows) for rows in first.values()) == 300
    shares = [Counter(r["label"] for r in rows)[1] / len(rows) for rows in first.values()]
    assert max(shares) - min(shares) > 0.5  # alpha=0.1 is strongly label-skewed
    mild = partition(ROWS * 5, config.model_copy(update={"alpha": 100.0}), seed=1)
    mild_shares = [Counter(r["label"] for r in rows)[1] / len(rows) for rows in mild.values()]
    assert max(mild_shares) - min(mild_shares) < max(shares) - min(shares)


def test_partition_errors_name_the_problem():
    with pytest.raises(DataError, match="partition.field"):
        partition(ROWS, PartitionConfig(scheme="natural", field="speaker"), seed=0)
    with pytest.raises(DataError, match="min_examples"):
        partition(ROWS, PartitionConfig(scheme="iid", num_clients=30, min_examples=5), seed=0)


def test_generation_encoding_masks_the_prompt():
    tokenizer = char_tokenizer()
    row = ops_examples(1, seed=0)[0]
    dataset = encode([row], tokenizer, DataConfig(), "causal_lm", max_length=64)
    example = dataset.examples[0]
    supervised = [t for t in example.labels if t != -100]
    assert tokenizer.decode(supervised[:-1]) == row["response"]
    assert supervised[-1] == tokenizer.eos_token_id
    with pytest.raises(DataError, match="label_field"):
        encode([{"sentence": "x", "label": "positive"}], tokenizer, DataConfig(), "seq_cls", 16)
