"""Pydantic models for the task half of a run's configuration (model, data, partition, training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class StrictModel(BaseModel):
    """A config model that rejects unknown fields, so a misspelt key is an error that names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ModelKind = Literal["causal_lm", "seq_cls"]


class ModelConfig(StrictModel):
    """Which base model to fine-tune: a local directory with transformers weights, or the built-in tiny model."""

    path: str = Field("builtin:tiny-llama", description="Local model directory, or 'builtin:tiny-llama'.")
    kind: ModelKind = Field("causal_lm", description="causal_lm (generation) or seq_cls (classification).")
    num_labels: int = Field(2, ge=2, description="Number of classes for seq_cls models.")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path`, for GGUF checkpoints.")
    max_length: int = Field(64, ge=8, le=4096, description="Token budget per example (truncation).")


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


def resolve_path(value: str, base_dir: Path | None) -> str:
    """Resolve a relative file path against the config file's folder; leave builtin: names alone."""
    if value.startswith("builtin:") or base_dir is None:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


class TaskConfig(StrictModel):
    """The task every side builds alike (server, devices, fedsim): model, data fields and local training.

    How fedsim partitions data over virtual clients (`PartitionConfig`) is not part of it: a device brings its own.
    """

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

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
