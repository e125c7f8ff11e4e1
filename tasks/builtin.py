"""The embedded default: a generated task, a character tokenizer and tiny models built from configs.

Nothing here downloads anything. The `ops` task has one operation family per category (reverse,
sort, add, repeat), so a natural split by category is non-IID: each client sees one family.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

OPS_FAMILIES = ("reverse", "sort", "add", "repeat")
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
BUILTIN_MODELS = {"builtin:tiny-llama": "causal_lm", "builtin:tiny-bert": "seq_cls"}


def _ops_example(family: str, rng: random.Random) -> dict[str, str]:
    word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
    if family == "reverse":
        instruction, response = f"reverse {word}", word[::-1]
    elif family == "sort":
        instruction, response = f"sort {word}", "".join(sorted(word))
    elif family == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        instruction, response = f"add {a}+{b}", str(a + b)
    else:
        instruction, response = f"repeat {word}", word + word
    return {"instruction": instruction, "context": "", "response": response, "category": family}


def ops_examples(count: int, seed: int) -> list[dict[str, str]]:
    """Deterministic examples of the four operation families, interleaved."""
    rng = random.Random(seed)
    return [_ops_example(OPS_FAMILIES[i % len(OPS_FAMILIES)], rng) for i in range(count)]


def majority_examples(count: int, seed: int) -> list[dict[str, str | int]]:
    """A tiny classification task: label 1 when a string of a/b holds more a's than b's."""
    rng = random.Random(seed)
    rows: list[dict[str, str | int]] = []
    for _ in range(count):
        length = rng.choice((5, 7, 9))
        text = "".join(rng.choice("ab") for _ in range(length))
        rows.append({"sentence": text, "label": int(text.count("a") > text.count("b"))})
    return rows


BUILTIN_DATASETS: dict[str, Callable[[int, int], list[dict[str, Any]]]] = {
    "builtin:ops": ops_examples, "builtin:majority": majority_examples,
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII; it saves and reloads like any HF tokenizer."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model(name: str, vocab_size: int, num_labels: int, seed: int) -> PreTrainedModel:
    """A randomly initialised tiny model, identical for the same seed on any CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "builtin:tiny-llama":
            llama = LlamaConfig(
                vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False,
            )
            return LlamaForCausalLM(llama)
        if name == "builtin:tiny-bert":
            bert = BertConfig(
                vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, pad_token_id=0,
            )
            bert.num_labels = num_labels
            return BertForSequenceClassification(bert)
    raise ValueError(f"model.path: unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
