"""Pydantic models for the task half of a run's configuration (model, data, partition, training)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class StrictModel(BaseModel):
    """A config model that rejects unknown fields, so a misspelt key is an error that names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ModelKind = Literal["causal_lm", "seq_cls"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""A Hugging Face hub id as `model.path` may name one: `name` or `org/name`."""
PACKAGE_PREFIX = "package:"


class ModelConfig(StrictModel):
    """Which base model to fine-tune, named as Hugging Face users name it, and how it runs on this machine."""

    path: str = Field("builtin:tiny-llama", description=(
        "A local model directory (relative to the config file), a .gguf file, a hub id such as "
        "'org/name' taken from the local Hugging Face cache (never downloaded), 'package:NAME/FOLDER' "
        "(a folder inside an installed Python package), or 'builtin:tiny-llama' / 'builtin:tiny-bert'."))
    kind: ModelKind = Field("causal_lm", description="causal_lm (generation) or seq_cls (classification).")
    num_labels: int = Field(2, ge=2, description="Number of classes for seq_cls models.")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path`, for GGUF checkpoints.")
    max_length: int = Field(64, ge=8, le=4096, description="Token budget per example (truncation).")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="Where the model trains and evaluates; auto: cuda when torch sees a GPU, else cpu.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="The frozen base weights' dtype (LoRA adapters stay fp32, as peft keeps them; a "
                            "seq_cls head keeps this dtype).")

    def require_cpu(self, who: str) -> None:
        """Refuse another device for local work whose own tensors and generators live on the CPU."""
        if self.device != "cpu":
            raise ValueError(f"model.device: {who} runs on the CPU only (its own tensors and random generators "
                             f"live there); got {self.device!r}, set model.device = 'cpu'")


class DataConfig(StrictModel):
    """Where examples come from and which fields hold the text."""

    train: str = Field("builtin:ops", description="Training file (jsonl/json/csv/tsv) or 'builtin:ops'.")
    eval: str | None = Field(None, description="Evaluation file; default: a held-out slice of `train`.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out share when `eval` is not given.")
    max_eval_examples: int = Field(512, ge=1, description="Cap on evaluation examples per evaluation.")
    max_train_examples: int | None = Field(None, ge=1, description="Cap on training examples read.")
    text_field: str = Field("sentence", description="seq_cls: the input text field.")
    label_field: str = Field("label", description="seq_cls: the integer label field.")
    prompt_fields: tuple[str, ...] = Field(
        ("instruction", "context"), description="causal_lm: fields joined into the prompt."
    )
    response_field: str = Field("response", description="causal_lm: the target field.")


class PartitionConfig(StrictModel):
    """How training examples are split over virtual clients."""

    scheme: Literal["natural", "iid", "dirichlet"] = "natural"
    num_clients: int = Field(4, ge=1, description="Clients for iid/dirichlet; natural uses one per field value.")
    field: str = Field("category", description="Field that natural/dirichlet split on (label or category).")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; smaller is more skewed.")
    min_examples: int = Field(1, ge=1, description="Every client gets at least this many examples.")


DEFAULT_LOCAL_STEPS = 20


class TrainConfig(StrictModel):
    """Local training hyperparameters shared by the gradient-based strategies.

    Local work per round is stated as steps or as epochs over the client's own data (exactly one; steps
    = 20 when neither is given), optionally cut short by a wall-clock budget on the device.
    """

    local_steps: int | None = Field(
        None, ge=1, description=f"Optimizer steps per client per round ({DEFAULT_LOCAL_STEPS} without local_epochs)."
    )
    local_epochs: int | None = Field(
        None, ge=1, description="Passes over the client's own data per round (the last partial batch kept)."
    )
    max_local_seconds: float | None = Field(
        None, gt=0, description="Wall-clock budget per round on the device; at least one step always runs."
    )
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(5e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    eval_batch_size: int = Field(64, ge=1)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning rate over the whole run (rounds × the round's planned optimizer steps), "
                                "as transformers' schedules of the same names; it continues across rounds.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up from 0 at the run's start.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up as a share of the run's optimizer steps "
                                                             "(instead of warmup_steps).")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Batches per optimizer step (their mean loss); local_steps counts optimizer steps.")
    max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the gradient's global L2 norm to this before each optimizer step; "
                                "unset: no clipping.")

    @model_validator(mode="before")
    @classmethod
    def _one_unit_of_work(cls, data: Any) -> Any:
        """Steps or epochs, never both; neither means today's default steps, so old configs keep their meaning."""
        if not isinstance(data, dict):
            return data
        steps, epochs = data.get("local_steps"), data.get("local_epochs")
        if steps is not None and epochs is not None:
            raise ValueError("local_steps and local_epochs are both set; set only one of them")
        if steps is None and epochs is None:
            return {**data, "local_steps": DEFAULT_LOCAL_STEPS}
        return data

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("warmup_steps and warmup_ratio are both set; set only one of them")
        return self


def resolve_path(value: str, base_dir: Path | None) -> str:
    """Resolve a relative file path against the config file's folder; leave builtin: names alone."""
    if value.startswith("builtin:") or base_dir is None:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def resolve_model_path(value: str, base_dir: Path | None) -> str:
    """`model.path` as transformers reads a name: a path relative to the config file when one exists there,
    else a hub id (org/name) left as written, else a path resolved like any other (so an error shows it)."""
    if value.startswith(PACKAGE_PREFIX):
        return value
    resolved = resolve_path(value, base_dir)
    return value if HUB_ID.fullmatch(value) and not Path(resolved).exists() else resolved


class EvaluationConfig(StrictModel):
    """Where the global model is evaluated: on the server's data (central) and/or on the clients' own
    held-out data (federated: each client evaluates the global model it receives, before training)."""

    central: bool = Field(True, description="The server evaluates on data.eval or a held-out slice of data.train; "
                                            "false: the server needs no data at all.")
    federated: bool = Field(False, description="Clients evaluate the global model on their held-out examples; "
                                               "metrics.jsonl gets fed_eval_* (example-weighted).")
    client_fraction: float = Field(0.1, gt=0, lt=1, description="Share of each client's examples held out for "
                                                                "federated evaluation (fedclient: unless --eval-data).")


class TaskConfig(StrictModel):
    """The task every side builds alike (server, devices, fedsim): model, data fields, local training, evaluation.

    How fedsim partitions data over virtual clients (`PartitionConfig`) is not part of it: a device brings its own.
    """

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _builtin_pairs(self) -> TaskConfig:
        if self.model.path.startswith("builtin:") and self.model.kind != "causal_lm":
            raise ValueError("model.kind: the built-in tiny model is a causal_lm")
        return self


def format_validation_error(error: ValidationError) -> str:
    """One line per bad field, `  section.field: message`, for config error reports."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {location}: {message}" if location else f"  {message}")
    return "\n".join(lines)
