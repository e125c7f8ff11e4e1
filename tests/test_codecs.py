"""The pure update codecs: hand-computed encodings, round-trip error bounds, exact sizes, bad blobs."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch

from fedtune.strategies.codecs import (
    CODEC_IDS,
    CODECS,
    SUPPORTED_CODECS,
    CodecError,
    CodecParams,
    decode,
    encode,
    encoded_size,
    ternary_scale,
    topk_count,
)

HEADER_1D = 16  # 8 fixed bytes + one uint32 dim + the uint32 param
HEADER_2D = 20


def body(blob: torch.Tensor, header: int = HEADER_1D) -> bytes:
    return blob.numpy().tobytes()[header:]


def reseal(raw: bytes) -> torch.Tensor:
    """A blob with a fresh CRC: lets a test forge a well-formed but invalid payload."""
    sealed = raw[:4] + struct.pack("<I", zlib.crc32(raw[8:])) + raw[8:]
    return torch.frombuffer(bytearray(sealed), dtype=torch.uint8)


def block_scales(x: torch.Tensor, block: int, q_max: int) -> torch.Tensor:
    """Per-element absmax scale of the block each element falls in."""
    flat = x.reshape(-1)
    block = block or flat.numel()
    blocks = flat.split(block)
    return torch.cat([torch.full_like(b, float(b.abs().max()) / q_max) for b in blocks])


# --- every registered codec ------------------------------------------------------------------------

def test_the_codec_table_has_unique_names_and_wire_ids_that_fit_the_header():
    wire_ids = [codec.wire_id for codec in CODECS.values()]
    assert len(set(wire_ids)) == len(wire_ids) and all(0 < wire_id < 256 for wire_id in wire_ids)
    assert all(name == codec.name for name, codec in CODECS.items())
    assert SUPPORTED_CODECS == ("none", *CODECS)


def header_param(blob: torch.Tensor, ndim: int) -> int:
    return struct.unpack_from("<I", blob.numpy().tobytes(), 8 + 4 * ndim)[0]


@pytest.mark.parametrize("codec", list(CODECS.values()), ids=list(CODECS))
@pytest.mark.parametrize("shape", [(0,), (1,), (5,), (37, 29), (70000,)])
def test_every_codec_round_trips_and_states_its_exact_size(codec, shape):
    """Zeros and signs times one scale are values every codec holds exactly (ternary's are no more);
    random values come back in their shape and dtype; `encoded_size` is each blob's length."""
    generator = torch.Generator().manual_seed(len(shape))
    signs = torch.randint(-1, 2, shape, generator=generator).to(torch.float32) * 0.5
    keep_all = CodecParams(density=1.0)
    assert torch.equal(decode(encode(codec.name, signs, keep_all)), signs)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    for x, params in [(signs, keep_all), (noise, CodecParams()), (noise, CodecParams(block_size=0, density=0.5))]:
        blob = encode(codec.name, x, params)
        assert int(blob[1]) == codec.wire_id
        assert blob.numel() == codec.encoded_size(shape, header_param(blob, len(shape)))
        decoded = decode(blob)
        assert decoded.shape == x.shape and decoded.dtype == x.dtype and bool(torch.isfinite(decoded).all())


# --- 16-bit floats ------------------------------------------------------------------------------

def test_fp16_is_exact_for_representable_values():
    values = torch.tensor([0.0, 0.5, -1.25, 1024.0, 2.0**-14, 2.0**-24, -65504.0, 3.140625])
    assert torch.equal(decode(encode("fp16", values)), values)
    assert body(encode("fp16", values)) == values.numpy().astype("<f2").tobytes()


def test_bf16_is_exact_for_representable_values_and_rounds_others_to_8_significant_bits():
    values = torch.tensor([0.0, 1.0, -(2.0**127), 2.0**-120, 1.5, -0.0078125])
    assert torch.equal(decode(encode("bf16", values)), values)
    x = torch.randn(1000)
    assert ((decode(encode("bf16", x)) - x).abs() <= x.abs() * 2.0**-8).all()


def test_fp16_refuses_values_beyond_its_range():
    with pytest.raises(CodecError, match="'layer.B'.*exceeds the fp16 range"):
        encode("fp16", torch.tensor([1.0, 7.0e4]), name="layer.B")


# --- int8 / int4 ------------------------------------------------------------------------------------

def test_int8_per_block_matches_hand_computed_levels():
    x = torch.tensor([1.0, -0.5, 0.25, 0.0, 10.0, 5.0, -2.5, 1.0])
    blob = encode("int8", x, CodecParams(block_size=4))
    # scales 1/127 and 10/127; levels 127*x/absmax rounded half to even: -63.5 -> -64, 63.5 -> 64
    expected = struct.pack("<2f", 1 / 127, 10 / 127) + bytes(
        b & 0xFF for b in (127, -64, 32, 0, 127, 64, -32, 13)
    )
    assert blob.numel() == HEADER_1D + 8 + 8 == encoded_size("int8", (8,), 4)
    assert struct.unpack_from("<I", blob.numpy().tobytes(), 12)[0] == 4  # the block size is in the header
    assert body(blob) == expected
    scales = torch.tensor([1 / 127] * 4 + [10 / 127] * 4, dtype=torch.float32)
    levels = torch.tensor([127, -64, 32, 0, 127, 64, -32, 13], dtype=torch.float32)
    assert torch.equal(decode(blob), levels * scales)


@pytest.mark.parametrize("codec, q_max", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block_size", [0, 1, 32, 64, 1000])
def test_quantisation_error_is_at_most_half_a_step(codec, q_max, block_size):
    x = torch.randn(37, 29, generator=torch.Generator().manual_seed(block_size)) * 0.01
    decoded = decode(encode(codec, x, CodecParams(block_size=block_size)))
    scale = block_scales(x, block_size, q_max).reshape(x.shape)
    assert decoded.shape == x.shape and decoded.dtype == x.dtype
    assert ((decoded - x).abs() <= scale / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("codec, q_max", [("int8", 127), ("int4", 7)])
def test_stochastic_rounding_is_within_one_step_and_unbiased(codec, q_max):
    x = torch.randn(64, generator=torch.Generator().manual_seed(1))
    params = CodecParams(block_size=16, stochastic_rounding=True)
    generator = torch.Generator().manual_seed(2)
    draws = torch.stack([decode(encode(codec, x, params, generator=generator)) for _ in range(400)])
    scale = block_scales(x, 16, q_max)
    assert ((draws - x).abs() < scale * (1 + 1e-5)).all()
    # the mean of 400 unbiased draws lies within 4 standard errors (<= scale/2 / sqrt(400) each)
    assert ((draws.mean(0) - x).abs() <= 4 * scale / 2 / 20).all()
    assert not torch.equal(draws[0], draws[1])


def test_int4_packs_two_levels_per_byte_low_nibble_first():
    x = torch.tensor([7.0, -7.0, 1.0, 0.0, 3.0])
    blob = encode("int4", x, CodecParams(block_size=0))
    # scale 7/7 = 1; stored nibbles q + 8 = 15, 1, 9, 8, 11; the odd tail's high nibble is 0
    assert body(blob) == struct.pack("<f", 1.0) + bytes([0x1F, 0x89, 0x0B])
    assert torch.equal(decode(blob), x)


def test_int4_is_an_eighth_of_fp32_plus_the_stated_scales_and_header():
    x = torch.randn(384, 8)
    fp32_bytes = x.numel() * 4
    blob = encode("int4", x, CodecParams(block_size=64))
    assert blob.numel() == fp32_bytes // 8 + 4 * (x.numel() // 64) + HEADER_2D == encoded_size("int4", (384, 8), 64)
    assert encode("int4", x, CodecParams(block_size=0)).numel() == fp32_bytes // 8 + 4 + HEADER_2D


def test_zero_tensors_and_empty_tensors_round_trip():
    for codec in CODEC_IDS:
        zeros = torch.zeros(3, 5)
        assert torch.equal(decode(encode(codec, zeros)), zeros), codec
        assert decode(encode(codec, torch.zeros(4, 0))).shape == (4, 0), codec


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_decoding_restores_dtype_and_shape(dtype):
    x = torch.randn(2, 3, 4).to(dtype)
    for codec in CODEC_IDS:
        decoded = decode(encode(codec, x, CodecParams(density=1.0)))
        assert decoded.dtype == dtype and decoded.shape == x.shape, codec


# --- top-k and ternary ------------------------------------------------------------------------

def test_topk_count_is_a_robust_ceiling():
    assert topk_count(3070, 0.1) == 307 and topk_count(3072, 0.01) == 31 and topk_count(5, 1.0) == 5


def test_topk_keeps_the_largest_magnitudes_with_ties_to_the_lower_index():
    x = torch.tensor([3.0, -3.0, 1.0, 3.0, 0.5])
    blob = encode("topk", x, CodecParams(density=0.4))  # k = 2 of three tied |3|
    # 1 bitmap byte (elements 0 and 1) beats 2 uint16 indices; values as fp16
    assert body(blob) == bytes([0b00000011]) + struct.pack("<2e", 3.0, -3.0)
    assert torch.equal(decode(blob), torch.tensor([3.0, -3.0, 0.0, 0.0, 0.0]))


def test_topk_uses_sorted_indices_when_they_are_smaller_than_a_bitmap():
    x = torch.zeros(1000)
    x[[10, 500, 999]] = torch.tensor([-4.0, 2.0, 8.0])
    blob = encode("topk", x, CodecParams(density=0.003))
    assert body(blob) == struct.pack("<3H", 10, 500, 999) + struct.pack("<3e", -4.0, 2.0, 8.0)
    assert torch.equal(decode(blob), x)


def test_topk_never_keeps_zeros():
    x = torch.tensor([0.0, 2.0, 0.0, 0.0])
    blob = encode("topk_ternary", x, CodecParams(density=1.0))
    assert torch.count_nonzero(decode(blob)) == 1


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_compeft_ternary_has_exactly_k_entries_of_plus_minus_alpha_sigma(alpha):
    # docs/algorithms.md §6.7.1
    x = torch.randn(50, 41, generator=torch.Generator().manual_seed(3))
    d, density = x.numel(), 0.05
    k = math.ceil(density * d)
    decoded = decode(encode("topk_ternary", x, CodecParams(density=density, ternary_alpha=alpha)))
    sigma = float(x.double().std(correction=0))
    scale = torch.tensor(alpha * sigma, dtype=torch.float32)
    kept = torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices[:k]
    expected = torch.zeros(d)
    expected[kept] = torch.sign(x.reshape(-1)[kept]) * scale
    assert torch.count_nonzero(decoded) == k
    assert torch.equal(decoded.reshape(-1), expected)
    assert encode("topk_ternary", decoded).numel() <= d / 8 + math.ceil(k / 8) + 4 + HEADER_2D


def test_ternary_mean_scale_is_the_mean_kept_magnitude():
    x = torch.tensor([4.0, -2.0, 0.1, 0.2, -0.3, 0.0, 0.0, 0.0])
    decoded = decode(encode("topk_ternary", x, CodecParams(density=0.25)))  # k = 2: 4 and -2
    assert torch.equal(decoded, torch.tensor([3.0, -3.0, 0, 0, 0, 0, 0, 0]))
    assert ternary_scale(x, x[:2], "mean") == 3.0


def test_topk_one_percent_ternary_is_at_least_16_times_smaller_than_fp32():
    for shape in [(384, 8), (4096, 16)]:
        x = torch.randn(shape)
        blob = encode("topk_ternary", x, CodecParams(density=0.01))
        assert x.numel() * 4 / blob.numel() >= 16, shape


# --- invalid input and corrupted payloads -------------------------------------------------------

def test_encode_names_the_tensor_it_cannot_encode():
    with pytest.raises(CodecError, match="'w'.*NaN or Inf"):
        encode("int8", torch.tensor([1.0, math.nan]), name="w")
    with pytest.raises(CodecError, match="'w'.*dtype torch.int64"):
        encode("int8", torch.ones(2, dtype=torch.int64), name="w")
    with pytest.raises(CodecError, match="'w'.*unknown codec 'int3'"):
        encode("int3", torch.ones(2), name="w")


@pytest.mark.parametrize("codec", list(CODEC_IDS))
def test_corrupted_and_truncated_blobs_are_rejected_by_name(codec):
    blob = encode(codec, torch.randn(40, 8), CodecParams(density=0.1))
    flipped = blob.clone()
    flipped[-1] ^= 0x10
    with pytest.raises(CodecError, match="'layer.lora_B'.*CRC mismatch"):
        decode(flipped, name="layer.lora_B")
    with pytest.raises(CodecError, match=r"'layer.lora_B'.*\d+ bytes, expected \d+"):
        decode(blob[:-1], name="layer.lora_B")
    with pytest.raises(CodecError, match="'layer.lora_B'.*shorter than the blob header"):
        decode(blob[:5], name="layer.lora_B")
    with pytest.raises(CodecError, match="'layer.lora_B'.*1-D uint8"):
        decode(blob.to(torch.int16), name="layer.lora_B")


def test_well_sealed_but_invalid_headers_and_bodies_are_rejected():
    raw = encode("int8", torch.randn(8), CodecParams(block_size=4)).numpy().tobytes()
    with pytest.raises(CodecError, match="format version 9"):
        decode(reseal(bytes([9]) + raw[1:]))
    with pytest.raises(CodecError, match="bad header"):
        decode(reseal(raw[:1] + bytes([77]) + raw[2:]))
    with pytest.raises(CodecError, match="header param 8 is invalid for int8"):
        decode(reseal(raw[:12] + struct.pack("<I", 8) + raw[16:]))
    with pytest.raises(CodecError, match="negative or non-finite quantisation scale"):
        decode(reseal(raw[:16] + struct.pack("<f", -1.0) + raw[20:]))
    bitmap = encode("topk", torch.arange(1.0, 9.0), CodecParams(density=0.5)).numpy().tobytes()
    with pytest.raises(CodecError, match="bitmap marks 5 entries, header says 4"):
        decode(reseal(bitmap[:16] + bytes([bitmap[16] | 0x01]) + bitmap[17:]))
    x = torch.zeros(1000)
    x[[3, 7]] = 1.0
    indices = encode("topk", x, CodecParams(density=0.002)).numpy().tobytes()
    with pytest.raises(CodecError, match="not strictly increasing"):
        decode(reseal(indices[:16] + struct.pack("<2H", 7, 3) + indices[20:]))
