"""Rouge-L F (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", §3.1) and a greedy
generation evaluation, FedKSeed's metric (arXiv:2312.06353: greedy decoding, Rouge-L F on held-out
tasks).

Sentence-level Rouge-L on lower-cased alphanumeric tokens, no stemming: with LCS the longest common
subsequence of prediction and reference, P = LCS/|prediction|, R = LCS/|reference| and
F = 2PR/(P+R) (β = 1, as `rouge-score`'s rougeL). An empty side scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.tasks.config import DataConfig
from fedtune.tasks.data import Record, prompt_text

TOKEN = re.compile(r"[a-z0-9]+")


class RougeScore(BaseModel):
    precision: float
    recall: float
    f: float


def rouge_tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """Longest common subsequence by dynamic programming over two rows, O(|first|·|second|)."""
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for column, other in enumerate(second):
            current.append(previous[column] + 1 if token == other else max(previous[column + 1], current[column]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> RougeScore:
    predicted, expected = rouge_tokens(prediction), rouge_tokens(reference)
    common = lcs_length(predicted, expected)
    if common == 0:
        return RougeScore(precision=0.0, recall=0.0, f=0.0)
    precision, recall = common / len(predicted), common / len(expected)
    return RougeScore(precision=precision, recall=recall, f=2 * precision * recall / (precision + recall))


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
) -> list[str]:
    """Greedy continuations (one beam), left-padded batches, prompts cut to their last tokens."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    responses: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [
                tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
                for prompt in prompts[start : start + batch_size]
            ]
            batch = tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return responses


def rouge_l_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Record],
    data: DataConfig,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> float:
    """Mean Rouge-L F of greedy generations for `rows`' prompts against their responses."""
    prompts = [prompt_text(row, data) for row in rows]
    predictions = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size)
    scores = [rouge_l(prediction, str(row[data.response_field])).f
              for prediction, row in zip(predictions, rows, strict=True)]
    return sum(scores) / len(scores)
