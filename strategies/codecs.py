"""Update codecs: pure encode/decode of one float tensor to and from a self-describing uint8 blob.

Codecs (NVFlare's fp16/8-bit/4-bit filters; top-k with error feedback, Stich et al. 2018,
arXiv:1809.07599; ternary sign x scale after top-k, ComPEFT, arXiv:2311.13171, docs/algorithms.md §5.4):

- `fp16`, `bf16`: the values cast to 16 bits.
- `int8`, `int4`: symmetric absmax quantisation per block of `block_size` elements (0 = one block
  for the whole tensor): scale = max|x| / q_max with q_max = 127 or 7, q = round(x / scale), or
  floor(x / scale + u) with u ~ U[0, 1) when rounding stochastically (unbiased). int4 packs two
  values per byte.
- `topk`: the k = ceil(density * numel) largest |x| (ties: lower index first), values as fp16.
- `topk_ternary`: the same positions, every kept value replaced by sign(x) * scale with one scale per
  tensor: alpha * std(x) (ComPEFT, std of the uncompressed tensor) or, with alpha = "mean", the mean
  |x| of the kept entries (STC, Sattler et al. 2019, arXiv:1903.02891).
Top-k never keeps more entries than the tensor has non-zeros, so a kept entry is never 0.

Each codec is one `Codec` object in `CODECS` (name -> codec): its wire id, encoder, decoder, exact
size, header-param check and range check travel together, and everything else (the header, the
`[compression]` negotiation, `SUPPORTED_CODECS`, `CodecName`) reads that table, so a new codec is
one class and one entry there.

Blob layout (all integers and floats little-endian):

    offset  size      field
    0       1         format version (1)
    1       1         codec id (`Codec.wire_id`)
    2       1         dtype id of the original tensor (DTYPE_IDS)
    3       1         ndim (<= 8)
    4       4         CRC-32 (zlib) of every byte after this field
    8       4*ndim    shape, uint32 each
    8+4*ndim 4        param, uint32: block size (int8/int4, 0 = per tensor), k (top-k), 0 otherwise
    12+4*ndim ...     body, laid out as its codec's class documents

So a 2-D tensor costs a 20-byte header plus its body; `encoded_size` states it exactly.

Decoding checks the version, codec and dtype ids, the CRC and every length, and that positions,
scales and values are valid; anything else raises `CodecError` naming the tensor.
"""

from __future__ import annotations

import math
import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

DTYPE_IDS: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
DTYPES = {code: dtype for dtype, code in DTYPE_IDS.items()}
FORMAT_VERSION = 1
MAX_NDIM = 8
_FIXED_HEADER = struct.Struct("<BBBBI")


class CodecError(ValueError):
    """A tensor that cannot be encoded, or a blob that does not decode; the message names the tensor."""


