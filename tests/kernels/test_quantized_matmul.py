"""The native CPU quantized matrix product (kernels/cpu_quantized.py) against a float64 numpy
reference of its formula, on random group-quantized weights: int4 with and without offsets,
int8 symmetric, groups of 16 to 128, T of 1 to 13 (more than one tile of 8 rows), out not a
multiple of 16. The weights are packed into the tile layout by this file's own packer, written
from the layout's definition (quantization/packed.py has the production one), so the test also
checks the layout contract. The VNNI and portable builds, one thread and many, a row of T alone
and in a batch, scales and offsets stored as float16 or float32 (values that are float16s):
all give the same bits. A zero point in place of offsets matches the reference too. The float
entry, which quantizes x itself, gives the bits of the int16
entry given quantization/product.quantize_rows' integers; the multi-weight entry gives each
weight's bits of the float entry."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import call_until_spare_core_counts, spare_core_off, spare_core_testing_build
from xla_inference.kernels import cpu_quantized, native
from xla_inference.quantization import product
from xla_inference.quantization.groups import INT4, GroupQuant
from xla_inference.quantization.packed import pack
from xla_inference.quantization.product import quantize_rows

ROWS = 16


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """q [out, in] (out a multiple of 16) into the tile layout, element by element of its
    definition: 8-bit values[ot, c, 2r+j] = q[16ot+r, 2c+j]; 4-bit values[ot, c, 2r+j] =
    q[16ot+r, 4c+j] | q[16ot+r, 4c+2+j] << 4."""
    out, n = q.shape
    per_chunk = 2 if bits == 8 else 4
    values = np.zeros((out // ROWS, n // per_chunk, 32), np.int8 if bits == 8 else np.uint8)
    for r in range(ROWS):
        rows = q[r::ROWS]  # row 16*ot + r for every ot
        for j in range(2):
            if bits == 8:
                values[:, :, 2 * r + j] = rows[:, j::2]
            else:
                values[:, :, 2 * r + j] = rows[:, j::4] | (rows[:, 2 + j::4] << 4)
    return values


def _pack_groups(g: np.ndarray) -> np.ndarray:
    """Per-group scales or offsets [out, G] into [out/16, G, 16]."""
    out, groups = g.shape
    return np.ascontiguousarray(g.reshape(out // ROWS, ROWS, groups).transpose(0, 2, 1))


def _pad_rows(a: np.ndarray, out_padded: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((out_padded - a.shape[0], *a.shape[1:]), a.dtype)])


def _random_weight(rng, out, n, bits, group_size, with_offsets, half_values=False):
    """GroupQuant-like: q [out, in] (uint8 0..15 for int4, int8), scales and offsets [out, G]
    float32 (half_values: each a float16 value, so that float16 holds them exactly)."""
    groups = n // group_size
    if bits == 4:
        q = rng.integers(0, 16, (out, n)).astype(np.uint8)
    else:
        q = rng.integers(-128, 128, (out, n)).astype(np.int8)
    scales = rng.uniform(0.5, 2.0, (out, groups)).astype(np.float32) * 1e-3
    offsets = (rng.uniform(-8, 0, (out, groups)).astype(np.float32) * 1e-3
               if with_offsets else None)
    if half_values:
        scales = scales.astype(np.float16).astype(np.float32)
        offsets = None if offsets is None else offsets.astype(np.float16).astype(np.float32)
    return q, scales, offsets


def _kernel_operands(q, scales, offsets, bits, scales_dtype=np.float32,
                     offsets_dtype=np.float32):
    """The kernel's operands for the weight, padded to a multiple of 16 rows, scales and
    offsets stored in the dtypes given."""
    out_padded = -(-q.shape[0] // ROWS) * ROWS
    values = _pack(_pad_rows(q, out_padded), bits)
    packed_scales = _pack_groups(_pad_rows(scales, out_padded)).astype(scales_dtype)
    packed_offsets = (None if offsets is None else
                      _pack_groups(_pad_rows(offsets, out_padded)).astype(offsets_dtype))
    return values, packed_scales, packed_offsets


def _random_activations(rng, T, n):
    xq = rng.integers(-16383, 16384, (T, n)).astype(np.int16)
    x_scale = rng.uniform(0.5, 2.0, T).astype(np.float32) / 16383
    return xq, x_scale


def _reference(xq, x_scale, q, scales, offsets, group_size, zero_point=0):
    """y and the sum of the terms' magnitudes (the scale of float32 rounding), float64."""
    T, n = xq.shape
    groups = n // group_size
    x = xq.astype(np.float64).reshape(T, groups, group_size)
    w = q.astype(np.float64).reshape(q.shape[0], groups, group_size) - zero_point
    S = np.einsum("tgk,ogk->tog", x, w)  # exact: integers below 2^53
    terms = S * scales.astype(np.float64)[None]
    magnitude = np.abs(terms)
    if offsets is not None:
        offset_terms = x.sum(-1)[:, None, :] * offsets.astype(np.float64)[None]
        terms = terms + offset_terms
        magnitude = magnitude + np.abs(offset_terms)
    xs = x_scale.astype(np.float64)[:, None]
    return xs * terms.sum(-1), xs * magnitude.sum(-1)


def _run(xq, x_scale, values, scales, offsets, bits, group_size, zero_point=0):
    return np.asarray(cpu_quantized.quantized_matmul(
        jnp.asarray(xq), jnp.asarray(x_scale), jnp.asarray(values), jnp.asarray(scales),
        None if offsets is None else jnp.asarray(offsets), bits=bits, group_size=group_size,
        zero_point=zero_point))


def _check(y, xq, x_scale, q, scales, offsets, group_size, zero_point=0):
    out = q.shape[0]
    ref, magnitude = _reference(xq, x_scale, q, scales, offsets, group_size, zero_point)
    assert y.shape == (xq.shape[0], -(-out // ROWS) * ROWS)
    assert np.all(np.abs(y[:, :out] - ref) <= 1e-5 * magnitude + 1e-30)
    np.testing.assert_array_equal(y[:, out:], 0.0)  # padding rows: zero scales


@pytest.fixture(scope="module", autouse=True)
def _needs_kernel():
    assert cpu_quantized.available(), "the native CPU quantized kernel did not build"


CASES = [(4, True), (4, False), (8, False)]  # (bits, offsets): int4 zero-point, int4, int8


@pytest.mark.parametrize("bits,with_offsets", CASES)
@pytest.mark.parametrize("group_size", [16, 32, 64, 128])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 8, 13])
def test_matches_float64(bits, with_offsets, group_size, T):
    rng = np.random.default_rng([bits, group_size, T, with_offsets])
    out, n = 200, 512
    q, scales, offsets = _random_weight(rng, out, n, bits, group_size, with_offsets)
    values, packed_scales, packed_offsets = _kernel_operands(q, scales, offsets, bits)
    xq, x_scale = _random_activations(rng, T, n)
    y = _run(xq, x_scale, values, packed_scales, packed_offsets, bits, group_size)
    _check(y, xq, x_scale, q, scales, offsets, group_size)


