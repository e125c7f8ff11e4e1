"""Update codecs: pure encode/decode of one float tensor to and from a self-describing uint8 blob.

Codecs (NVFlare's fp16/8-bit/4-bit filters; top-k with error feedback, Stich et al. 2018,
arXiv:1809.07599; ternary sign x scale after top-k, ComPEFT, arXiv:2311.13171, algorithms.md §5.4):

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

Blob layout (all integers and floats little-endian):

    offset  size      field
    0       1         format version (1)
    1       1         codec id (CODEC_IDS)
    2       1         dtype id of the original tensor (DTYPE_IDS)
    3       1         ndim (<= 8)
    4       4         CRC-32 (zlib) of every byte after this field
    8       4*ndim    shape, uint32 each
    8+4*ndim 4        param, uint32: block size (int8/int4, 0 = per tensor), k (top-k), 0 otherwise
    12+4*ndim ...     body

Bodies (n = numel, B = block size or n, nb = ceil(n / B)):

- fp16 / bf16: n x 2 bytes.
- int8: nb fp32 scales, then n int8 values.                       n + 4*nb bytes
- int4: nb fp32 scales, then ceil(n / 2) bytes; element 2i in the low nibble of byte i, 2i+1 in the
  high nibble, each stored as q + 8 (q in [-7, 7]); an odd tail's high nibble is 0.
- topk / topk_ternary: [ternary: one fp32 scale] then the positions, then the values.
  Positions: a bitmap of ceil(n/8) bytes (bit j of byte i <-> element 8i + j) when that is no larger
  than the index list, else k strictly increasing indices as uint16 (n <= 65536) or uint32.
  Values: topk: k fp16 in position order; ternary: ceil(k/8) sign bytes, bit set = negative.
So a 2-D tensor costs a 20-byte header plus its body; `encoded_size` states it exactly.

Decoding checks the version, codec and dtype ids, the CRC and every length, and that positions,
scales and values are valid; anything else raises `CodecError` naming the tensor.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

CodecName = Literal["none", "fp16", "bf16", "int8", "int4", "topk", "topk_ternary"]
CODEC_IDS: dict[str, int] = {"fp16": 1, "bf16": 2, "int8": 3, "int4": 4, "topk": 5, "topk_ternary": 6}
CODEC_NAMES = {code: name for name, code in CODEC_IDS.items()}
SUPPORTED_CODECS: tuple[str, ...] = ("none", *CODEC_IDS)
DTYPE_IDS: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
DTYPES = {code: dtype for dtype, code in DTYPE_IDS.items()}
FORMAT_VERSION = 1
MAX_NDIM = 8
FP16_MAX = 65504.0
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


def topk_count(numel: int, density: float) -> int:
    """ceil(density * numel), robust to float error (0.1 * 3070 must give 307, not 308)."""
    return min(numel, math.ceil(round(density * numel, 9)))


def encode(codec: str, tensor: torch.Tensor, params: CodecParams = CodecParams(), *,
           name: str = "tensor", generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode a float tensor into a uint8 blob; `generator` drives stochastic rounding."""
    if codec not in CODEC_IDS:
        raise CodecError(f"tensor {name!r}: unknown codec {codec!r}; known: {sorted(CODEC_IDS)}")
    if tensor.dtype not in DTYPE_IDS:
        raise CodecError(f"tensor {name!r}: dtype {tensor.dtype} cannot be encoded")
    if tensor.dim() > MAX_NDIM or any(size >= 2**32 for size in tensor.shape):
        raise CodecError(f"tensor {name!r}: shape {tuple(tensor.shape)} exceeds the blob header")
    flat = tensor.detach().reshape(-1).to(torch.float32).cpu()
    if not bool(torch.isfinite(flat).all()):
        raise CodecError(f"tensor {name!r}: holds NaN or Inf")
    param, body = _ENCODERS[codec](flat, params, name, generator)
    tail = struct.pack(f"<{tensor.dim()}I", *tensor.shape) + struct.pack("<I", param) + body
    head = _FIXED_HEADER.pack(FORMAT_VERSION, CODEC_IDS[codec], DTYPE_IDS[tensor.dtype], tensor.dim(),
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
    if codec_id not in CODEC_NAMES or dtype_id not in DTYPES or ndim > MAX_NDIM:
        raise CodecError(f"tensor {name!r}: bad header (codec id {codec_id}, dtype id {dtype_id}, ndim {ndim})")
    header_size = _FIXED_HEADER.size + 4 * ndim + 4
    if len(data) < header_size:
        raise CodecError(f"tensor {name!r}: truncated header ({len(data)} of {header_size} bytes)")
    *shape, param = struct.unpack_from(f"<{ndim + 1}I", data, _FIXED_HEADER.size)
    codec = CODEC_NAMES[codec_id]
    numel = math.prod(shape)
    if not _param_is_valid(codec, numel, param):
        raise CodecError(f"tensor {name!r}: header param {param} is invalid for {codec} with {numel} elements")
    expected = header_size + body_size(codec, numel, param)
    if len(data) != expected:
        raise CodecError(f"tensor {name!r}: {codec} blob has {len(data)} bytes, expected {expected} for shape {shape}")
    if zlib.crc32(data[_FIXED_HEADER.size:]) != crc:
        raise CodecError(f"tensor {name!r}: CRC mismatch, the encoded bytes are corrupted")
    flat = _DECODERS[codec](np.frombuffer(data, dtype=np.uint8, offset=header_size), numel, param, name)
    if not bool(torch.isfinite(flat).all()):
        raise CodecError(f"tensor {name!r}: decodes to NaN or Inf")
    return flat.reshape(shape).to(DTYPES[dtype_id])


def encoded_size(codec: str, shape: tuple[int, ...], param: int) -> int:
    """Exact blob bytes: header (12 + 4 * ndim) plus body."""
    return _FIXED_HEADER.size + 4 * len(shape) + 4 + body_size(codec, math.prod(shape), param)


def _param_is_valid(codec: str, numel: int, param: int) -> bool:
    """What an encoder can write: a block size below numel (0 = one block), or k <= numel."""
    if codec in ("fp16", "bf16"):
        return param == 0
    if codec in ("int8", "int4"):
        return param == 0 or param < numel
    return param <= numel


def body_size(codec: str, numel: int, param: int) -> int:
    """Body bytes of a blob, from the header fields alone (see the module docstring)."""
    if codec in ("fp16", "bf16"):
        return 2 * numel
    if codec in ("int8", "int4"):
        blocks = _block_count(numel, param)
        values = numel if codec == "int8" else (numel + 1) // 2
        return 4 * blocks + values
    positions = _positions_size(numel, param)
    if codec == "topk":
        return positions + 2 * param
    return 4 + positions + (param + 7) // 8


# --- 16-bit floats -------------------------------------------------------------------------------

def within_range(codec: str, tensor: torch.Tensor) -> str:
    """`codec`, or bf16 (the same size, fp32's range) for an fp16 tensor beyond ±65504: a large
    update is sent a little coarser instead of failing its client's round."""
    if codec == "fp16" and tensor.numel() and float(tensor.abs().max()) > FP16_MAX:
        return "bf16"
    return codec


def _check_fp16_range(flat: torch.Tensor, name: str) -> None:
    peak = float(flat.abs().max()) if flat.numel() else 0.0
    if peak > FP16_MAX:
        raise CodecError(f"tensor {name!r}: |value| {peak:.3g} exceeds the fp16 range; use bf16")


def _encode_fp16(flat, params, name, generator) -> tuple[int, bytes]:
    _check_fp16_range(flat, name)
    return 0, flat.numpy().astype("<f2").tobytes()


def _decode_fp16(body: np.ndarray, numel: int, param: int, name: str) -> torch.Tensor:
    return torch.from_numpy(body.view("<f2").astype(np.float32))


def _encode_bf16(flat, params, name, generator) -> tuple[int, bytes]:
    return 0, flat.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()


def _decode_bf16(body: np.ndarray, numel: int, param: int, name: str) -> torch.Tensor:
    bits = torch.from_numpy(body.view("<i2").astype(np.int16))
    return bits.view(torch.bfloat16).to(torch.float32)


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


def _dequantize(scales: np.ndarray, levels: np.ndarray, numel: int, param: int) -> torch.Tensor:
    block = param or max(numel, 1)
    expanded = np.repeat(scales.astype(np.float32), block)[:numel]
    return torch.from_numpy(levels.astype(np.float32) * expanded)


def _read_scales(body: np.ndarray, numel: int, param: int, name: str) -> tuple[np.ndarray, int]:
    blocks = _block_count(numel, param)
    scales = body[: 4 * blocks].view("<f4")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CodecError(f"tensor {name!r}: negative or non-finite quantisation scale")
    return scales, 4 * blocks


def _encode_int8(flat, params, name, generator) -> tuple[int, bytes]:
    param, scales, levels = _quantize(flat, params, 127, generator)
    return param, scales.numpy().astype("<f4").tobytes() + levels.numpy().tobytes()


def _decode_int8(body: np.ndarray, numel: int, param: int, name: str) -> torch.Tensor:
    scales, offset = _read_scales(body, numel, param, name)
    levels = body[offset:].view(np.int8)
    if (levels == -128).any():
        raise CodecError(f"tensor {name!r}: int8 level -128 is outside the symmetric range")
    return _dequantize(scales, levels, numel, param)


def _encode_int4(flat, params, name, generator) -> tuple[int, bytes]:
    param, scales, levels = _quantize(flat, params, 7, generator)
    nibbles = (levels.to(torch.int16) + 8).to(torch.uint8).numpy()
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return param, scales.numpy().astype("<f4").tobytes() + packed.tobytes()


def _decode_int4(body: np.ndarray, numel: int, param: int, name: str) -> torch.Tensor:
    scales, offset = _read_scales(body, numel, param, name)
    packed = body[offset:]
    nibbles = np.empty(2 * packed.size, dtype=np.uint8)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    if numel % 2 and nibbles[-1] != 0:
        raise CodecError(f"tensor {name!r}: int4 padding nibble is not zero")
    nibbles = nibbles[:numel]
    if (nibbles == 0).any():
        raise CodecError(f"tensor {name!r}: int4 level -8 is outside the symmetric range")
    return _dequantize(scales, nibbles.astype(np.int8) - 8, numel, param)


# --- top-k sparsification and ternary -------------------------------------------------------------

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


def _encode_topk(flat, params, name, generator) -> tuple[int, bytes]:
    positions = _select_topk(flat, params.density)
    kept = flat[positions]
    _check_fp16_range(kept, name)
    numpy_positions = positions.numpy()
    return positions.numel(), _pack_positions(numpy_positions, flat.numel()) + kept.numpy().astype("<f2").tobytes()


def _decode_topk(body: np.ndarray, numel: int, k: int, name: str) -> torch.Tensor:
    positions, offset = _unpack_positions(body, numel, k, name)
    values = body[offset:].view("<f2").astype(np.float32)
    return _scatter(numel, positions, values)


def ternary_scale(flat: torch.Tensor, kept: torch.Tensor, alpha: float | Literal["mean"]) -> float:
    """alpha * std of the whole (uncompressed) tensor, ComPEFT; or the mean |kept| (STC)."""
    if alpha == "mean":
        return float(kept.abs().mean()) if kept.numel() else 0.0
    return alpha * float(flat.to(torch.float64).std(correction=0)) if flat.numel() else 0.0


def _encode_topk_ternary(flat, params, name, generator) -> tuple[int, bytes]:
    positions = _select_topk(flat, params.density)
    kept = flat[positions]
    scale = ternary_scale(flat, kept, params.ternary_alpha)
    signs = np.packbits((kept < 0).numpy(), bitorder="little").tobytes()
    return positions.numel(), struct.pack("<f", scale) + _pack_positions(positions.numpy(), flat.numel()) + signs


def _decode_topk_ternary(body: np.ndarray, numel: int, k: int, name: str) -> torch.Tensor:
    scale = float(body[:4].view("<f4")[0])
    if not (math.isfinite(scale) and scale >= 0):
        raise CodecError(f"tensor {name!r}: ternary scale {scale} is negative or not finite")
    positions, size = _unpack_positions(body[4:], numel, k, name)
    sign_bits = np.unpackbits(body[4 + size:], bitorder="little")
    if sign_bits[k:].any():
        raise CodecError(f"tensor {name!r}: ternary sign padding bits are set")
    values = np.where(sign_bits[:k].astype(bool), -scale, scale).astype(np.float32)
    return _scatter(numel, positions, values)


_ENCODERS = {"fp16": _encode_fp16, "bf16": _encode_bf16, "int8": _encode_int8, "int4": _encode_int4,
             "topk": _encode_topk, "topk_ternary": _encode_topk_ternary}
_DECODERS = {"fp16": _decode_fp16, "bf16": _decode_bf16, "int8": _decode_int8, "int4": _decode_int4,
             "topk": _decode_topk, "topk_ternary": _decode_topk_ternary}