class CodecParams(BaseModel):
    """The knobs of the lossy codecs; each codec reads the ones it uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    block_size: int = Field(64, ge=0, lt=2**32, description="int8/int4 elements per scale; 0 = one per tensor.")
    stochastic_rounding: bool = Field(False, description="int8/int4: unbiased stochastic rounding.")
    density: float = Field(0.01, gt=0, le=1, description="topk/topk_ternary: share of entries kept.")
    ternary_alpha: float | Literal["mean"] = Field(
        "mean", description="topk_ternary scale: alpha * std(x) (ComPEFT) or the kept entries' mean |x| (STC)."
    )
    dense_below: int = Field(
        0, ge=0, description="Tensors with fewer values than this go as fp16 instead: a classifier head or a "
        "bias is a few hundred values that top-k would starve (Deep Gradient Compression leaves them dense too).",
    )


def header_size(ndim: int) -> int:
    """Blob bytes before the body: the fixed 8, the shape and the param."""
    return _FIXED_HEADER.size + 4 * ndim + 4


class Codec(ABC):
    """One codec: its name and wire id, how it encodes and decodes a body, and what it accepts.

    Encoders get the tensor flattened to finite float32 on the CPU; decoders get a body whose
    length `body_size` already confirmed, and return float32 values (the caller checks they are
    finite and restores dtype and shape).
    """

    name: ClassVar[str]
    wire_id: ClassVar[int]
    downlink: ClassVar[bool] = False
    """Fit for the global tensors a server sends: no error feedback corrects the downlink, so only
    codecs that keep every value at 8 bits or more qualify."""

    @abstractmethod
    def encode(self, flat: torch.Tensor, params: CodecParams, name: str,
               generator: torch.Generator | None) -> tuple[int, bytes]:
        """(header param, body) for a 1-D float32 tensor; `generator` drives stochastic rounding."""

    @abstractmethod
    def decode(self, body: np.ndarray, numel: int, param: int, name: str) -> torch.Tensor:
        """The 1-D float32 values of a body; CodecError naming the tensor if they are invalid."""

    @abstractmethod
    def body_size(self, numel: int, param: int) -> int:
        """Exact body bytes, from the header fields alone."""

    def param_is_valid(self, numel: int, param: int) -> bool:
        """Whether an encoder of this codec can have written `param` for `numel` elements."""
        return param == 0

    def within_range(self, tensor: torch.Tensor) -> str:
        """The codec to encode `tensor` with: this one, or a wider one where its values do not fit."""
        return self.name

    def encoded_size(self, shape: Sequence[int], param: int) -> int:
        """Exact blob bytes: header (12 + 4 * ndim) plus body."""
        return header_size(len(shape)) + self.body_size(math.prod(shape), param)


# --- 16-bit floats -------------------------------------------------------------------------------

class HalfFloat(Codec):
    """The values cast to a 16-bit float; body: n x 2 bytes."""

    dtype: ClassVar[torch.dtype]
    wider: ClassVar[str | None] = None
    downlink = True

    def check_range(self, flat: torch.Tensor, name: str) -> None:
        """Refuse values beyond the dtype's largest finite value instead of sending Inf."""
        peak = float(flat.abs().max()) if flat.numel() else 0.0
        if peak > torch.finfo(self.dtype).max:
            hint = f"; use {self.wider}" if self.wider else ""
            raise CodecError(f"tensor {name!r}: |value| {peak:.3g} exceeds the {self.name} range{hint}")

    def encode(self, flat: torch.Tensor, params: CodecParams, name: str,
               generator: torch.Generator | None) -> tuple[int, bytes]:
        self.check_range(flat, name)
        return 0, flat.to(self.dtype).view(torch.int16).numpy().astype("<i2").tobytes()

    def decode(self, body: np.ndarray, numel: int, param: int, name: str) -> torch.Tensor:
        bits = torch.from_numpy(body.view("<i2").astype(np.int16))
        return bits.view(self.dtype).to(torch.float32)

    def body_size(self, numel: int, param: int) -> int:
        return 2 * numel

    def within_range(self, tensor: torch.Tensor) -> str:
        """A tensor beyond this dtype's range goes with `wider` (the same size, a wider range): a large
        update is sent a little coarser instead of failing its client's round."""
        if self.wider and tensor.numel() and float(tensor.abs().max()) > torch.finfo(self.dtype).max:
            return self.wider
        return self.name


class Fp16(HalfFloat):
    name, wire_id, dtype, wider = "fp16", 1, torch.float16, "bf16"


class Bf16(HalfFloat):
    name, wire_id, dtype = "bf16", 2, torch.bfloat16


# --- int8 / int4 absmax quantisation ------------------------------------------------------------

