"""GGML block-quantized tensors (as GGUF files store them) -> GroupQuant, exactly.

Every GGML block type below is an integer per weight times a per-(sub)block scale, plus,
for some, a per-(sub)block offset, so it maps onto GroupQuant without rounding anything:

    type   group  kind  values            scale           offset
    Q4_0   32     INT4  q in [0, 15]      d               -8 d
    Q4_1   32     INT4  q in [0, 15]      d               m
    Q5_0   32     INT8  q - 16            d               none (symmetric: no offset term)
    Q5_1   32     INT8  q in [0, 31]      d               m
    Q8_0   32     INT8  q                 d               none
    Q2_K   16     INT4  q in [0, 3]       d * sc          -dmin * m
    Q3_K   16     INT8  q in [-4, 3]      d * (sc - 32)   none
    Q4_K   32     INT4  q in [0, 15]      d * sc          -dmin * m
    Q5_K   32     INT8  q in [0, 31]      d * sc          -dmin * m
    Q6_K   16     INT8  q - 32            d * sc          none
    Q8_K   256    INT8  q                 d               none

d, dmin, m are float16 in the file (Q8_K's d is float32) and sc, m small integers
(K-quants' 4-, 6- or 8-bit sub-block scales). Their products have at most 18 significant
bits, so the float32 scales and offsets here are exact, and `GroupQuant.dequantize(float32)`
computes the same float32 operations as `gguf.quants.dequantize` (bit for bit; Q4_0's
-0.0 may come out +0.0).

F32, F16 and BF16 tensors are not quantized: `group_quant_from_blocks` returns None for
them (read them as floats). Other block types (IQ*, TQ*, MXFP4, ...) hold non-uniform
codebooks and raise a ValueError listing the supported types.

Byte layouts are ggml's (ggml-common.h); each decoder below says which bytes hold what.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import gguf
import numpy as np

from xla_inference.quantization.groups import INT4, INT8, GroupQuant

GGMLType = gguf.GGMLQuantizationType
QK_K = 256  # the K-quants' superblock length

UNQUANTIZED_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})

# (values [N, block], scales [N, sub-blocks], offsets like scales or None) for N blocks.
Decoded = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


# --------------------------------------------------------------------------- byte fields


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as float32 [N, 1]."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _f32(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, start:start + 4]).view(np.float32).copy()


def _nibbles(packed: np.ndarray, runs: int) -> np.ndarray:
    """ggml's 4-bit packing: the bytes in `runs` runs of equal length; within a run, the
    low nibbles are one stretch of elements and the high nibbles the next. [N, 2*bytes]."""
    n = packed.shape[0]
    run = packed.reshape(n, runs, 1, -1)
    return np.concatenate([run & 0x0F, run >> 4], axis=2).reshape(n, -1)


def _bit_planes(packed: np.ndarray, bits: int, runs: int) -> np.ndarray:
    """Fields of `bits` bits packed from the low bits up: in each of `runs` runs of bytes,
    field i of every byte is the i-th stretch of elements. [N, bytes * 8 / bits]."""
    n = packed.shape[0]
    run = packed.reshape(n, runs, 1, -1)
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, 1, -1, 1)
    return ((run >> shifts) & ((1 << bits) - 1)).reshape(n, -1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's fifth bits: element j's is bit j of the little-endian 32-bit qh."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's eight 6-bit scales and eight 6-bit mins in 12 bytes: bytes 0-3 hold
    scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 likewise for the
    mins; bytes 8-11 the low 4 bits of scale 4+i (low nibble) and of min 4+i (high)."""
    lo_sc, lo_m, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo_sc & 0x3F, (rest & 0x0F) | ((lo_sc >> 2) & 0x30)], axis=1)
    mins = np.concatenate([lo_m & 0x3F, (rest >> 4) | ((lo_m >> 2) & 0x30)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """Q3_K's sixteen 6-bit scales in 12 bytes: low 4 bits in bytes 0-7 (scale i in the low
    nibble of byte i, scale 8+i in its high nibble), top 2 bits in bytes 8-11 (scale
    4j+i in bits 2j of byte 8+i). Stored with a bias of 32."""
    low = _nibbles(packed[:, 0:8], 1)
    high = _bit_planes(packed[:, 8:12], 2, 1)
    return ((low | (high << 4)).astype(np.int16) - 32).astype(np.float32)


# --------------------------------------------------------------------------- decoders


def _q4_0(b: np.ndarray) -> Decoded:  # d f16 | 16 bytes of nibbles
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18], 1), d, -8 * d