# (scales, offsets) stored as: float16 both, float16 scales with float32 offsets, the reverse
HALF_STORAGE = [(np.float16, np.float16), (np.float16, np.float32), (np.float32, np.float16)]


@pytest.mark.parametrize("scales_dtype,offsets_dtype", HALF_STORAGE)
@pytest.mark.parametrize("bits,with_offsets", CASES)
@pytest.mark.parametrize("T", [1, 3, 13])
def test_half_scales_give_the_bits_of_float_scales(bits, with_offsets, T, scales_dtype,
                                                   offsets_dtype):
    """Scales and offsets that are float16 values, stored as float16: the kernel widens
    them exactly, so the output is that of the same values stored as float32."""
    rng = np.random.default_rng([bits, T, with_offsets, 16])
    q, scales, offsets = _random_weight(rng, 200, 384, bits, 32, with_offsets, half_values=True)
    xq, x_scale = _random_activations(rng, T, 384)
    half = _kernel_operands(q, scales, offsets, bits, scales_dtype, offsets_dtype)
    assert half[1].dtype == scales_dtype
    y = _run(xq, x_scale, *half, bits, 32)
    _check(y, xq, x_scale, q, scales, offsets, 32)
    full = _run(xq, x_scale, *_kernel_operands(q, scales, offsets, bits), bits, 32)
    np.testing.assert_array_equal(y, full)


def test_half_subnormal_and_large_scales_are_exact():
    """float16 subnormals (GGUF's tiny block scales) and values near float16's largest."""
    rng = np.random.default_rng(5)
    q, _, _ = _random_weight(rng, 32, 128, 4, 32, False)
    groups = (32, 4)
    scales = rng.choice(np.array([2.0**-24, 3 * 2.0**-20, 1023 * 2.0**-24, 6.0e4, 1.0],
                                 np.float32), groups)
    offsets = -rng.choice(np.array([2.0**-24, 65504.0, 0.0], np.float32), groups)
    xq, x_scale = _random_activations(rng, 2, 128)
    half = _kernel_operands(q, scales, offsets, 4, np.float16, np.float16)
    full = _kernel_operands(q, scales, offsets, 4)
    np.testing.assert_array_equal(half[1].astype(np.float32), full[1])  # exact in float16
    np.testing.assert_array_equal(half[2].astype(np.float32), full[2])
    y = _run(xq, x_scale, *half, 4, 32)
    np.testing.assert_array_equal(y, _run(xq, x_scale, *full, 4, 32))
    _check(y, xq, x_scale, q, scales, offsets, 32)


@pytest.mark.parametrize("bits,zero_point", [(4, 8), (4, 15), (8, -128), (8, 255)])
@pytest.mark.parametrize("T", [1, 3, 13])
def test_zero_point_matches_float64(bits, zero_point, T):
    """A zero point z (q - z times the scale), as a symmetric format's offsets -z * scale,
    by the VNNI and the portable builds (the same bits)."""
    rng = np.random.default_rng([bits, abs(zero_point), T])
    q, scales, _ = _random_weight(rng, 72, 384, bits, 32, False)
    operands = _kernel_operands(q, scales, None, bits)
    xq, x_scale = _random_activations(rng, T, 384)
    y = _run(xq, x_scale, *operands, bits, 32, zero_point)
    _check(y, xq, x_scale, q, scales, None, 32, zero_point)
    _portable_library()
    portable = cpu_quantized.ffi_quantized_matmul(
        _PORTABLE, jnp.asarray(xq), jnp.asarray(x_scale), *operands, bits=bits, group_size=32,
        zero_point=zero_point)
    np.testing.assert_array_equal(np.asarray(portable), y)
    x = rng.standard_normal((T, 384)).astype(np.float32)
    xq, x_scale = (np.asarray(a) for a in jax.jit(quantize_rows, static_argnums=1)(x, 16383.0))
    np.testing.assert_array_equal(_run_float(x, operands, bits, 32, 16383, zero_point),
                                  _run(xq, x_scale, *operands, bits, 32, zero_point))