def _block_count(numel: int, block_size: int) -> int:
    if numel == 0:
        return 0
    return 1 if block_size == 0 else -(-numel // block_size)


def _quantize(flat: torch.Tensor, params: CodecParams, q_max: int,
              generator: torch.Generator | None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(block size, fp32 scales, integer levels in [-q_max, q_max]) for absmax quantisation."""
    numel = flat.numel()
    block = params.block_size if 0 < params.block_size < numel else max(numel, 1)
    blocks = _block_count(numel, block)
    padded = torch.zeros(blocks * block, dtype=torch.float32)
    padded[:numel] = flat
    grid = padded.reshape(blocks, block)
    scales = grid.abs().amax(dim=1) / q_max
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = grid / safe[:, None]
    if params.stochastic_rounding:
        levels = torch.floor(scaled + torch.rand(scaled.shape, generator=generator))
    else:
        levels = torch.round(scaled)
    levels = levels.clamp(-q_max, q_max).to(torch.int8).reshape(-1)[:numel]
    param = 0 if blocks <= 1 else block
    return param, scales, levels


class AbsmaxQuantised(Codec):
    """Symmetric absmax quantisation per block (n = numel, B = block size or n, nb = ceil(n / B));
    body: nb fp32 scales, then the levels as the subclass packs them."""

    q_max: ClassVar[int]

    @abstractmethod
    def pack(self, levels: torch.Tensor) -> bytes:
        """The int8 levels in [-q_max, q_max] as body bytes."""

    @abstractmethod
    def unpack(self, packed: np.ndarray, numel: int, name: str) -> np.ndarray:
        """The int8 levels of the packed bytes, checked to lie in [-q_max, q_max]."""

    @abstractmethod
    def levels_size(self, numel: int) -> int:
        """Body bytes of the packed levels."""

    def encode(self, flat: torch.Tensor, params: CodecParams, name: str,
               generator: torch.Generator | None) -> tuple[int, bytes]:
        param, scales, levels = _quantize(flat, params, self.q_max, generator)
        return param, scales.numpy().astype("<f4").tobytes() + self.pack(levels)

    def decode(self, body: np.ndarray, numel: int, param: int, name: str) -> torch.Tensor:
        blocks = _block_count(numel, param)
        scales = body[: 4 * blocks].view("<f4")
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise CodecError(f"tensor {name!r}: negative or non-finite quantisation scale")
        levels = self.unpack(body[4 * blocks:], numel, name)
        expanded = np.repeat(scales.astype(np.float32), param or max(numel, 1))[:numel]
        return torch.from_numpy(levels.astype(np.float32) * expanded)

    def body_size(self, numel: int, param: int) -> int:
        return 4 * _block_count(numel, param) + self.levels_size(numel)

    def param_is_valid(self, numel: int, param: int) -> bool:
        """A block size below numel, or 0 for one block."""
        return param == 0 or param < numel


class Int8(AbsmaxQuantised):
    """Levels as n int8 bytes (-128 is never written): n + 4*nb bytes."""

    name, wire_id, q_max = "int8", 3, 127
    downlink = True

    def pack(self, levels: torch.Tensor) -> bytes:
        return levels.numpy().tobytes()

    def unpack(self, packed: np.ndarray, numel: int, name: str) -> np.ndarray:
        levels = packed.view(np.int8)
        if (levels == -128).any():
            raise CodecError(f"tensor {name!r}: int8 level -128 is outside the symmetric range")
        return levels

    def levels_size(self, numel: int) -> int:
        return numel


class Int4(AbsmaxQuantised):
    """Levels in ceil(n / 2) bytes: element 2i in the low nibble of byte i, 2i+1 in the high nibble,
    each stored as q + 8 (q in [-7, 7]); an odd tail's high nibble is 0."""

    name, wire_id, q_max = "int4", 4, 7

    def pack(self, levels: torch.Tensor) -> bytes:
        nibbles = (levels.to(torch.int16) + 8).to(torch.uint8).numpy()
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()

    def unpack(self, packed: np.ndarray, numel: int, name: str) -> np.ndarray:
        nibbles = np.empty(2 * packed.size, dtype=np.uint8)
        nibbles[0::2] = packed & 0x0F
        nibbles[1::2] = packed >> 4
        if numel % 2 and nibbles[-1] != 0:
            raise CodecError(f"tensor {name!r}: int4 padding nibble is not zero")
        nibbles = nibbles[:numel]
        if (nibbles == 0).any():
            raise CodecError(f"tensor {name!r}: int4 level -8 is outside the symmetric range")
        return nibbles.astype(np.int8) - 8

    def levels_size(self, numel: int) -> int:
        return (numel + 1) // 2


# --- top-k sparsification and ternary -------------------------------------------------------------

def topk_count(numel: int, density: float) -> int:
    """ceil(density * numel), robust to float error (0.1 * 3070 must give 307, not 308)."""
    return min(numel, math.ceil(round(density * numel, 9)))


def _index_width(numel: int) -> int:
    return 2 if numel <= 2**16 else 4


def _uses_bitmap(numel: int, k: int) -> bool:
    return (numel + 7) // 8 <= _index_width(numel) * k


def _positions_size(numel: int, k: int) -> int:
    return (numel + 7) // 8 if _uses_bitmap(numel, k) else _index_width(numel) * k


def _select_topk(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Sorted positions of the k largest |x| (ties: lower index first), never an exact zero."""
    magnitudes = flat.abs()
    k = min(topk_count(flat.numel(), density), int(torch.count_nonzero(magnitudes)))
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    threshold = torch.topk(magnitudes, k, sorted=False).values.min()
    above = torch.nonzero(magnitudes > threshold).reshape(-1)
    tied = torch.nonzero(magnitudes == threshold).reshape(-1)[: k - above.numel()]
    return torch.sort(torch.cat([above, tied])).values


def _pack_positions(positions: np.ndarray, numel: int) -> bytes:
    if _uses_bitmap(numel, positions.size):
        mask = np.zeros(numel, dtype=bool)
        mask[positions] = True
        return np.packbits(mask, bitorder="little").tobytes()
    return positions.astype("<u2" if _index_width(numel) == 2 else "<u4").tobytes()


def _unpack_positions(body: np.ndarray, numel: int, k: int, name: str) -> tuple[np.ndarray, int]:
    size = _positions_size(numel, k)
    raw = body[:size]
    if _uses_bitmap(numel, k):
        bits = np.unpackbits(raw, bitorder="little")
        if bits[numel:].any():
            raise CodecError(f"tensor {name!r}: top-k bitmap has bits set past the tensor's end")
        positions = np.flatnonzero(bits[:numel])
        if positions.size != k:
            raise CodecError(f"tensor {name!r}: top-k bitmap marks {positions.size} entries, header says {k}")
    else:
        positions = raw.view("<u2" if _index_width(numel) == 2 else "<u4").astype(np.int64)
        if k and (positions[-1] >= numel or (np.diff(positions) <= 0).any()):
            raise CodecError(f"tensor {name!r}: top-k indices are not strictly increasing below {numel}")
    return positions, size


def _scatter(numel: int, positions: np.ndarray, values: np.ndarray) -> torch.Tensor:
    dense = np.zeros(numel, dtype=np.float32)
    dense[positions] = values
    return torch.from_numpy(dense)


class Sparse(Codec):
    """The k kept positions (k in the header): a bitmap of ceil(n/8) bytes (bit j of byte i <->
    element 8i + j) when that is no larger than the index list, else k strictly increasing indices
    as uint16 (n <= 65536) or uint32; the subclass adds the values."""

    def param_is_valid(self, numel: int, param: int) -> bool:
        """k <= numel."""
        return param <= numel


class TopK(Sparse):
    """Body: the positions, then k fp16 values in position order."""

    name, wire_id = "topk", 5

    def encode(self, flat: torch.Tensor, params: CodecParams, name: str,
               generator: torch.Generator | None) -> tuple[int, bytes]:
        positions = _select_topk(flat, params.density)
        _, values = FP16.encode(flat[positions], params, name, None)
        return positions.numel(), _pack_positions(positions.numpy(), flat.numel()) + values

    def decode(self, body: np.ndarray, numel: int, param: int, name: str) -> torch.Tensor:
        positions, offset = _unpack_positions(body, numel, param, name)
        values = FP16.decode(body[offset:], param, 0, name).numpy()
        return _scatter(numel, positions, values)

    def body_size(self, numel: int, param: int) -> int:
        return _positions_size(numel, param) + FP16.body_size(param, 0)


def ternary_scale(flat: torch.Tensor, kept: torch.Tensor, alpha: float | Literal["mean"]) -> float:
    """alpha * std of the whole (uncompressed) tensor, ComPEFT; or the mean |kept| (STC)."""
    if alpha == "mean":
        return float(kept.abs().mean()) if kept.numel() else 0.0
    return alpha * float(flat.to(torch.float64).std(correction=0)) if flat.numel() else 0.0


class TopKTernary(Sparse):
    """Body: one fp32 scale, the positions, then ceil(k/8) sign bytes (bit set = negative)."""

    name, wire_id = "topk_ternary", 6

    def encode(self, flat: torch.Tensor, params: CodecParams, name: str,
               generator: torch.Generator | None) -> tuple[int, bytes]:
        positions = _select_topk(flat, params.density)
        kept = flat[positions]
        scale = ternary_scale(flat, kept, params.ternary_alpha)
        signs = np.packbits((kept < 0).numpy(), bitorder="little").tobytes()
        return positions.numel(), struct.pack("<f", scale) + _pack_positions(positions.numpy(), flat.numel()) + signs

    def decode(self, body: np.ndarray, numel: int, param: int, name: str) -> torch.Tensor:
        scale = float(body[:4].view("<f4")[0])
        if not (math.isfinite(scale) and scale >= 0):
            raise CodecError(f"tensor {name!r}: ternary scale {scale} is negative or not finite")
        positions, size = _unpack_positions(body[4:], numel, param, name)
        sign_bits = np.unpackbits(body[4 + size:], bitorder="little")
        if sign_bits[param:].any():
            raise CodecError(f"tensor {name!r}: ternary sign padding bits are set")
        values = np.where(sign_bits[:param].astype(bool), -scale, scale).astype(np.float32)
        return _scatter(numel, positions, values)

    def body_size(self, numel: int, param: int) -> int:
        return 4 + _positions_size(numel, param) + (param + 7) // 8


# --- the table ------------------------------------------------------------------------------------

def _table(*codecs: Codec) -> dict[str, Codec]:
    """Name -> codec, refusing a taken name or wire id ("none" means no codec; ids fill one header byte)."""
    table: dict[str, Codec] = {}
    for codec in codecs:
        taken = {other.wire_id for other in table.values()}
        if codec.name in table or codec.name == "none" or codec.wire_id in taken or not 0 < codec.wire_id < 256:
            raise ValueError(f"codec {codec.name!r}: its name or wire id {codec.wire_id} is taken or invalid")
        table[codec.name] = codec
    return table


FP16 = Fp16()
CODECS: dict[str, Codec] = _table(FP16, Bf16(), Int8(), Int4(), TopK(), TopKTernary())
"""Every codec by name: the one table the header, the negotiation and the config types read."""
_BY_WIRE_ID = {codec.wire_id: codec for codec in CODECS.values()}
CODEC_IDS: dict[str, int] = {name: codec.wire_id for name, codec in CODECS.items()}
"""Wire id by name, for readers of raw blobs (byte 1)."""
SUPPORTED_CODECS: tuple[str, ...] = ("none", *CODECS)
DOWNLINK_CODECS: tuple[str, ...] = ("none", *(name for name, codec in CODECS.items() if codec.downlink))


def _one_of(names: tuple[str, ...]) -> AfterValidator:
    def check(name: str) -> str:
        if name not in names:
            raise ValueError(f"codec {name!r} is not one of {list(names)}")
        return name

    return AfterValidator(check)


CodecName = Annotated[str, _one_of(SUPPORTED_CODECS)]
"""A codec name in a config or an instruction: "none" (plain tensors) or a key of CODECS."""
DownlinkCodecName = Annotated[str, _one_of(DOWNLINK_CODECS)]


DEFAULT_PARAMS = CodecParams()


def encode(codec: str, tensor: torch.Tensor, params: CodecParams = DEFAULT_PARAMS, *,
           name: str = "tensor", generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode a float tensor into a uint8 blob; `generator` drives stochastic rounding."""
    if codec not in CODECS:
        raise CodecError(f"tensor {name!r}: unknown codec {codec!r}; known: {sorted(CODECS)}")
    if tensor.dtype not in DTYPE_IDS:
        raise CodecError(f"tensor {name!r}: dtype {tensor.dtype} cannot be encoded")
    if tensor.dim() > MAX_NDIM or any(size >= 2**32 for size in tensor.shape):
        raise CodecError(f"tensor {name!r}: shape {tuple(tensor.shape)} exceeds the blob header")
    flat = tensor.detach().reshape(-1).to(torch.float32).cpu()
    if not bool(torch.isfinite(flat).all()):
        raise CodecError(f"tensor {name!r}: holds NaN or Inf")
    chosen = CODECS[codec]
    param, body = chosen.encode(flat, params, name, generator)
    tail = struct.pack(f"<{tensor.dim()}I", *tensor.shape) + struct.pack("<I", param) + body
    head = _FIXED_HEADER.pack(FORMAT_VERSION, chosen.wire_id, DTYPE_IDS[tensor.dtype], tensor.dim(),
                              zlib.crc32(tail))
    return torch.frombuffer(bytearray(head + tail), dtype=torch.uint8)


def decode(blob: torch.Tensor, *, name: str = "tensor") -> torch.Tensor:
    """The tensor a blob encodes, in its original dtype and shape; CodecError if the blob is invalid."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise CodecError(f"tensor {name!r}: an encoded tensor is 1-D uint8, got {blob.dtype} {tuple(blob.shape)}")
    data = blob.contiguous().numpy().tobytes()
    if len(data) < _FIXED_HEADER.size:
        raise CodecError(f"tensor {name!r}: {len(data)} bytes is shorter than the blob header")
    version, codec_id, dtype_id, ndim, crc = _FIXED_HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise CodecError(f"tensor {name!r}: blob format version {version}, expected {FORMAT_VERSION}")
    if codec_id not in _BY_WIRE_ID or dtype_id not in DTYPES or ndim > MAX_NDIM:
        raise CodecError(f"tensor {name!r}: bad header (codec id {codec_id}, dtype id {dtype_id}, ndim {ndim})")
    header = header_size(ndim)
    if len(data) < header:
        raise CodecError(f"tensor {name!r}: truncated header ({len(data)} of {header} bytes)")
    *shape, param = struct.unpack_from(f"<{ndim + 1}I", data, _FIXED_HEADER.size)
    codec = _BY_WIRE_ID[codec_id]
    numel = math.prod(shape)
    if not codec.param_is_valid(numel, param):
        raise CodecError(f"tensor {name!r}: header param {param} is invalid for {codec.name} with {numel} elements")
    expected = codec.encoded_size(shape, param)
    if len(data) != expected:
        raise CodecError(
            f"tensor {name!r}: {codec.name} blob has {len(data)} bytes, expected {expected} for shape {shape}"
        )
    if zlib.crc32(data[_FIXED_HEADER.size:]) != crc:
        raise CodecError(f"tensor {name!r}: CRC mismatch, the encoded bytes are corrupted")
    flat = codec.decode(np.frombuffer(data, dtype=np.uint8, offset=header), numel, param, name)
    if not bool(torch.isfinite(flat).all()):
        raise CodecError(f"tensor {name!r}: decodes to NaN or Inf")
    return flat.reshape(shape).to(DTYPES[dtype_id])


def encoded_size(codec: str, shape: Sequence[int], param: int) -> int:
    """Exact blob bytes of `codec` for a tensor of `shape` whose header holds `param`."""
    return CODECS[codec].encoded_size(shape, param)


def within_range(codec: str, tensor: torch.Tensor) -> str:
    """`codec`, or the wider codec it names for values beyond its range (fp16 -> bf16)."""
    return CODECS[codec].within_range(tensor)
