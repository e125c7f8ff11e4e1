"""Load a base model and tokenizer from a local path (as a user with real weights would) or build a tiny one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.tasks.builtin import BUILTIN_MODELS, char_tokenizer, tiny_model
from fedtune.tasks.config import ModelConfig


@dataclass
class ModelBundle:
    """A frozen base model with its tokenizer; strategies wrap `model` with their adapters."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: ModelConfig


class ModelLoadError(ValueError):
    """The configured model could not be loaded; the message names the path and the reason."""


def load_model(config: ModelConfig, seed: int = 0) -> ModelBundle:
    """Load the base model in float32 with every parameter frozen."""
    if config.path in BUILTIN_MODELS:
        if BUILTIN_MODELS[config.path] != config.kind:
            raise ModelLoadError(f"model.kind: {config.path} is a {BUILTIN_MODELS[config.path]} model")
        tokenizer: PreTrainedTokenizerBase = char_tokenizer()
        model = tiny_model(config.path, len(tokenizer), config.num_labels, seed)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a head missing from the checkpoint is drawn reproducibly
            model, tokenizer = _load_local(config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    model.eval()
    return ModelBundle(model=model, tokenizer=tokenizer, config=config)


def _load_local(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(config.path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model.path: {str(path)!r} is not a directory with model weights")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        if config.kind == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", **extra)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=config.num_labels, dtype="float32", **extra
            )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model.path: could not load {str(path)!r}: {error}") from error
    return model, tokenizer
