"""A data file without a column the task reads is an error naming the column, before any model loads (issue 15)."""

from __future__ import annotations

import pytest

from fedtune.fedclient.connection import FatalError
from fedtune.protos.runspec import RunSpec
from fedtune.simulations.runner import run_simulation
from fedtune.tasks.builtin import char_tokenizer
from fedtune.tasks.config import DataConfig
from fedtune.tasks.data import DataError, encode
from tests.helpers import tiny_config, unconnected_client

SEQ_CLS = {"path": "fedtune-test/never-loaded", "kind": "seq_cls"}  # a hub id the tests never load


def test_fedsim_names_a_missing_label_column_before_loading_the_model(tmp_path, monkeypatch):
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tidx\nit was great\t0\n")
    monkeypatch.setattr("fedtune.simulations.runner.load_model", lambda *args: pytest.fail("the model was loaded"))
    config = tiny_config(model=SEQ_CLS, data={"train": str(data)})
    with pytest.raises(DataError, match=r"data.label_field: .*train.tsv has no column 'label' \(its columns: sentence"):
        run_simulation(config, tmp_path / "run", show_progress=False)


def test_fedsim_checks_the_eval_file_and_causal_lm_responses_too(tmp_path, monkeypatch):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text('{"instruction": "sort ab", "response": "ab"}\n')
    evaluation.write_text('{"instruction": "sort ba", "answer": "ab"}\n')
    monkeypatch.setattr("fedtune.simulations.runner.load_model", lambda *args: pytest.fail("the model was loaded"))
    config = tiny_config(data={"train": str(train), "eval": str(evaluation)})
    with pytest.raises(DataError, match=r"data.response_field: .*eval.jsonl has no column 'response'"):
        run_simulation(config, tmp_path / "run", show_progress=False)


def test_fedclient_names_a_missing_label_column_before_loading_the_model(tmp_path, monkeypatch):
    data = tmp_path / "mine.csv"
    data.write_text("sentence,idx\nit was great,0\n")
    monkeypatch.setattr("fedtune.fedclient.client.load_model", lambda *args: pytest.fail("the model was loaded"))
    spec = RunSpec.of(tiny_config(model=SEQ_CLS))
    with pytest.raises(FatalError, match=r"data.label_field: .*mine.csv has no column 'label' \(its columns: sentence"):
        unconnected_client(tmp_path, data)._build(spec)


def test_a_row_without_its_label_is_named_as_missing_not_as_a_bad_integer():
    rows = [{"sentence": "good", "label": "1"}, {"sentence": "bad"}]
    with pytest.raises(DataError, match=r"row 1 has no field 'label'"):
        encode(rows, char_tokenizer(), DataConfig(), "seq_cls", 32)
    with pytest.raises(DataError, match=r"data.label_field: row 0 label 'positive' is not an integer"):
        encode([{"sentence": "good", "label": "positive"}], char_tokenizer(), DataConfig(), "seq_cls", 32)