def _q4_1(b: np.ndarray) -> Decoded:  # d f16 | m f16 | 16 bytes of nibbles
    return _nibbles(b[:, 4:20], 1), _f16(b, 0), _f16(b, 2)


def _five_bit(b: np.ndarray, qh_at: int) -> np.ndarray:
    return _nibbles(b[:, qh_at + 4:qh_at + 20], 1) | (_high_bits(b[:, qh_at:qh_at + 4]) << 4)


def _q5_0(b: np.ndarray) -> Decoded:  # d f16 | qh 4 bytes | 16 bytes of nibbles
    # Stored signed (q - 16 in [-16, 15]) with no offset: a symmetric weight needs no
    # offset term in the kernel.
    return _five_bit(b, 2).astype(np.int8) - np.int8(16), _f16(b, 0), None


def _q5_1(b: np.ndarray) -> Decoded:  # d f16 | m f16 | qh 4 bytes | 16 bytes of nibbles
    return _five_bit(b, 4).astype(np.int8), _f16(b, 0), _f16(b, 2)


def _q8_0(b: np.ndarray) -> Decoded:  # d f16 | 32 int8
    return b[:, 2:34].view(np.int8), _f16(b, 0), None


def _q2_k(b: np.ndarray) -> Decoded:  # 16 scale/min bytes | 64 bytes of 2-bit q | d | dmin
    packed = b[:, 0:16]
    q = _bit_planes(b[:, 16:80], 2, 2)
    d, dmin = _f16(b, 80), _f16(b, 82)
    return q, d * (packed & 0x0F).astype(np.float32), -(dmin * (packed >> 4).astype(np.float32))


def _q3_k(b: np.ndarray) -> Decoded:  # hmask 32 | 64 bytes of 2-bit q | 12 scale bytes | d
    low = _bit_planes(b[:, 32:96], 2, 2).astype(np.int8)
    high = _bit_planes(b[:, 0:32], 1, 1).astype(np.int8)
    # ggml subtracts 4 where the high bit is clear: q = low - 4 (1 - high), in [-4, 3].
    return low - 4 * (1 - high), _f16(b, 108) * _q3_k_scales(b[:, 96:108]), None


def _q4_k(b: np.ndarray) -> Decoded:  # d f16 | dmin f16 | 12 scale bytes | 128 nibble bytes
    scales, mins = _k_scales_and_mins(b[:, 4:16])
    return _nibbles(b[:, 16:144], 4), _f16(b, 0) * scales, -(_f16(b, 2) * mins)


def _q5_k(b: np.ndarray) -> Decoded:  # d | dmin | 12 scale bytes | qh 32 | 128 nibble bytes
    scales, mins = _k_scales_and_mins(b[:, 4:16])
    q = _nibbles(b[:, 48:176], 4) | (_bit_planes(b[:, 16:48], 1, 1) << 4)
    return q.astype(np.int8), _f16(b, 0) * scales, -(_f16(b, 2) * mins)


def _q6_k(b: np.ndarray) -> Decoded:  # 128 low-nibble bytes | 64 bytes of 2-bit highs | 16 int8 scales | d
    q = _nibbles(b[:, 0:128], 2) | (_bit_planes(b[:, 128:192], 2, 2) << 4)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    return q.astype(np.int8) - np.int8(32), _f16(b, 208) * scales, None


