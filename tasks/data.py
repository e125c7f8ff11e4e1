"""Read examples from files, split them over clients, and turn them into token batches."""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedtune.tasks.builtin import BUILTIN_DATASETS
from fedtune.tasks.config import DataConfig, ModelKind, PartitionConfig

Record = dict[str, Any]
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
IGNORE_INDEX = -100
RESPONSE_PREFIX = "\n### Response:\n"


class DataError(ValueError):
    """A data file or field is unusable; the message names the file or field."""


def data_files(source: str) -> list[Path]:
    """The files a data source reads (none for a built-in generator), in the order `load_records` reads them."""
    if source in BUILTIN_DATASETS:
        return []
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(f"data: directory {str(path)!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} file")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"data: {str(path)!r} does not exist")


def load_records(source: str, seed: int = 0, limit: int | None = None) -> list[Record]:
    """Rows from a built-in generator, a file, or every supported file of a directory (sorted)."""
    if source in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[source](limit or 4000, seed)
    rows = [row for file in data_files(source) for row in _read_file(file)]
    return rows[:limit] if limit else rows


def require_fields(source: str, data: DataConfig, kind: ModelKind) -> None:
    """Check that every file of `source` has the fields the model kind reads, from its header or first row,
    so a missing column is reported by name before a model is loaded."""
    needed = [("text_field", data.text_field, "input text"), ("label_field", data.label_field, "integer labels")]
    if kind == "causal_lm":
        needed = [("response_field", data.response_field, "responses")]
    for file in data_files(source):
        fields = _first_fields(file)
        for setting, name, holding in needed:
            if fields is not None and name not in fields:
                raise DataError(f"data.{setting}: {file} has no column {name!r} (its columns: {', '.join(fields)}); "
                                f"set data.{setting} to the column holding the {holding}")


def _first_fields(path: Path) -> list[str] | None:
    """The column names of a csv/tsv header or of a jsonl/json file's first row; None for an empty file."""
    if path.suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle, delimiter="\t" if path.suffix == ".tsv" else ","), None)
        return header
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            line = next((line for line in handle if line.strip()), None)
        rows = [] if line is None else [_json_row(line, path)]
    else:
        rows = _read_file(path)
    return list(rows[0]) if rows and isinstance(rows[0], dict) else None


def _json_row(line: str, path: Path) -> Record:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"data: cannot parse {path}: {error}") from error


def _read_file(path: Path) -> list[Record]:
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        if path.suffix == ".json":
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict) and "Definition" in loaded and "Instances" in loaded:
                return _natural_instructions_rows(loaded, path)
            if not isinstance(loaded, list):
                raise DataError(f"data: {path} must hold a JSON list of objects (or a Natural Instructions task)")
            return loaded
        if path.suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as handle:
                if path.suffix == ".tsv":
                    return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
                return list(csv.DictReader(handle))
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"data: cannot parse {path}: {error}") from error
    raise DataError(f"data: {path} has an unsupported suffix; use one of {SUPPORTED_SUFFIXES}")


def _natural_instructions_rows(task: dict[str, Any], path: Path) -> list[Record]:
    """A Natural Instructions v2 task file as rows: instruction = Definition, context = input,
    response = the first reference output, category = the file's stem (one task per client)."""
    definition = task["Definition"]
    instruction = " ".join(definition) if isinstance(definition, list) else str(definition)
    rows = []
    for index, instance in enumerate(task["Instances"]):
        outputs = instance.get("output") if isinstance(instance, dict) else None
        if not outputs or "input" not in instance:
            raise DataError(f"data: {path} instance {index} has no input or no output")
        response = outputs[0] if isinstance(outputs, list) else outputs
        rows.append({"instruction": instruction, "context": instance["input"], "response": str(response),
                     "category": path.stem})
    return rows