@pytest.mark.parametrize("bits,with_offsets", CASES)
def test_extremes_do_not_overflow(bits, with_offsets):
    """Every product at its largest magnitude, over the largest group (128)."""
    out, n, group_size = 16, 256, 128
    q = np.full((out, n), 15 if bits == 4 else -128, np.uint8 if bits == 4 else np.int8)
    scales = np.ones((out, n // group_size), np.float32)
    offsets = -scales if with_offsets else None
    xq = np.full((2, n), 16383, np.int16)
    xq[1] = -16383
    x_scale = np.ones(2, np.float32)
    values, packed_scales, packed_offsets = _kernel_operands(q, scales, offsets, bits)
    y = _run(xq, x_scale, values, packed_scales, packed_offsets, bits, group_size)
    _check(y, xq, x_scale, q, scales, offsets, group_size)
    zero_point = -255 if bits == 4 else 255  # the largest |q - z|
    y = _run(xq, x_scale, values, packed_scales, packed_offsets, bits, group_size, zero_point)
    _check(y, xq, x_scale, q, scales, offsets, group_size, zero_point)


def test_rows_alone_equal_rows_in_a_batch():
    """Row t of T = 13 (second tile of 8 rows) gives the same bits computed alone."""
    rng = np.random.default_rng(1)
    q, scales, offsets = _random_weight(rng, 100, 256, 4, 32, True)
    operands = _kernel_operands(q, scales, offsets, 4)
    xq, x_scale = _random_activations(rng, 13, 256)
    batch = _run(xq, x_scale, *operands, 4, 32)
    for t in (0, 5, 9, 12):
        alone = _run(xq[t:t + 1], x_scale[t:t + 1], *operands, 4, 32)
        np.testing.assert_array_equal(alone[0], batch[t])


_PORTABLE = "xla_inference_quantized_matmul_portable"


_PORTABLE_FLOAT = "xla_inference_quantized_matmul_portable_float"


@functools.cache
def _portable_library():
    return native.load_targets(
        cpu_quantized._SOURCE, {_PORTABLE: cpu_quantized._SYMBOL,
                                _PORTABLE_FLOAT: cpu_quantized._FLOAT_SYMBOL},
        (*native.DEFAULT_FLAGS, "-DXLA_INFERENCE_QMM_PORTABLE"))


@pytest.mark.parametrize("group_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bits,with_offsets", CASES)
def test_portable_build_gives_the_same_bits(bits, with_offsets, group_dtype):
    """The C++ fallback (built with XLA_INFERENCE_QMM_PORTABLE, as on CPUs without VNNI),
    its scales and offsets stored as float32 or float16 (widened by bit operations)."""
    assert _portable_library().XlaInferenceQuantizedMatmulVnni() == 0
    rng = np.random.default_rng(bits)
    q, scales, offsets = _random_weight(rng, 72, 384, bits, 64, with_offsets, half_values=True)
    operands = _kernel_operands(q, scales, offsets, bits, group_dtype, group_dtype)
    xq, x_scale = _random_activations(rng, 11, 384)
    portable = np.asarray(cpu_quantized.ffi_quantized_matmul(
        _PORTABLE, jnp.asarray(xq), jnp.asarray(x_scale),
        *(None if a is None else jnp.asarray(a) for a in operands), bits=bits, group_size=64))
    _check(portable, xq, x_scale, q, scales, offsets, 64)
    np.testing.assert_array_equal(portable, _run(xq, x_scale, *operands, bits, 64))
    x = rng.standard_normal((5, 384)).astype(np.float32)
    portable_float = cpu_quantized.ffi_quantized_matmul_float(
        _PORTABLE_FLOAT, jnp.asarray(x), *operands, bits=bits, group_size=64, levels=16383)
    np.testing.assert_array_equal(np.asarray(portable_float),
                                  _run_float(x, operands, bits, 64, 16383))


_AVX2 = "xla_inference_quantized_matmul_avx2"
_AVX2_FLOAT = "xla_inference_quantized_matmul_avx2_float"


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split())


@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= _cpu_flags(), reason="no AVX2/FMA/F16C")
@pytest.mark.parametrize("zero_point", [0, 8])
@pytest.mark.parametrize("bits,with_offsets", CASES)
def test_avx2_build_gives_the_portable_bits(bits, with_offsets, zero_point):
    """The AVX2 path (CPUs without AVX-512 VNNI; built with XLA_INFERENCE_QMM_NO_VNNI so
    that a VNNI CPU runs it too): the portable build's bits for 1 to 11 rows of T (its
    blocks of 1-4 rows, 2 tiles side by side at T = 1 and an odd tile left, and the 4-bit
    one-row path that splits x into bytes), groups of 16 to 128 (the split path's int16
    sums widened every 4 chunks, or at a group's end), float16 and float32 group arrays,
    every product at its largest magnitude, and its float entry's row quantization."""
    library = native.load_targets(
        cpu_quantized._SOURCE, {_AVX2: cpu_quantized._SYMBOL,
                                _AVX2_FLOAT: cpu_quantized._FLOAT_SYMBOL},
        (*native.DEFAULT_FLAGS, "-DXLA_INFERENCE_QMM_NO_VNNI"))
    assert library.XlaInferenceQuantizedMatmulAvx2() == 1
    _portable_library()
    rng = np.random.default_rng([bits, zero_point, int(with_offsets)])
    for group_size in (16, 64, 128):
        q, scales, offsets = _random_weight(rng, 72, 384, bits, group_size, with_offsets,
                                            half_values=True)
        for group_dtype in (np.float16, np.float32):
            operands = [None if a is None else jnp.asarray(a) for a in _kernel_operands(
                q, scales, offsets, bits, group_dtype, group_dtype)]
            for T in (1, 2, 5, 11):
                xq, x_scale = _random_activations(rng, T, 384)
                if T == 1 and group_dtype == np.float32:
                    xq[0, ::2], xq[0, 1::2] = 16383, -16383  # xq's extremes, split in bytes
                _assert_same_bits(_AVX2, _PORTABLE, jnp.asarray(xq), jnp.asarray(x_scale),
                                  *operands, bits=bits, group_size=group_size,
                                  zero_point=zero_point)
            for T in (1, 3):
                x = jnp.asarray(rng.standard_normal((T, 384)).astype(np.float32))
                _assert_same_bits(_AVX2_FLOAT, _PORTABLE_FLOAT, x, *operands, bits=bits,
                                  group_size=group_size, levels=16383, zero_point=zero_point)
    extreme = np.full((16, 256), 15 if bits == 4 else -128, np.uint8 if bits == 4 else np.int8)
    ones = np.ones((16, 2), np.float32)
    operands = [None if a is None else jnp.asarray(a) for a in _kernel_operands(
        extreme, ones, -ones if with_offsets else None, bits)]
    for sign in (1, -1):
        xq = jnp.full((1, 256), sign * 16383, jnp.int16)
        _assert_same_bits(_AVX2, _PORTABLE, xq, jnp.ones(1, jnp.float32), *operands,
                          bits=bits, group_size=128, zero_point=zero_point)


def _assert_same_bits(target, reference, *operands, **attributes):
    entry = (cpu_quantized.ffi_quantized_matmul_float if "levels" in attributes
             else cpu_quantized.ffi_quantized_matmul)
    got, want = (np.asarray(entry(name, *operands, **attributes)) for name in (target, reference))
    np.testing.assert_array_equal(got, want)


def _run_float(x, operands, bits, group_size, levels, zero_point=0):
    return np.asarray(jax.jit(
        lambda x, *w: cpu_quantized.quantized_matmul_float(
            x, *w, bits=bits, group_size=group_size, levels=levels, zero_point=zero_point)
    )(jnp.asarray(x), *operands))


@pytest.mark.parametrize("levels", [16383.0, 127.0])
@pytest.mark.parametrize("bits,with_offsets", CASES)
@pytest.mark.parametrize("T", [1, 4, 9])
def test_float_entry_quantizes_as_quantize_rows(bits, with_offsets, T, levels):
    """The float32 entry gives the bits of quantize_rows (run by XLA) then the int16 entry,
    rows of every magnitude and a zero row included."""
    rng = np.random.default_rng([bits, T, int(levels)])
    q, scales, offsets = _random_weight(rng, 100, 256, bits, 32, with_offsets)
    operands = _kernel_operands(q, scales, offsets, bits)
    x = (rng.standard_normal((T, 256)) * 10.0 ** rng.integers(-6, 6, (T, 1))).astype(np.float32)
    if T > 1:
        x[1] = 0.0
    xq, x_scale = (np.asarray(a) for a in jax.jit(quantize_rows, static_argnums=1)(x, levels))
    np.testing.assert_array_equal(_run_float(x, operands, bits, 32, levels),
                                  _run(xq, x_scale, *operands, bits, 32))


