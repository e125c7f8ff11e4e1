"""Rouge-L, the metric the FedKSeed benchmark reports (benchmarks/rouge.py; not part of the package)."""

from __future__ import annotations

import pytest
from rouge import lcs_length, rouge_l, rouge_l_eval

from fedtune.tasks.builtin import ops_examples
from fedtune.tasks.config import DataConfig, ModelConfig
from fedtune.tasks.models import load_model


def test_lcs_and_rouge_l_against_hand_computed_values():
    assert lcs_length("a b c d e".split(), "a c e".split()) == 3
    assert lcs_length("a b c b d a b".split(), "b d c a b a".split()) == 4  # CLRS 15.4
    # prediction "the cat sat on mat", reference "the cat is on the mat": LCS "the cat on mat" = 4
    score = rouge_l("The cat sat on mat", "the cat is on the mat.")
    assert score.precision == pytest.approx(4 / 5) and score.recall == pytest.approx(4 / 6)
    assert score.f == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))
    assert rouge_l("Paris", "paris").f == 1.0
    assert rouge_l("", "anything").f == 0.0 and rouge_l("x y", "z").f == 0.0


def test_rouge_l_eval_generates_and_scores():
    bundle = load_model(ModelConfig(), 0)
    rows = ops_examples(4, seed=0)
    score = rouge_l_eval(bundle.model, bundle.tokenizer, rows, DataConfig(), max_new_tokens=4, batch_size=2)
    assert 0.0 <= score <= 1.0
    assert bundle.tokenizer.padding_side == "right"
