"""Evaluate a model on a token dataset: loss, accuracy and exact match."""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from fedtune.tasks.data import IGNORE_INDEX, TokenDataset, to_model_device


class EvalResult(BaseModel):
    """For causal LMs `accuracy` is next-token accuracy on response tokens (teacher forcing) and
    `exact_match` the share of examples whose every response token is the argmax, which is exactly
    when greedy decoding reproduces the reference. For classifiers both are label accuracy."""

    loss: float
    accuracy: float
    exact_match: float
    examples: int


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TokenDataset, batch_size: int) -> EvalResult:
    was_training = model.training
    model.eval()
    loss_sum, correct, counted, exact = 0.0, 0, 0, 0
    for cpu_batch in dataset.eval_batches(batch_size):
        batch = to_model_device(cpu_batch, model)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        if dataset.kind == "seq_cls":
            labels = batch["labels"]
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            hits = logits.argmax(-1) == labels
            correct += int(hits.sum())
            counted += labels.numel()
            exact += int(hits.sum())
        else:
            targets = batch["labels"][:, 1:]
            logits = logits[:, :-1]
            mask = targets != IGNORE_INDEX
            loss_sum += nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            ).item()
            hits = (logits.argmax(-1) == targets) & mask
            correct += int(hits.sum())
            counted += int(mask.sum())
            exact += int((hits | ~mask).all(dim=1).sum())
    model.train(was_training)
    return EvalResult(
        loss=loss_sum / max(counted, 1),
        accuracy=correct / max(counted, 1),
        exact_match=exact / len(dataset),
        examples=len(dataset),
    )