@pytest.mark.parametrize("levels", [127.0, 16383.0])
@pytest.mark.parametrize("bits", [4, 8])
def test_float_entry_odd_width(bits, levels):
    """Rows 200 wide (not a multiple of the vector quantization's 16: its scalar tail), the
    largest magnitude in the tail: still quantize_rows' bits."""
    rng = np.random.default_rng([bits, int(levels), 200])
    q, scales, offsets = _random_weight(rng, 48, 200, bits, 40, True)
    operands = _kernel_operands(q, scales, offsets, bits)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    x[0, -1] = -50.0
    xq, x_scale = (np.asarray(a) for a in jax.jit(quantize_rows, static_argnums=1)(x, levels))
    np.testing.assert_array_equal(_run_float(x, operands, bits, 40, levels),
                                  _run(xq, x_scale, *operands, bits, 40))


def test_inside_jit():
    """Quantizing the activations per row and the product, in one jitted function."""
    rng = np.random.default_rng(7)
    q, scales, offsets = _random_weight(rng, 48, 256, 4, 32, True)
    values, packed_scales, packed_offsets = _kernel_operands(q, scales, offsets, 4)
    x = rng.standard_normal((5, 256)).astype(np.float32)

    @jax.jit
    def product(x, values, scales, offsets):
        x_scale = jnp.max(jnp.abs(x), axis=1) / 16383
        xq = jnp.round(x / x_scale[:, None]).astype(jnp.int16)
        y = cpu_quantized.quantized_matmul(xq, x_scale, values, scales, offsets, bits=4,
                                           group_size=32)
        return y, xq, x_scale

    args = (x, values, packed_scales, packed_offsets)
    assert "xla_inference_quantized_matmul" in product.lower(*args).as_text()
    y, xq, x_scale = (np.asarray(a) for a in product(*args))
    _check(y, xq, x_scale, q, scales, offsets, 32)
    y_float = _run_float(x, (values, packed_scales, packed_offsets), 4, 32, 16383)
    # and within the rounding of x to int16 of the float product with the dequantized weight
    w = q.astype(np.float64) * np.repeat(scales, 32, 1) + np.repeat(offsets, 32, 1)
    rounding = 0.5 * x_scale[:, None] * np.abs(w).sum(1)[None]
    assert np.all(np.abs(y[:, :48] - x @ w.T) <= rounding * (1 + 1e-4))
    assert np.all(np.abs(y_float[:, :48] - x @ w.T) <= rounding * (1 + 1e-4))


def test_bad_operands_are_refused():
    rng = np.random.default_rng(3)
    q, scales, offsets = _random_weight(rng, 16, 256, 8, 32, False)
    values, packed_scales, _ = _kernel_operands(q, scales, offsets, 8)
    xq, x_scale = _random_activations(rng, 2, 256)
    with pytest.raises(Exception, match="quantized_matmul"):
        _run(xq, x_scale, values, packed_scales, None, 4, 32)  # int8 values read as 4-bit
    with pytest.raises(Exception, match="quantized_matmul"):
        _run(xq, x_scale, values, packed_scales, None, 8, 64)  # scales for groups of 32
    with pytest.raises(Exception, match="zero_point"):
        _run(xq, x_scale, values, packed_scales, None, 8, 32, 256)  # could overflow int32


# ------------------------------------------------------------------ the multi-weight entry
# (quantized_matmul_multi: several weights times one x, x quantized once, one call)

def _run_multi(x, weights, bits, group_size, levels, zero_point=0,
               around=cpu_quantized.Surroundings()):
    ys = jax.jit(lambda x, ws: cpu_quantized.quantized_matmul_multi(
        x, ws, bits=bits, group_size=group_size, levels=levels, zero_point=zero_point,
        around=around))(
        jnp.asarray(x), [tuple(None if a is None else jnp.asarray(a) for a in w)
                         for w in weights])
    return [np.asarray(y) for y in ys]


@pytest.mark.parametrize("bits,with_offsets,zero_point",
                         [(4, True, 0), (4, False, 0), (8, False, 0), (4, False, 8)])
@pytest.mark.parametrize("T", [1, 3, 13])
def test_multi_entry_gives_each_weights_bits(bits, with_offsets, zero_point, T):
    """Three weights of different widths (one not a multiple of 16) times one x: each output
    is the one-weight float entry's bits, and within float32 rounding of the float64
    reference on quantize_rows' integers. With offsets, the middle weight has none (the
    group sums are taken once for the weights that read them)."""
    rng = np.random.default_rng([bits, T, zero_point])
    weights = [_random_weight(rng, out, 256, bits, 32, with_offsets and i != 1)
               for i, out in enumerate((48, 23, 100))]
    operands = [_kernel_operands(*w, bits) for w in weights]
    x = rng.standard_normal((T, 256)).astype(np.float32)
    ys = _run_multi(x, operands, bits, 32, 16383.0, zero_point)
    xq, x_scale = (np.asarray(a) for a in jax.jit(quantize_rows, static_argnums=1)(x, 16383.0))
    for y, w, ops in zip(ys, weights, operands):
        np.testing.assert_array_equal(y, _run_float(x, ops, bits, 32, 16383.0, zero_point))
        _check(y, xq, x_scale, *w, 32, zero_point)


def test_multi_entry_with_pool_threads_gives_the_same_bits():
    """Weights of 2.5 MB together (pool threads woken for them, none for each alone at
    T = 1) and int8 activation levels: still each weight's own bits."""
    rng = np.random.default_rng(5)
    weights = [_random_weight(rng, out, 1024, 4, 32, True) for out in (2048, 2048, 1024)]
    operands = [_kernel_operands(*w, 4) for w in weights]
    x = rng.standard_normal((1, 1024)).astype(np.float32)
    for y, ops in zip(_run_multi(x, operands, 4, 32, 127.0), operands):
        np.testing.assert_array_equal(y, _run_float(x, ops, 4, 32, 127.0))


def test_multi_entry_refuses_mismatched_weights():
    rng = np.random.default_rng(4)
    a = _kernel_operands(*_random_weight(rng, 16, 256, 4, 32, False), 4)
    b = _kernel_operands(*_random_weight(rng, 16, 128, 4, 32, False), 4)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(Exception, match="quantized_matmul"):
        _run_multi(x, [a, b], 4, 32, 16383.0)  # b's input width is not x's
    with pytest.raises(Exception, match="quantized_matmul"):
        _run_multi(x, [a, a], 8, 32, 16383.0)  # 4-bit values read as 8-bit