def _q8_k(b: np.ndarray) -> Decoded:  # d f32 | 256 int8 | 16 int16 block sums (unused)
    return b[:, 4:260].view(np.int8), _f32(b, 0), None


@dataclasses.dataclass(frozen=True)
class _BlockFormat:
    kind: str
    group_size: int
    decode: Callable[[np.ndarray], Decoded]


_FORMATS = {
    GGMLType.Q4_0: _BlockFormat(INT4, 32, _q4_0),
    GGMLType.Q4_1: _BlockFormat(INT4, 32, _q4_1),
    GGMLType.Q5_0: _BlockFormat(INT8, 32, _q5_0),
    GGMLType.Q5_1: _BlockFormat(INT8, 32, _q5_1),
    GGMLType.Q8_0: _BlockFormat(INT8, 32, _q8_0),
    GGMLType.Q2_K: _BlockFormat(INT4, 16, _q2_k),
    GGMLType.Q3_K: _BlockFormat(INT8, 16, _q3_k),
    GGMLType.Q4_K: _BlockFormat(INT4, 32, _q4_k),
    GGMLType.Q5_K: _BlockFormat(INT8, 32, _q5_k),
    GGMLType.Q6_K: _BlockFormat(INT8, 16, _q6_k),
    GGMLType.Q8_K: _BlockFormat(INT8, 256, _q8_k),
}
SUPPORTED_TYPES = frozenset(_FORMATS)


def supported_type_names() -> str:
    return ", ".join(t.name for t in _FORMATS)


# --------------------------------------------------------------------------- entry point


def group_quant_from_blocks(ggml_type, data: np.ndarray, shape: tuple[int, int],
                            name: str) -> GroupQuant | None:
    """The GroupQuant of a 2-D GGML tensor `name` of numpy shape (rows, cols) whose bytes
    are `data` (uint8 [rows, bytes per row], as gguf's reader gives them). None for the
    float types (F32, F16, BF16); ValueError for a block type without a GroupQuant form or
    bytes that do not fit the shape."""
    ggml_type = GGMLType(ggml_type)
    if ggml_type in UNQUANTIZED_TYPES:
        return None
    if ggml_type not in _FORMATS:
        raise ValueError(f"GGUF tensor {name!r} has type {ggml_type.name}, which has no "
                         f"quantized form here; supported: {supported_type_names()} "
                         f"(and F32, F16, BF16 as floats)")
    fmt = _FORMATS[ggml_type]
    blocks = _blocks_of(ggml_type, data, shape, name)
    values, scales, offsets = fmt.decode(blocks)
    rows, cols = shape
    groups = cols // fmt.group_size
    return GroupQuant(
        values=np.ascontiguousarray(values).reshape(rows, cols),
        scales=scales.reshape(rows, groups),
        offsets=None if offsets is None else offsets.reshape(rows, groups),
        kind=fmt.kind, group_size=fmt.group_size, name=name)


def _blocks_of(ggml_type: GGMLType, data: np.ndarray, shape: tuple[int, int],
               name: str) -> np.ndarray:
    """`data` as one row per block, uint8 [rows * blocks per row, bytes per block], after
    checking it holds whole blocks for `shape`."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    if len(shape) != 2:
        raise ValueError(f"GGUF tensor {name!r}: expected a 2-D shape, got {tuple(shape)}")
    rows, cols = (int(s) for s in shape)
    if cols % block_size:
        raise ValueError(f"GGUF tensor {name!r}: row length {cols} is not a multiple of the "
                         f"{ggml_type.name} block size {block_size}")
    expected = (rows, cols // block_size * type_size)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.shape != expected:
        raise ValueError(f"GGUF tensor {name!r}: {ggml_type.name} bytes of shape {expected} "
                         f"(uint8) expected for shape {(rows, cols)}, got {data.dtype} "
                         f"{data.shape}")
    return np.ascontiguousarray(data).reshape(-1, type_size)
