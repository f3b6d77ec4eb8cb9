"""Quantized matrix products (int4 / int8 weights in groups, int16 activations) as a native
kernel for XLA's CPU backend (cpu/quantized_matmul.cc), called as an XLA FFI custom call.

    y[t, o] = x_scale[t] * sum_g (scale[o,g] * (S[t,o,g] - z * X[t,g]) + offset[o,g] * X[t,g])

with S the exact int32 product of the group's int16 activations and its weights, X the
group's activation sum, and z a zero point common to the weight (0 unless given: a symmetric
format's midpoint, which then needs no offsets read). Scales and offsets are float16 or
float32 (each its own). Decode reads every weight byte once per step, so the time is that
of reading the weights: int8 weights are half the bytes of bfloat16, int4 a quarter.
quantized_matmul takes activations already quantized to int16 per row; quantized_matmul_float
takes float32 ones and quantizes them itself, as the caller would have (one call instead of
XLA's four small passes). The kernel uses AVX-512 VNNI (vpdpwssd) where the CPU has it
and portable C++ elsewhere, with the same results; it shares its work over XLA's intra-op
thread pool, and its output does not depend on the number of threads.

The weights come in the tile layout of quantization/packed.py (its docstring and the .cc
file's header give it). Built on first use like kernels/cpu_attention.py (kernels/native.py);
XLA_INFERENCE_CPU_QUANTIZED=0 turns it off, and available() then says False, as it does where
the build fails: callers then take the XLA (dequantize and multiply) path.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xla_inference import envs
from xla_inference.kernels import native

# This kernel's builds (tests, benchmarks); the default one is native.SPARE_CORE_KERNELS.
_SOURCE = (native.SPARE_CORE, Path(__file__).parent / "cpu" / "quantized_matmul.cc")
_TARGET = "xla_inference_quantized_matmul"
_SYMBOL = "XlaInferenceQuantizedMatmul"
_FLOAT_TARGET = "xla_inference_quantized_matmul_float"
_FLOAT_SYMBOL = "XlaInferenceQuantizedMatmulFloat"
_MULTI_TARGET = "xla_inference_quantized_matmul_multi"
_MULTI_SYMBOL = "XlaInferenceQuantizedMatmulMulti"
_WIDE_TARGET = "xla_inference_quantized_matmul_wide"
_WIDE_SYMBOL = "XlaInferenceQuantizedMatmulWide"
_TABLE_TARGET = "xla_inference_quantized_matmul_table"
_TABLE_SYMBOL = "XlaInferenceQuantizedMatmulTable"
# The wide entry's paths, in the order of its isa attribute (each caps the ones above it).
WIDE_ISAS = ("portable", "avx512_bf16", "amx")
ROWS_PER_TILE = 16  # output rows per tile of the weight layout


@functools.cache
def _library():
    return native.load_spare_core_kernel(_SOURCE, {
        _TARGET: _SYMBOL, _FLOAT_TARGET: _FLOAT_SYMBOL, _MULTI_TARGET: _MULTI_SYMBOL,
        _WIDE_TARGET: _WIDE_SYMBOL, _TABLE_TARGET: _TABLE_SYMBOL})


@functools.cache
def available() -> bool:
    """Whether the native kernel is built and registered (XLA_INFERENCE_CPU_QUANTIZED=0
    turns it off)."""
    if not envs.cpu_quantized_enabled():
        return False
    envs.spare_core_enabled()  # a typo fails here, naming the variable, not as a build failure
    return native.loads(_library, "quantized matmul", "the XLA path")


def uses_vnni() -> bool:
    """Whether the built kernel took its AVX-512 VNNI path (else the portable one); needs
    available()."""
    return bool(_library().XlaInferenceQuantizedMatmulVnni())


def wide_isa() -> str:
    """The wide entry's best path on this CPU, one of WIDE_ISAS: "amx" (AMX bfloat16 tiles,
    where the CPU has them and the kernel grants their state), "avx512_bf16" (vdpbf16ps) or
    "portable" (slow; callers then take XLA's product). Needs available()."""
    return WIDE_ISAS[_library().XlaInferenceQuantizedMatmulWideIsa()]


def wide_int8() -> bool:
    """Whether the wide entry's W8A8 calls (int8 activations, per-channel int8 weights) on
    the AVX-512 bfloat16 path multiply in int8 (vpdpbusd: AVX-512 VNNI), exactly, in place
    of bfloat16 products of the integers. Needs available()."""
    return bool(_library().XlaInferenceQuantizedMatmulWideInt8())


def _operand_as(a, dtypes):
    """a as the kernel reads it: in its own dtype where that is one of `dtypes`, any other
    widened to float32."""
    a = jnp.asarray(a)
    return a if a.dtype in dtypes else a.astype(jnp.float32)


def _group_operand(a):
    """Scales or offsets as the kernel reads them: float16 or float32 as stored, any other
    dtype (bfloat16) widened to float32."""
    return _operand_as(a, (jnp.float16, jnp.float32))


def _weight_operands(values, scales, offsets):
    if offsets is None:
        offsets = jnp.zeros((0,), jnp.float32)
    return values, _group_operand(scales), _group_operand(offsets)


def _output(rows: int, values) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((rows, values.shape[0] * ROWS_PER_TILE), jnp.float32)


def ffi_quantized_matmul(target: str, xq, x_scale, values, scales, offsets, *, bits: int,
                         group_size: int, zero_point: int = 0):
    """quantized_matmul through the FFI target `target` (a build of quantized_matmul.cc)."""
    call = jax.ffi.ffi_call(target, _output(xq.shape[0], values))
    return call(xq.astype(jnp.int16), x_scale.astype(jnp.float32),
                *_weight_operands(values, scales, offsets), bits=np.int64(bits),
                group_size=np.int64(group_size), zero_point=np.int64(zero_point))


def ffi_quantized_matmul_float(target: str, x, values, scales, offsets, *, bits: int,
                               group_size: int, levels: float, zero_point: int = 0):
    """quantized_matmul_float through the FFI target `target` (weights given by address: the
    multi entry's table form, the same bits)."""
    if isinstance(values, TableWeight):
        return _table_matmul(x, [(values, scales, offsets)], bits=bits, group_size=group_size,
                             levels=levels, zero_point=zero_point)[0]
    call = jax.ffi.ffi_call(target, _output(x.shape[0], values))
    return call(x.astype(jnp.float32), *_weight_operands(values, scales, offsets),
                bits=np.int64(bits), group_size=np.int64(group_size),
                zero_point=np.int64(zero_point), levels=np.float32(levels))


def quantized_matmul(xq, x_scale, values, scales, offsets, *, bits: int, group_size: int,
                     zero_point: int = 0):
    """y [T, out_padded] float32 for xq int16 [T, in] (|xq| <= 16383), x_scale [T], values
    int8 [out/16, in/2, 32] (bits=8) or uint8 [out/16, in/4, 32] (bits=4) in the tile
    layout, scales float16 or float32 [out/16, in/group_size, 16], offsets like scales (in
    either dtype) or None; group_size a multiple of 4 (8 bits: of 2) and at most 128;
    zero_point an integer in [-255, 255] subtracted from every weight value (0: none). Needs
    available(); usable inside jit."""
    return ffi_quantized_matmul(_TARGET, xq, x_scale, values, scales, offsets, bits=bits,
                                group_size=group_size, zero_point=zero_point)


def quantized_matmul_float(x, values, scales, offsets, *, bits: int, group_size: int,
                           levels: float, zero_point: int = 0):
    """quantized_matmul of x float32 [T, in], each row first quantized symmetrically to
    integers of at most `levels` (1..16383) as quantization/product.quantize_rows does:
    the same integers and scales, so the same y as quantized_matmul given those."""
    return ffi_quantized_matmul_float(_FLOAT_TARGET, x, values, scales, offsets, bits=bits,
                                      group_size=group_size, levels=levels,
                                      zero_point=zero_point)


@dataclasses.dataclass(frozen=True)
class Surroundings:
    """What a multi call does around its products in place of XLA's separate small passes:
    x RMS-normalized first (norm_weight [in], float32 or bfloat16, and norm_eps: x *
    rsqrt(mean(x^2) + eps) * weight per row, layers/norms.rms_norm for float32 x), and/or a
    residual [T, out] float32 added to its one output (out a multiple of ROWS_PER_TILE)."""

    norm_weight: object = None
    norm_eps: float = 0.0
    residual: object = None


_NONE_AROUND = Surroundings()


def _surrounding_operands(around: Surroundings):
    """The norm weight and residual operands (zero-size where the call has none) and the
    norm_eps attribute."""
    weight = (jnp.zeros((0,), jnp.float32) if around.norm_weight is None
              else _operand_as(around.norm_weight, (jnp.float32, jnp.bfloat16)))
    residual = (jnp.zeros((0, 0), jnp.float32) if around.residual is None
                else around.residual.astype(jnp.float32))
    return (weight, residual), np.float32(around.norm_eps)


def ffi_quantized_matmul_multi(target: str, x, weights, *, bits: int, group_size: int,
                               levels: float, zero_point: int = 0,
                               around: Surroundings = _NONE_AROUND):
    """quantized_matmul_multi through the FFI target `target` (or its table form, for
    weights given by address)."""
    if isinstance(weights[0][0], TableWeight):
        return _table_matmul(x, weights, bits=bits, group_size=group_size, levels=levels,
                             zero_point=zero_point, around=around)
    call = jax.ffi.ffi_call(target, [_output(x.shape[0], values) for values, _, _ in weights])
    operands = [a for values, scales, offsets in weights
                for a in _weight_operands(values, scales, offsets)]
    surrounding, norm_eps = _surrounding_operands(around)
    return list(call(x.astype(jnp.float32), *surrounding, *operands, bits=np.int64(bits),
                     group_size=np.int64(group_size), zero_point=np.int64(zero_point),
                     levels=np.float32(levels), norm_eps=norm_eps))


def quantized_matmul_multi(x, weights, *, bits: int, group_size: int, levels: float,
                           zero_point: int = 0, around: Surroundings = _NONE_AROUND):
    """[quantized_matmul_float(x, values, scales, offsets, ...) for each (values, scales,
    offsets) in `weights`], the same bits, in one call: x quantized once and the work of
    all the weights (which share bits, group_size, zero_point and in) shared out over the
    threads together. A layer's products that share their input (q, k, v; gate, up) take
    it: one launch instead of several, and at decode the weights together are enough work
    to wake a second thread where each alone is not. `around` adds an RMS norm of x before
    and a residual after (Surroundings), each in place of XLA's passes."""
    return ffi_quantized_matmul_multi(_MULTI_TARGET, x, weights, bits=bits,
                                      group_size=group_size, levels=levels,
                                      zero_point=zero_point, around=around)


# Weights named by address (the multi entry's table form): a program whose weights are
# TableWeights takes one small table array in place of three arrays a weight. Each array an
# XLA program takes costs the host's jit call ~1.5-3 us a step, and a 4-bit model has three
# a weight (benchmarks/RESULTS.md, 2026-12-04 second session: in a server the GGUF decode
# step's jit call was three quarters of the engine thread's time, taken from the spare core).
# quantization/weight_table.py builds the table from an engine's placed weights.
TABLE_COLUMNS = 7  # values, out/16, in, scales, scales are f16, offsets (0: none), offsets f16


@dataclasses.dataclass(frozen=True, eq=False)
class TableWeight:
    """Stands for one of a weight's arrays (values, scales or offsets) in a program that
    takes the weight by address: row `row` of `table` (uint8 [rows, 8 * TABLE_COLUMNS]; its
    one pytree leaf, so that every jit inside the program takes the table as an argument,
    never as a value of an enclosing trace). Anything but this kernel's one-row entries that
    reads it as an array fails (TableWeightMisuse)."""

    row: int
    shape: tuple[int, ...]
    dtype: np.dtype
    table: object = None  # the table array, or None until weight_table.attach

    def _misuse(self, what: str):
        return TableWeightMisuse(f"weight table row {self.row} read as an array ({what}): only "
                                 "the native quantized kernel's one-row entries take weights "
                                 "by address")

    def __jax_array__(self):
        raise self._misuse("converted")

    def __getattr__(self, name: str):  # an array's attribute (reshape, astype, T, ...)
        if name.startswith("__"):
            raise AttributeError(name)
        raise self._misuse(f".{name}")


class TableWeightMisuse(AttributeError):
    """A TableWeight reached code that needs the array itself (an AttributeError, so that
    hasattr() on it stays False)."""


jax.tree_util.register_pytree_node(
    TableWeight, lambda w: ((w.table,), (w.row, w.shape, w.dtype)),
    lambda aux, children: TableWeight(*aux, children[0]))


def table_row(values, scales, offsets) -> tuple[np.ndarray, tuple]:
    """A weight's table row (int64 [TABLE_COLUMNS]) for its placed arrays on the host CPU
    (values [out/16, in/kc, 32], scales and offsets, offsets possibly None), and the arrays
    it names (scales or offsets of another dtype than float16 or float32 are a float32 copy):
    they must outlive every program that names them."""
    arrays = _weight_operands(values, scales, offsets)
    values, scales, offsets = arrays
    kc = 2 if values.dtype == jnp.int8 else 4

    def address(a):
        return a.unsafe_buffer_pointer() if a.size else 0

    row = np.array([address(values), values.shape[0], values.shape[1] * kc, address(scales),
                    int(scales.dtype == jnp.float16), address(offsets),
                    int(offsets.dtype == jnp.float16)], np.int64)
    return row, arrays


def _table_matmul(x, weights, *, bits: int, group_size: int, levels: float, zero_point: int,
                  around: Surroundings = _NONE_AROUND):
    """The multi entry's product for weights given as (values, scales, offsets) TableWeights
    of one table."""
    table = weights[0][0].table
    if table is None:
        raise TableWeightMisuse("TableWeights without their table (weight_table.attach)")
    call = jax.ffi.ffi_call(_TABLE_TARGET, [_output(x.shape[0], values)
                                            for values, _, _ in weights])
    rows = np.array([values.row for values, _, _ in weights], np.int64)
    surrounding, norm_eps = _surrounding_operands(around)
    return list(call(x.astype(jnp.float32), table, *surrounding, bits=np.int64(bits),
                     group_size=np.int64(group_size), zero_point=np.int64(zero_point),
                     levels=np.float32(levels), rows=rows, norm_eps=norm_eps))


def quantized_matmul_wide(x, values, scales, offsets, *, bits: int, group_size: int,
                          zero_point: int = 0, int8_levels: float = 0.0,
                          isa: str = "amx"):
    """The product for wide steps (many rows: prefill, large batches), in bfloat16 products
    summed in float32 as XLA's product on the bfloat16-dequantized weight would be: each
    weight tile is dequantized once per call into a cache-resident scratch and multiplied
    by every row (AMX or AVX-512 bfloat16, kernels/cpu/quantized_matmul.cc).

    Weight-only formats (int8_levels=0): x [T, in] (float32 or bfloat16) rounded to
    bfloat16, times
    w = bfloat16((q - zero_point) * scale + offset). int8_levels > 0 (at most 256; W8A8: 127,
    whose weights have one scale per channel, repeated over its groups, and no offsets):
    each row quantized to integers as quantize_rows does, times the weight's integers, both
    exact in bfloat16, scaled by the row's and the channel's scale. Operands as for
    quantized_matmul_float; `isa` caps the path (WIDE_ISAS; the best one this CPU has below
    it is taken). Returns float32 [T, out_padded]."""
    if int8_levels and offsets is not None:
        raise ValueError("quantized_matmul_wide: int8 activations take per-channel scales "
                         "and no offsets")
    # Weight-only: x goes in as bfloat16 (the same rounding), converted by XLA where it fuses
    # with x's producer (and is shared by the products of one x), not on the calling thread.
    x = x.astype(jnp.float32 if int8_levels else jnp.bfloat16)
    call = jax.ffi.ffi_call(_WIDE_TARGET, _output(x.shape[0], values))
    return call(x, *_weight_operands(values, scales, offsets),
                bits=np.int64(bits), group_size=np.int64(group_size),
                zero_point=np.int64(zero_point), levels=np.float32(int8_levels),
                scale_after=np.int64(1 if int8_levels else 0),
                isa=np.int64(WIDE_ISAS.index(isa)))
