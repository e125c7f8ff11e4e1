"""FedKSeed's seed history: the versions of the global model, each aggregation's ΔG, and the catch-up
log that carries them to clients (Qin et al., ICML 2024, arXiv:2312.06353; docs/algorithms.md §3.4-3.5).

- Version v of the global model is w_v = w_{v−1} − η Σ_j ΔG_v[j] z(s_j), seeds in ascending index
  order (`RoundDelta` holds one ΔG_v). Every party applying the same versions to the same bits gets
  the same bits; by linearity (constant η, weight decay 0: anything else is rejected) w_v is the
  p-weighted average of the clients' end-of-round models up to float rounding.
- Each version carries a digest chained over its predecessor's digest and its ΔG, so a model that
  holds another history is detected, never silently extended. Version 0 (`GENESIS`) is w_0, the
  pretrained model every party has.
- The catch-up log is each version's ΔG since a client's last accepted update, as three tensors:
  the pairs per version (`LOG_SIZES`, int32), the seed indices (`LOG_INDEX`, int16 when K ≤ 32768,
  else int32) and the scalars (`LOG_VALUE`, float32); `RoundDelta.payload_bytes` and `LOG_FRAMING`
  count its bytes on the wire, so a server can weigh it against sending the model itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedtune.strategies.api import InvalidInstruction, TensorMap, TensorSpec

LOG_SIZES = "log_sizes"
LOG_INDEX = "log_seed_index"
LOG_VALUE = "log_value"
TENSOR_FRAMING = 32  # about: a tensor's protobuf framing besides its name (tags, lengths, dtype, shape)
LOG_FRAMING = len(LOG_SIZES + LOG_INDEX + LOG_VALUE) + 3 * TENSOR_FRAMING
GENESIS_DIGEST = "0" * 16


def index_dtype(pool_size: int) -> torch.dtype:
    """The dtype of seed indices on the wire: the narrowest that holds every index of the pool."""
    return torch.int16 if pool_size <= 2**15 else torch.int32


@dataclass(frozen=True)
class Version:
    """Which global model a copy holds: the number of aggregations applied and their chained digest."""

    number: int
    digest: str


GENESIS = Version(0, GENESIS_DIGEST)


@dataclass(frozen=True)
class RoundDelta:
    """One aggregation's ΔG: ascending unique seed indices (int64) and their float32 scalars."""

    seed_index: torch.Tensor
    value: torch.Tensor

    def next_version(self, previous: Version) -> Version:
        hasher = hashlib.sha256(previous.digest.encode())
        hasher.update(self.seed_index.to(torch.int64).numpy().tobytes())
        hasher.update(self.value.to(torch.float32).numpy().tobytes())
        return Version(previous.number + 1, hasher.hexdigest()[:16])

    def payload_bytes(self, index_bytes: int) -> int:
        """Its share of an encoded log: index + float32 per pair, and its int32 entry in the sizes."""
        return self.seed_index.numel() * (index_bytes + 4) + 4


def versions_along(base: Version, log: Sequence[RoundDelta]) -> list[Version]:
    """base, then the version after each delta of the log."""
    chain = [base]
    for delta in log:
        chain.append(delta.next_version(chain[-1]))
    return chain


def encode_log(log: Sequence[RoundDelta], pool_size: int) -> TensorMap:
    dtype = index_dtype(pool_size)
    return {
        LOG_SIZES: torch.tensor([delta.seed_index.numel() for delta in log], dtype=torch.int32),
        LOG_INDEX: torch.cat([delta.seed_index for delta in log]).to(dtype) if log else torch.zeros(0, dtype=dtype),
        LOG_VALUE: torch.cat([delta.value for delta in log]) if log else torch.zeros(0, dtype=torch.float32),
    }


def decode_log(tensors: TensorMap, pool_size: int) -> list[RoundDelta]:
    """The instruction's catch-up log, checked: names, dtypes, sizes and index range."""
    specs = {
        LOG_SIZES: TensorSpec(shape=(None,), dtype=torch.int32),
        LOG_INDEX: TensorSpec(shape=(None,), dtype=index_dtype(pool_size)),
        LOG_VALUE: TensorSpec(shape=(None,), dtype=torch.float32),
    }
    for name, spec in specs.items():
        tensor = tensors.get(name)
        if tensor is None or tensor.dtype != spec.dtype or tensor.dim() != 1:
            raise InvalidInstruction(f"tensor {name!r}: expected a 1-D {spec.dtype} tensor")
    sizes, index, value = tensors[LOG_SIZES], tensors[LOG_INDEX].to(torch.int64), tensors[LOG_VALUE]
    if (sizes < 0).any() or int(sizes.sum()) != index.numel() or index.numel() != value.numel():
        raise InvalidInstruction(f"tensor {LOG_SIZES!r}: sizes do not match {LOG_INDEX!r} and {LOG_VALUE!r}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= pool_size):
        raise InvalidInstruction(f"tensor {LOG_INDEX!r}: an index is outside [0, {pool_size})")
    if not bool(torch.isfinite(value).all()):
        raise InvalidInstruction(f"tensor {LOG_VALUE!r} holds NaN or Inf")
    pieces = zip(index.split(sizes.tolist()), value.split(sizes.tolist()), strict=False)
    return [RoundDelta(seed_index=i, value=v) for i, v in pieces]