# ------------------------------------------------------------------ around the products
# (cpu_quantized.Surroundings: an RMS norm of x before, a residual added after)

def _rms_normed64(x, weight, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight.astype(np.float64)


@pytest.mark.parametrize("by_address", [False, True])
@pytest.mark.parametrize("T", [1, 4])
def test_a_residual_is_added_to_the_products_bits(by_address, T):
    """A residual added by the call gives the bits of the call's product plus the residual
    added afterwards (the same one float addition), passed weights or by address."""
    rng = np.random.default_rng([T, by_address])
    ops = _kernel_operands(*_random_weight(rng, 64, 256, 4, 32, True), 4)
    x = rng.standard_normal((T, 256)).astype(np.float32)
    residual = rng.standard_normal((T, 64)).astype(np.float32)
    run = _by_address if by_address else _run_multi
    plain = run(x, [ops], 4, 32, 16383.0)[0]
    around = cpu_quantized.Surroundings(residual=jnp.asarray(residual))
    np.testing.assert_array_equal(run(x, [ops], 4, 32, 16383.0, around=around)[0],
                                  plain + residual)


@pytest.mark.parametrize("norm_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("by_address", [False, True])
@pytest.mark.parametrize("T", [1, 3])
def test_an_rms_norm_before_the_products_matches_float64(norm_dtype, by_address, T):
    """Each weight times rms_norm(x) taken by the call: within the 15-bit activations' error
    of the float64 product of the normalized rows and the dequantized weights, and (nearly
    everywhere to the bit) XLA's rms_norm followed by the plain call."""
    from xla_inference.layers.norms import rms_norm

    rng = np.random.default_rng([T, by_address, norm_dtype == jnp.float32])
    weights = [_random_weight(rng, out, 256, 4, 32, True) for out in (48, 96)]
    operands = [_kernel_operands(*w, 4) for w in weights]
    x = (rng.standard_normal((T, 256)) * 3).astype(np.float32)
    norm_weight = jnp.asarray(rng.uniform(0.5, 1.5, 256), norm_dtype)
    around = cpu_quantized.Surroundings(norm_weight=norm_weight, norm_eps=1e-5)
    run = _by_address if by_address else _run_multi
    ys = run(x, operands, 4, 32, 16383.0, around=around)
    normed = np.asarray(jax.jit(rms_norm, static_argnums=2)(jnp.asarray(x), norm_weight, 1e-5))
    unfused = run(normed, operands, 4, 32, 16383.0)
    normed64 = _rms_normed64(x, np.asarray(norm_weight.astype(jnp.float32)), 1e-5)
    for y, want, w in zip(ys, unfused, weights):
        w64 = _dequantized(*w, 32)
        ref = normed64 @ w64.T
        bound = np.abs(normed64).max(-1, keepdims=True) / 16383 * np.abs(w64).sum(-1)
        assert np.all(np.abs(y[:, :ref.shape[1]] - ref) <= bound + 1e-5 * np.abs(ref))
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_surroundings_are_checked():
    """A residual for a call of two outputs, or a norm weight that is not x's width, is
    refused, naming the call."""
    rng = np.random.default_rng(11)
    ops = _kernel_operands(*_random_weight(rng, 16, 128, 4, 32, False), 4)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    residual = jnp.zeros((2, 16), jnp.float32)
    with pytest.raises(Exception, match="residual"):
        _run_multi(x, [ops, ops], 4, 32, 16383.0,
                   around=cpu_quantized.Surroundings(residual=residual))
    with pytest.raises(Exception, match="norm_weight"):
        _run_multi(x, [ops], 4, 32, 16383.0, around=cpu_quantized.Surroundings(
            norm_weight=jnp.ones((64,), jnp.float32), norm_eps=1e-6))


# ------------------------------------------------------------------ weights by address
# (the multi entry's table form: cpu_quantized.TableWeight rows of a weight table)

def _by_address(x, operands, bits, group_size, levels, zero_point=0,
                around=cpu_quantized.Surroundings()):
    """The multi entry's outputs with `operands` ((values, scales, offsets) each) named by
    their rows of a weight table, not passed: the arrays placed, kept alive here."""
    placed = [tuple(None if a is None else jnp.asarray(a) for a in w) for w in operands]
    rows, held = zip(*(cpu_quantized.table_row(*w) for w in placed))
    table = np.stack(rows).view(np.uint8).reshape(len(rows), -1)

    def step(x, table):
        refs = [tuple(None if a is None else cpu_quantized.TableWeight(i, a.shape, a.dtype, table)
                      for a in w) for i, w in enumerate(placed)]
        if len(refs) == 1 and around == cpu_quantized.Surroundings():  # the one-weight entry
            return [cpu_quantized.quantized_matmul_float(
                x, *refs[0], bits=bits, group_size=group_size, levels=levels,
                zero_point=zero_point)]
        return cpu_quantized.quantized_matmul_multi(
            x, refs, bits=bits, group_size=group_size, levels=levels, zero_point=zero_point,
            around=around)

    ys = [np.asarray(y) for y in jax.jit(step)(jnp.asarray(x), jnp.asarray(table))]
    del held  # what the rows point at, alive until the products are done
    return ys


@pytest.mark.parametrize("bits,with_offsets,zero_point,scales_dtype",
                         [(4, True, 0, np.float16), (4, False, 8, np.float32),
                          (8, False, 0, np.float32), (4, True, 0, np.float32)])
@pytest.mark.parametrize("T", [1, 5])
def test_weights_by_address_give_the_passed_weights_bits(bits, with_offsets, zero_point,
                                                         scales_dtype, T):
    """Weights named by their table rows (their addresses, shapes and scale dtypes) give the
    multi entry's bits for the same weights passed as arrays; one of them alone through
    quantized_matmul_float gives its bits too."""
    rng = np.random.default_rng([bits, T, zero_point])
    weights = [_random_weight(rng, out, 256, bits, 32, with_offsets and i != 1)
               for i, out in enumerate((48, 23, 100))]
    operands = [_kernel_operands(*w, bits, scales_dtype=scales_dtype) for w in weights]
    x = rng.standard_normal((T, 256)).astype(np.float32)
    passed = _run_multi(x, operands, bits, 32, 16383.0, zero_point)
    for y, want in zip(_by_address(x, operands, bits, 32, 16383.0, zero_point), passed):
        np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(
        _by_address(x, operands[2:], bits, 32, 16383.0, zero_point)[0], passed[2])


def test_weights_by_address_are_checked_against_x():
    """A table row whose input width is not x's, or a row outside the table, is refused; a
    TableWeight read as an array, or without its table, fails naming it."""
    rng = np.random.default_rng(9)
    a = _kernel_operands(*_random_weight(rng, 16, 128, 4, 32, False), 4)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(Exception, match="quantized_matmul_table"):
        _by_address(x, [a], 4, 32, 16383.0)
    ref = cpu_quantized.TableWeight(0, (1, 64, 32), np.dtype(np.uint8))
    with pytest.raises(cpu_quantized.TableWeightMisuse, match="row 0"):
        jnp.asarray(ref)
    with pytest.raises(cpu_quantized.TableWeightMisuse, match="without their table"):
        cpu_quantized.quantized_matmul_float(jnp.asarray(x), ref, ref, None, bits=4,
                                             group_size=32, levels=16383.0)


# A subprocess pinned to one CPU before JAX starts: runs the kernel on the operands saved in
# argv[1] and saves the output to argv[2].
_PINNED = textwrap.dedent("""
    import os, sys
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import jax, numpy as np
    from xla_inference.kernels import cpu_quantized
    assert cpu_quantized.available()
    a = dict(np.load(sys.argv[1]))
    y = cpu_quantized.quantized_matmul(a["xq"], a["x_scale"], a["values"], a["scales"],
                                       a["offsets"], bits=4, group_size=32)
    np.save(sys.argv[2], np.asarray(y))
""")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_output_is_the_same_on_one_thread(tmp_path):
    rng = np.random.default_rng(11)
    # 1 MB of weights times T = 9: many work items, and pool threads woken for them
    q, scales, offsets = _random_weight(rng, 2048, 1024, 4, 32, True)
    values, packed_scales, packed_offsets = _kernel_operands(q, scales, offsets, 4)
    xq, x_scale = _random_activations(rng, 9, 1024)
    np.savez(tmp_path / "in.npz", xq=xq, x_scale=x_scale, values=values, scales=packed_scales,
             offsets=packed_offsets)
    subprocess.run([sys.executable, "-c", _PINNED, tmp_path / "in.npz", tmp_path / "out.npy"],
                   check=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    here = _run(xq, x_scale, values, packed_scales, packed_offsets, 4, 32)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), here)


def test_a_bad_spare_core_setting_is_refused_not_taken_for_a_build_failure(monkeypatch):
    """XLA_INFERENCE_SPARE_CORE=yes fails naming the variable; it does not quietly send
    every quantized product through XLA's slower path as a kernel that did not build would."""
    monkeypatch.setenv("XLA_INFERENCE_SPARE_CORE", "yes")
    cpu_quantized.available.cache_clear()  # (its answer is kept once given)
    try:
        with pytest.raises(ValueError, match="XLA_INFERENCE_SPARE_CORE must be 0 or 1"):
            cpu_quantized.available()
    finally:
        cpu_quantized.available.cache_clear()


def test_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_CPU_QUANTIZED", "0")
    assert not cpu_quantized.available.__wrapped__()  # available() itself is cached
    monkeypatch.setenv("XLA_INFERENCE_CPU_QUANTIZED", "1")
    assert cpu_quantized.available.__wrapped__()


# ------------------------------------------------------------------ the wide entry
# (quantized_matmul_wide: bfloat16 products of x and the dequantized weight, float32 sums)

def _bfloat16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float64."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _dequantized(q, scales, offsets, group_size, zero_point=0):
    """w [out, in] float64 of the formula: (q - z) * scale + offset per group."""
    out, n = q.shape
    groups = n // group_size
    w = (q.astype(np.float64).reshape(out, groups, group_size) - zero_point) * scales[..., None]
    if offsets is not None:
        w = w + offsets.astype(np.float64)[..., None]
    return w.reshape(out, n)


def _check_wide(y, x, w, out):
    """y against the float64 product of x and w both rounded to bfloat16 (w through float32,
    as the kernel's FMA gives it): float32 summation error only; and against the float64
    product of the unrounded operands, to bfloat16's precision."""
    assert y.shape == (x.shape[0], -(-out // ROWS) * ROWS)
    magnitude = np.abs(x) @ np.abs(w).T
    exact = _bfloat16(x) @ _bfloat16(w.astype(np.float32)).T
    assert np.all(np.abs(y[:, :out] - exact) <= 1e-5 * magnitude + 1e-30)
    assert np.all(np.abs(y[:, :out] - x.astype(np.float64) @ w.T) <= 2 ** -7 * magnitude + 1e-30)
    np.testing.assert_array_equal(y[:, out:], 0.0)


def _run_wide(x, operands, bits, group_size, isa, zero_point=0, int8_levels=0.0):
    return np.asarray(jax.jit(
        lambda x, *w: cpu_quantized.quantized_matmul_wide(
            x, *w, bits=bits, group_size=group_size, zero_point=zero_point,
            int8_levels=int8_levels, isa=isa)
    )(jnp.asarray(x), *(None if a is None else jnp.asarray(a) for a in operands)))


def _isas():
    """Every path this machine has (each isa caps the entry's choice)."""
    best = cpu_quantized.WIDE_ISAS.index(cpu_quantized.wide_isa())
    return cpu_quantized.WIDE_ISAS[:best + 1]


def test_wide_path_is_the_cpus_best():
    """The run-time choice follows the CPU's flags (Linux lists AMX only where the kernel
    supports its state): AMX bfloat16 where there, else AVX-512 bfloat16, else portable."""
    flags = _cpu_flags()
    expected = ("amx" if {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags else
                "avx512_bf16" if {"avx512_bf16", "avx512bw"} <= flags else "portable")
    assert cpu_quantized.wide_isa() == expected


# (out, in, group size): out not a multiple of 16, in not a multiple of 32 (AMX's tile depth)
WIDE_SHAPES = [(40, 96, 32), (72, 72, 24), (16, 256, 128)]


@pytest.mark.parametrize("isa", cpu_quantized.WIDE_ISAS)
@pytest.mark.parametrize("bits,with_offsets", CASES)
@pytest.mark.parametrize("T", [1, 17, 32, 33, 64, 200])
def test_wide_matches_float64(bits, with_offsets, T, isa):
    if isa not in _isas():
        isa = _isas()[-1]  # the entry would take this one: still a check of it
    rng = np.random.default_rng([bits, T, len(isa)])
    for out, n, group_size in WIDE_SHAPES:
        q, scales, offsets = _random_weight(rng, out, n, bits, group_size, with_offsets)
        operands = _kernel_operands(q, scales, offsets, bits)
        x = (rng.standard_normal((T, n)) * 10.0 ** rng.integers(-3, 3, (T, 1))).astype(np.float32)
        y = _run_wide(x, operands, bits, group_size, isa)
        _check_wide(y, x, _dequantized(q, scales, offsets, group_size), out)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("rows", [2048, 1041])
def test_wide_many_rows(isa, rows):
    """2048 rows (a whole prefill chunk; 300 for the slow portable path) and 1041 (chunks of
    rows, the last one short and ending in a partial row tile): many row tiles, pool
    threads, float16 scales and offsets."""
    if isa == "portable" and rows != 2048:
        isa = _isas()[-1]
    rng = np.random.default_rng(rows)
    q, scales, offsets = _random_weight(rng, 200, 160, 4, 32, True)
    operands = _kernel_operands(q, scales, offsets, 4, np.float16, np.float16)
    scales = scales.astype(np.float16).astype(np.float32)
    offsets = offsets.astype(np.float16).astype(np.float32)
    x = rng.standard_normal((rows if isa != "portable" else 300, 160)).astype(np.float32)
    _check_wide(_run_wide(x, operands, 4, 32, isa), x,
                _dequantized(q, scales, offsets, 32), 200)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("bits,zero_point", [(4, 8), (8, -3)])
def test_wide_zero_point_and_half_scales(bits, zero_point, isa):
    rng = np.random.default_rng([bits, len(isa)])
    q, scales, _ = _random_weight(rng, 48, 128, bits, 64, False, half_values=True)
    operands = _kernel_operands(q, scales, None, bits, np.float16)
    x = rng.standard_normal((45, 128)).astype(np.float32)
    y = _run_wide(x, operands, bits, 64, isa, zero_point=zero_point)
    _check_wide(y, x, _dequantized(q, scales, None, 64, zero_point), 48)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("T", [33, 130])
def test_wide_int8_activations_are_exact_integers(T, isa):
    """W8A8 (per-channel int8 weights, int8 activations per row): the integer product, as
    XLA's int32 dot gives it, scaled by the row's and the channel's scale."""
    rng = np.random.default_rng([T, len(isa)])
    out, n = 40, 192
    q = rng.integers(-127, 128, (out, n)).astype(np.int8)
    channel = rng.uniform(0.5, 2.0, (out, 1)).astype(np.float32) * 1e-3
    scales = np.repeat(channel, n // 96, axis=1)  # groups of 96 with one scale per channel
    operands = _kernel_operands(q, scales, None, 8)
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[3] = 0.0
    xq, x_scale = (np.asarray(a, np.float64)
                   for a in jax.jit(quantize_rows, static_argnums=1)(x, 127.0))
    integers = xq @ q.astype(np.float64).T
    expected = integers * x_scale[:, None] * channel[:, 0].astype(np.float64)[None]
    y = _run_wide(x, operands, 8, 96, isa, int8_levels=127.0)
    np.testing.assert_allclose(y[:, :out], expected, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("isa", _isas())
def test_wide_int8_activations_odd_width(isa):
    """W8A8 rows whose width is not a multiple of 16 (the vector quantization's scalar tail)
    nor of 32 (zero-padded operand rows): the same integers as quantize_rows."""
    rng = np.random.default_rng([200, len(isa)])
    out, n = 32, 200
    q = rng.integers(-127, 128, (out, n)).astype(np.int8)
    channel = rng.uniform(0.5, 2.0, (out, 1)).astype(np.float32) * 1e-3
    operands = _kernel_operands(q, np.repeat(channel, 2, axis=1), None, 8)
    x = rng.standard_normal((37, n)).astype(np.float32)
    x[5, -3] = 40.0  # the row's largest magnitude in the tail
    xq, x_scale = (np.asarray(a, np.float64)
                   for a in jax.jit(quantize_rows, static_argnums=1)(x, 127.0))
    expected = (xq @ q.astype(np.float64).T) * x_scale[:, None] * channel[:, 0][None]
    y = _run_wide(x, operands, 8, 100, isa, int8_levels=127.0)
    np.testing.assert_allclose(y[:, :out], expected, rtol=1e-6, atol=1e-30)


def test_wide_int8_path_follows_the_cpu():
    """W8A8's integer path (vpdpbusd) wherever the AVX-512 bfloat16 path runs and the CPU
    has AVX-512 VNNI."""
    expected = cpu_quantized.wide_isa() != "portable" and "avx512_vnni" in _cpu_flags()
    assert cpu_quantized.wide_int8() == expected


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("T,n,out", [(41, 102, 24), (19, 4096, 16)])
def test_wide_int8_activations_long_and_odd_rows(T, n, out, isa):
    """W8A8 rows of an odd number of weight chunks (the integer path's last quad half
    empty) and of 4096 inputs (sums past 2^24, exact only in integers), rows of the
    largest magnitudes included: the integer product scaled, to float32's rounding (the
    bfloat16 products' float32 sums: to their summation error)."""
    rng = np.random.default_rng([T, n, len(isa)])
    q = rng.integers(-127, 128, (out, n)).astype(np.int8)
    q[0] = 127
    q[1] = -127
    channel = rng.uniform(0.5, 2.0, (out, 1)).astype(np.float32) * 1e-3
    group_size = min(n, 128)  # one scale a channel, repeated over its groups
    operands = _kernel_operands(q, np.repeat(channel, n // group_size, axis=1), None, 8)
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[0] = 1.0
    x[1] = -1.0
    xq, x_scale = (np.asarray(a, np.float64)
                   for a in jax.jit(quantize_rows, static_argnums=1)(x, 127.0))
    expected = (xq @ q.astype(np.float64).T) * x_scale[:, None] * channel[:, 0][None]
    y = _run_wide(x, operands, 8, group_size, isa, int8_levels=127.0)
    if isa != "avx512_bf16" or not cpu_quantized.wide_int8():  # float32 sums (AMX too)
        magnitude = np.abs(xq) @ np.abs(q.astype(np.float64)).T * x_scale[:, None]
        assert np.all(np.abs(y[:, :out] - expected) <= 2e-7 * n * magnitude * channel[:, 0])
    else:
        np.testing.assert_allclose(y[:, :out], expected, rtol=3e-7, atol=1e-30)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("T,n", [(50, 96), (50, 72), (16, 256)])
def test_wide_float32_x_is_bfloat16_x(T, n, isa):
    """The entry takes x in float32 (rounded to bfloat16 by the kernel) or bfloat16 (as
    quantized_matmul_wide hands it over; used in place where the width is a multiple of
    32): the same output, bit for bit."""
    rng = np.random.default_rng([T, n, len(isa)])
    q, scales, offsets = _random_weight(rng, 48, n, 4, 8, True)
    operands = [jnp.asarray(a) for a in _kernel_operands(q, scales, offsets, 4)]
    x = jnp.asarray(rng.standard_normal((T, n)), jnp.float32)

    def call(x):
        return jax.ffi.ffi_call(cpu_quantized._WIDE_TARGET,
                                jax.ShapeDtypeStruct((T, 48), jnp.float32))(
            x, *operands, bits=np.int64(4), group_size=np.int64(8), zero_point=np.int64(0),
            levels=np.float32(0.0), scale_after=np.int64(0),
            isa=np.int64(cpu_quantized.WIDE_ISAS.index(isa)))

    np.testing.assert_array_equal(np.asarray(jax.jit(call)(x)),
                                  np.asarray(jax.jit(call)(x.astype(jnp.bfloat16))))


def test_wide_refuses_offsets_with_int8_activations():
    rng = np.random.default_rng(5)
    q, scales, offsets = _random_weight(rng, 16, 64, 4, 32, True)
    with pytest.raises(ValueError, match="per-channel"):
        _run_wide(np.zeros((40, 64), np.float32), _kernel_operands(q, scales, offsets, 4), 4,
                  32, "amx", int8_levels=127.0)


def test_projection_takes_the_wide_entry_for_bfloat16_steps():
    """product.quantized_project: WIDE_KERNEL_MIN_ROWS rows or more of a bfloat16-compute
    weight run the wide entry where the CPU has AMX, and more than KERNEL_MAX_ROWS where it
    has AVX-512 bfloat16 (fewer: the narrow kernel; neither: XLA's product), with the numbers
    of the float64 product to bfloat16's precision."""
    rng = np.random.default_rng(9)
    q, scales, offsets = _random_weight(rng, 48, 192, 4, 32, True)
    weight = pack(GroupQuant(q, scales, offsets, INT4, 32), "bfloat16")
    narrow = jnp.zeros((product.WIDE_KERNEL_MIN_ROWS - 1, 192))
    hlo = jax.jit(product.quantized_project).lower(narrow, weight).as_text()
    assert "quantized_matmul_float" in hlo and "quantized_matmul_wide" not in hlo
    rows = product.KERNEL_MAX_ROWS + 1
    x = rng.standard_normal((rows, 192)).astype(np.float32)
    hlo = jax.jit(product.quantized_project).lower(jnp.asarray(x), weight).as_text()
    assert ("quantized_matmul_wide" in hlo) == (cpu_quantized.wide_isa() != "portable")
    y = np.asarray(jax.jit(product.quantized_project)(jnp.asarray(x), weight), np.float64)
    w = _dequantized(q, scales, offsets, 32)
    magnitude = np.abs(x) @ np.abs(w).T
    assert np.all(np.abs(y - x.astype(np.float64) @ w.T) <= 2 ** -7 * magnitude)


# ------------------------------------------------------------------ the spare core
# (kernels/cpu/spare_core.h: one-row products too short to wake the pool, shared with one
# helper thread that the caller takes items back from when it holds them too long)

@functools.cache
def _spare_testing():
    """The float and multi targets of the spare core's testing build, and its library."""
    name = "xla_inference_qmm_spare_testing"
    library = spare_core_testing_build(
        cpu_quantized._SOURCE, {name + "_float": cpu_quantized._FLOAT_SYMBOL,
                                name + "_multi": cpu_quantized._MULTI_SYMBOL})
    return name + "_float", name + "_multi", library


_DEFAULT_BUILD = (cpu_quantized._FLOAT_TARGET, cpu_quantized._MULTI_TARGET, None)


def _spare_operands(rng):
    """A decode step's gate/up pair and its down projection's shape class: 4-bit groups of
    32 with offsets (GGUF Q4_1's form), 0.44 MB each: the spare core's, not the pool's."""
    weights = [_random_weight(rng, 1536, 576, 4, 32, True) for _ in range(2)]
    return weights, [_kernel_operands(*w, 4) for w in weights]


def _float_and_multi(build, x, operands):
    float_target, multi_target, _ = build
    one = np.asarray(cpu_quantized.ffi_quantized_matmul_float(
        float_target, jnp.asarray(x), *operands[0], bits=4, group_size=32, levels=16383.0))
    many = cpu_quantized.ffi_quantized_matmul_multi(
        multi_target, jnp.asarray(x), [tuple(jnp.asarray(a) for a in ops) for ops in operands],
        bits=4, group_size=32, levels=16383.0)
    return [one, *(np.asarray(y) for y in many)]


def _until_counted(build, which, x, operands, expected):
    return call_until_spare_core_counts(build[2], which,
                                        lambda: _float_and_multi(build, x, operands), expected)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spare core needs 2 CPUs")
@pytest.mark.parametrize("T", [1, 3])
def test_spare_core_gives_the_bits_of_one_thread(T):
    """Items the helper computes (into its scratch, published by the caller) give the bits
    of the build without the spare core, which match the float64 reference."""
    rng = np.random.default_rng([31, T])
    weights, operands = _spare_operands(rng)
    x = rng.standard_normal((T, 576)).astype(np.float32)
    with spare_core_off(cpu_quantized._library()):
        expected = _float_and_multi(_DEFAULT_BUILD, x, operands)
    xq, x_scale = (np.asarray(a) for a in jax.jit(quantize_rows, static_argnums=1)(x, 16383.0))
    _check(expected[0], xq, x_scale, *weights[0], 32)
    _check(expected[2], xq, x_scale, *weights[1], 32)
    _until_counted(_spare_testing(), 0, x, operands, expected)
    # The default build (its helper at SCHED_IDLE) too, whether or not its helper ran.
    for got, want in zip(_float_and_multi(_DEFAULT_BUILD, x, operands), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spare core needs 2 CPUs")
def test_items_taken_back_from_the_helper_give_the_same_bits():
    """A helper that holds its items too long (paused 300 us in each, ten times the caller's
    patience) has them taken back and computed by the caller; the helper's late results go
    to the old call's scratch, never to a later call's outputs (every call's bits checked)."""
    rng = np.random.default_rng(32)
    _, operands = _spare_operands(rng)
    x = rng.standard_normal((1, 576)).astype(np.float32)
    with spare_core_off(cpu_quantized._library()):
        expected = _float_and_multi(_DEFAULT_BUILD, x, operands)
    library = _spare_testing()[2]
    library.XlaInferenceSpareCoreTestDelay(300)
    try:
        _until_counted(_spare_testing(), 1, x, operands, expected)
        for _ in range(5):  # calls while the helper still finishes taken-back items
            for got, want in zip(_float_and_multi(_spare_testing(), x, operands), expected):
                np.testing.assert_array_equal(got, want)
    finally:
        library.XlaInferenceSpareCoreTestDelay(0)