def split_holdout(rows: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded train/eval split for sources without their own evaluation file."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(rows) * fraction))
    return [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]


def partition(rows: Sequence[Record], config: PartitionConfig, seed: int) -> dict[str, list[Record]]:
    """Split rows over clients; client ids are `client-000`, `client-001`, ... in a stable order."""
    if config.scheme == "iid":
        order = np.random.default_rng(seed).permutation(len(rows))
        shards = np.array_split(order, config.num_clients)
    elif config.scheme == "natural":
        by_value = _group_by(rows, config.field)
        shards = [np.array(by_value[value]) for value in sorted(by_value, key=str)]
    else:
        shards = _dirichlet_shards(rows, config, seed)
    clients = {f"client-{i:03d}": [rows[j] for j in shard] for i, shard in enumerate(shards)}
    small = [cid for cid, part in clients.items() if len(part) < config.min_examples]
    if small:
        raise DataError(
            f"partition: {len(small)} client(s) got fewer than min_examples={config.min_examples} "
            f"rows ({len(rows)} rows over {len(clients)} clients)"
        )
    return clients


def _group_by(rows: Sequence[Record], field: str) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if field not in row:
            raise DataError(f"partition.field: row {index} has no field {field!r}")
        groups[row[field]].append(index)
    return groups


def _dirichlet_shards(rows: Sequence[Record], config: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Label/category-Dirichlet split: each value's rows are cut by proportions ~ Dir(alpha)."""
    rng = np.random.default_rng(seed)
    groups = _group_by(rows, config.field)
    for _attempt in range(100):
        shards: list[list[int]] = [[] for _ in range(config.num_clients)]
        for value in sorted(groups, key=str):
            indices = rng.permutation(groups[value])
            shares = rng.dirichlet(np.full(config.num_clients, config.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for client, piece in enumerate(np.split(indices, cuts)):
                shards[client].extend(piece.tolist())
        if min(len(shard) for shard in shards) >= config.min_examples:
            return [np.array(sorted(shard), dtype=int) for shard in shards]
    raise DataError(
        f"partition: no Dirichlet(alpha={config.alpha}) split gave every one of {config.num_clients} "
        f"clients min_examples={config.min_examples} rows in 100 tries"
    )


@dataclass(frozen=True)
class EncodedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...] | int


class TokenDataset:
    """Tokenised examples of one client (or the evaluation set) with seeded batching."""

    def __init__(self, examples: list[EncodedExample], kind: ModelKind, pad_token_id: int):
        if not examples:
            raise DataError("data: a dataset with no usable example")
        self.examples = examples
        self.kind = kind
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, items: Sequence[EncodedExample]) -> dict[str, torch.Tensor]:
        width = max(len(item.input_ids) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
            attention[row, : len(item.input_ids)] = 1
        if self.kind == "seq_cls":
            labels = torch.tensor([item.labels for item in items], dtype=torch.long)
        else:
            labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
            for row, item in enumerate(items):
                assert isinstance(item.labels, tuple), "a causal_lm example's labels are token ids"
                labels[row, : len(item.labels)] = torch.tensor(item.labels)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def train_batches(
        self, steps: int, batch_size: int, generator: torch.Generator
    ) -> Iterator[dict[str, torch.Tensor]]:
        """`steps` batches drawn from seeded shuffled passes over the data."""
        order: list[int] = []
        for _ in range(steps):
            while len(order) < batch_size:
                order.extend(torch.randperm(len(self.examples), generator=generator).tolist())
            chosen, order = order[:batch_size], order[batch_size:]
            yield self.collate([self.examples[i] for i in chosen])

    def epoch_batches(
        self, epochs: int, batch_size: int, generator: torch.Generator
    ) -> Iterator[dict[str, torch.Tensor]]:
        """`epochs` passes, each one seeded permutation cut into consecutive batches, the last partial one kept.

        Each pass draws its permutation from `generator` as `train_batches` does, so when `batch_size`
        divides the data size, E epochs are exactly the batches of E·n/batch_size steps.
        """
        for _ in range(epochs):
            order = torch.randperm(len(self.examples), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                yield self.collate([self.examples[i] for i in order[start : start + batch_size]])

    def held_out(self, fraction: float, generator: torch.Generator) -> tuple[TokenDataset, TokenDataset | None]:
        """(training part, evaluation part): a seeded `fraction` of the examples (at least one) kept out of
        training for federated evaluation; None when there are too few examples to spare one."""
        if len(self.examples) < 2:
            return self, None
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        size = max(1, int(len(order) * fraction))
        evaluated, trained = sorted(order[:size]), sorted(order[size:])
        return (TokenDataset([self.examples[i] for i in trained], self.kind, self.pad_token_id),
                TokenDataset([self.examples[i] for i in evaluated], self.kind, self.pad_token_id))

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.examples), batch_size):
            yield self.collate(self.examples[start : start + batch_size])


def to_model_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`batch` (built on the CPU) on the device of `model`'s parameters (`model.device`); a no-op on the CPU."""
    device = next(model.parameters()).device
    return {name: tensor.to(device) for name, tensor in batch.items()}


def encode(
    rows: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    data: DataConfig,
    kind: ModelKind,
    max_length: int,
) -> TokenDataset:
    """Tokenise rows for the model kind: prompt+response with masked prompt, or text+label."""
    examples = [
        _encode_classification(row, index, tokenizer, data, max_length)
        if kind == "seq_cls"
        else _encode_generation(row, index, tokenizer, data, max_length)
        for index, row in enumerate(rows)
    ]
    return TokenDataset(examples, kind, int(tokenizer.pad_token_id))


def _field(row: Record, name: str, index: int) -> Any:
    if name not in row:
        raise DataError(f"data: row {index} has no field {name!r} (fields: {sorted(row)})")
    return row[name]


def _encode_classification(row, index, tokenizer, data: DataConfig, max_length) -> EncodedExample:
    text = str(_field(row, data.text_field, index))
    value = _field(row, data.label_field, index)
    try:
        label = int(value)
    except (TypeError, ValueError) as error:
        raise DataError(f"data.label_field: row {index} label {value!r} is not an integer") from error
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return EncodedExample(tuple(ids), label)


def prompt_text(row: Record, data: DataConfig) -> str:
    """The prompt a causal LM sees: the non-empty prompt fields, then the response marker."""
    parts = [str(row[name]) for name in data.prompt_fields if row.get(name)]
    return "\n".join(parts) + RESPONSE_PREFIX


def _encode_generation(row, index, tokenizer, data: DataConfig, max_length) -> EncodedExample:
    response = str(_field(row, data.response_field, index))
    prompt_ids = tokenizer(prompt_text(row, data), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][: max_length // 2]
    response_ids = response_ids + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[-(max_length - len(response_ids)) :]
    ids = tuple(prompt_ids + response_ids)
    return EncodedExample(ids, tuple([IGNORE_INDEX] * len(prompt_ids) + response_ids))


@dataclass
class FederatedData:
    """Per-client training sets and the server's evaluation set."""

    clients: dict[str, TokenDataset]
    eval: TokenDataset


def prepare_federated_data(
    data: DataConfig,
    partition_config: PartitionConfig,
    tokenizer: PreTrainedTokenizerBase,
    kind: ModelKind,
    max_length: int,
    seed: int,
) -> FederatedData:
    """Load, hold out (or read) the evaluation set, partition and tokenise."""
    rows = load_records(data.train, seed, data.max_train_examples)
    if data.eval:
        train_rows, eval_rows = rows, load_records(data.eval, seed + 1)
    else:
        train_rows, eval_rows = split_holdout(rows, data.eval_fraction, seed)
    eval_rows = eval_rows[: data.max_eval_examples]
    parts = partition(train_rows, partition_config, seed)
    return FederatedData(
        clients={cid: encode(part, tokenizer, data, kind, max_length) for cid, part in parts.items()},
        eval=encode(eval_rows, tokenizer, data, kind, max_length),
    )
