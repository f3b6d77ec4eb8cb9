"""The device layout of quantized weights and the quantized product, against float64 numpy:
packing loses nothing (the dequantized weight is the GroupQuant's), and x times a packed
weight is x times the dequantized weight, through the native kernel (decode-sized rows) and
through XLA's dense product (prefill-sized rows), for every kind of weight the formats
produce. Scales and offsets that are float16 values are stored as float16, others as float32;
offsets that are -z * scale for one integer z become the zero point z where asked for."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from xla_inference.kernels import cpu_quantized
from xla_inference.quantization import product
from xla_inference.quantization.groups import (FP8, INT4, INT8, INT8_ACTIVATIONS, GroupQuant,
                                               regroup)
from xla_inference.quantization.online import quantize_per_channel
from xla_inference.quantization.packed import dequantize, kernel_group_size, pack
from xla_inference.quantization.product import quantized_project, quantized_project_many


def random_group_quant(kind, out, inp, group, *, offsets=True, seed=0, activations="float",
                       half_values=False, zero_point=None):
    """Random values, scales and offsets (half_values: scales and offsets that are float16
    values, as GPTQ's; otherwise float32 ones that float16 cannot hold; zero_point z:
    offsets -z * scale, as a symmetric format's)."""
    rng = np.random.default_rng(seed)
    groups = (out, inp // group)
    if kind == INT4:
        values = rng.integers(0, 16, (out, inp)).astype(np.uint8)
    elif kind == INT8:
        values = rng.integers(-128, 128, (out, inp)).astype(np.int8)
    else:
        values = (rng.standard_normal((out, inp)) * 50).astype(ml_dtypes.float8_e4m3fn)
    scales = rng.uniform(0.001, 0.02, groups).astype(np.float32)
    offs = rng.uniform(-0.1, 0.1, groups).astype(np.float32) if offsets else None
    if half_values:
        scales = scales.astype(np.float16).astype(np.float32)
        offs = None if offs is None else offs.astype(np.float16).astype(np.float32)
    if zero_point is not None:
        offs = np.float32(-zero_point) * scales
    return GroupQuant(values, scales, offs, kind, group, activations)


CASES = {  # name: (kind, out, in, group, offsets[, half_values[, zero_point]])
    "int4-g32-offsets": (INT4, 48, 128, 32, True),
    "int4-g32-offsets-half": (INT4, 48, 128, 32, True, True),  # float16 scales and offsets
    "int8-g32-half": (INT8, 40, 96, 32, False, True),
    "int4-g32-zero-point": (INT4, 40, 128, 32, True, True, 8),  # GPTQ symmetric
    "int8-g16-zero-point": (INT8, 16, 64, 16, True, True, -3),
    "int4-g128-sym": (INT4, 40, 256, 128, False),  # 40 rows: padded to 48
    "int4-g64-rows-not-16": (INT4, 23, 192, 64, True),
    "int8-per-channel": (INT8, 32, 192, 192, False),  # split into groups <= 128
    "int8-g16": (INT8, 16, 64, 16, False),  # GGUF Q6_K's sub-blocks
    "int8-g32-offsets": (INT8, 33, 96, 32, True),
    "fp8-per-channel": (FP8, 24, 64, 64, False),
    "fp8-block": (FP8, 24, 256, 128, False),
}


def case_weight(case, seed=0) -> GroupQuant:
    kind, out, inp, group, offsets, *extra = CASES[case]
    half = extra[0] if extra else False
    zero_point = extra[1] if len(extra) > 1 else None
    return random_group_quant(kind, out, inp, group, offsets=offsets, seed=seed,
                              half_values=half, zero_point=zero_point)


def case_packed(case, seed=0):
    """The case's weight packed, with a zero point where the case has one."""
    return pack(case_weight(case, seed), zero_point=True)


@pytest.mark.parametrize("case", CASES)
def test_pack_keeps_every_value(case):
    weight = case_weight(case)
    out, inp = weight.shape
    packed = case_packed(case)
    assert packed.zero_point == (CASES[case][6] if len(CASES[case]) > 6 else 0)
    assert packed.shape == (out, inp)
    np.testing.assert_array_equal(np.asarray(dequantize(packed, jnp.float32)),
                                  weight.dequantize(np.float32))


def test_packed_bytes_are_the_quantized_size():
    """4-bit: half a byte a weight plus the scales; 8-bit: a byte plus the scales; scales
    and offsets 2 bytes each where they are float16 values, else 4."""
    out, inp = 256, 512
    int4 = pack(random_group_quant(INT4, out, inp, 32))
    int8 = pack(random_group_quant(INT8, out, inp, inp, offsets=False))
    assert int4.values.nbytes == out * inp // 2
    assert int4.nbytes == out * inp // 2 + 2 * 4 * out * inp // 32
    assert int8.values.nbytes == out * inp
    assert int8.nbytes == out * inp + 4 * out * inp // 128  # groups split to 128
    # against bfloat16: 4-bit in groups of 32 with float32 scale and offset is 6 bits a weight
    assert int4.nbytes <= 0.375 * out * inp * 2 and int8.nbytes < 0.52 * out * inp * 2
    # with float16 scale and offset, 5 bits a weight
    int4_half = pack(random_group_quant(INT4, out, inp, 32, half_values=True))
    assert int4_half.scales.dtype == np.float16 and int4_half.offsets.dtype == np.float16
    assert int4_half.nbytes == out * inp // 2 + 2 * 2 * out * inp // 32 == 5 * out * inp // 8
    # and with offsets -8 * scale (symmetric), no offsets stored: 4.5 bits a weight
    int4_sym = pack(random_group_quant(INT4, out, inp, 32, half_values=True, zero_point=8),
                    zero_point=True)
    assert int4_sym.zero_point == 8 and int4_sym.offsets is None
    assert int4_sym.nbytes == 9 * out * inp // 16


def test_group_arrays_are_float16_only_where_exact():
    """Each of scales and offsets on its own: float16 if it holds every value, else float32
    (a GGUF Q4_K scale d * sc, a float16 times a 6-bit integer, often needs 17 bits)."""
    weight = random_group_quant(INT4, 32, 128, 32, half_values=True)
    d = np.float32(np.float16(0.0123))
    exact_scales = np.full_like(weight.scales, d * 32)  # times a power of two: exact
    inexact_offsets = np.full_like(weight.offsets, d * 63)  # 17 significant bits
    inexact_offsets[0, 0] = 1e-9  # and below float16's smallest subnormal
    assert np.float16(d * 63) != d * 63
    packed = pack(GroupQuant(weight.values, exact_scales, inexact_offsets, INT4, 32))
    assert packed.scales.dtype == np.float16 and packed.offsets.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(dequantize(packed, jnp.float32)),
                                  GroupQuant(weight.values, exact_scales, inexact_offsets,
                                             INT4, 32).dequantize(np.float32))
    beyond = np.full_like(weight.scales, 1e5)  # beyond float16's largest
    assert pack(GroupQuant(weight.values, beyond, None, INT4, 32)).scales.dtype == np.float32


def test_zero_point_only_where_every_offset_is_one():
    """Exactly -z * scale (float16 scales times a small integer are exact in float32); a
    float32 scale times 3 is rounded, and keeps its offsets."""
    weight = random_group_quant(INT4, 32, 128, 32, zero_point=3, half_values=True)
    packed = pack(weight, zero_point=True)
    assert packed.zero_point == 3 and packed.offsets is None
    assert pack(weight).zero_point == 0 and pack(weight).offsets is not None  # not asked for
    rounded = pack(random_group_quant(INT4, 32, 128, 32, zero_point=3), zero_point=True)
    assert rounded.offsets is not None
    weight.offsets[5, 2] *= 1.0 + 2**-10  # one group's offset off
    packed = pack(weight, zero_point=True)
    assert packed.zero_point == 0 and packed.offsets is not None
    np.testing.assert_array_equal(np.asarray(dequantize(packed, jnp.float32)),
                                  weight.dequantize(np.float32))
    zero = pack(random_group_quant(INT4, 32, 128, 32, zero_point=0), zero_point=True)
    assert zero.offsets is None and zero.zero_point == 0  # offsets all zero: dropped
    half_step = random_group_quant(INT4, 32, 128, 32, zero_point=0)
    half_step.offsets[:] = -7.5 * half_step.scales  # not an integer
    assert pack(half_step, zero_point=True).offsets is not None


def test_kernel_groups_split_evenly():
    assert kernel_group_size(576, 576, INT8) == 96
    assert kernel_group_size(32, 576, INT4) == 32
    assert kernel_group_size(256, 4096, INT4) == 128
    with pytest.raises(ValueError, match="cannot be split"):
        kernel_group_size(2, 6, INT4)


def test_regroup_is_exact():
    weight = random_group_quant(INT4, 16, 128, 64)
    np.testing.assert_array_equal(regroup(weight, 16).dequantize(), weight.dequantize())


def test_mismatched_scales_are_named():
    weight = random_group_quant(INT4, 16, 64, 32)
    with pytest.raises(ValueError, match=r"q_proj\.weight: scales have shape"):
        GroupQuant(weight.values, weight.scales[:, :1], None, INT4, 32, name="q_proj.weight")


def _reference(x, weight: GroupQuant):
    w = weight.dequantize(np.float64)
    x = np.asarray(x, np.float64)
    if weight.activations == INT8_ACTIVATIONS:  # the scheme's per-token int8 activations
        scale = np.abs(x).max(-1, keepdims=True) / 127
        x = np.clip(np.round(x / scale), -127, 127) * scale
    return x @ w.T


def _tolerance(rows, weight):
    """Kernel rows quantize the activations to 15 bits (relative 3e-5 of the row's peak),
    which moves the result by about that times the sum of |x w|; the dense product is
    float32."""
    return 2e-4 if rows <= product.KERNEL_MAX_ROWS else 2e-5


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("case", CASES)
def test_product_matches_float64(case, rows):
    weight = case_weight(case, seed=rows)
    inp = weight.shape[1]
    x = np.random.default_rng(1).standard_normal((rows, inp)).astype(np.float32)
    got = np.asarray(jax.jit(quantized_project)(jnp.asarray(x), case_packed(case, seed=rows)))
    expected = _reference(x, weight)
    scale = np.abs(x).max() * np.abs(weight.dequantize()).sum(1).max()
    np.testing.assert_allclose(got, expected, atol=_tolerance(rows, weight) * scale, rtol=0)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_activations_match_the_scheme(rows):
    """compressed-tensors W8A8 int8: int8 activations per token times int8 weights per
    channel, summed in integers; the kernel and XLA's int32 dot give the same numbers."""
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((48, 160)).astype(np.float32)
    weight = quantize_per_channel(w, INT8)
    weight.activations = INT8_ACTIVATIONS
    x = rng.standard_normal((rows, 160)).astype(np.float32)
    got = np.asarray(jax.jit(quantized_project)(jnp.asarray(x), pack(weight)))
    np.testing.assert_allclose(got, _reference(x, weight), rtol=1e-5, atol=1e-5)


def test_leading_axes_and_out_dtype():
    weight = random_group_quant(INT4, 32, 64, 32)
    x = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    got = quantized_project(jnp.asarray(x), pack(weight), jnp.bfloat16)
    assert got.shape == (2, 3, 32) and got.dtype == jnp.bfloat16


def test_the_native_kernel_serves_decode_rows():
    """On the host CPU a decode-sized product is the native kernel's custom call (which
    must build: the machine has a C++ compiler), not a dequantized copy of the weight."""
    assert cpu_quantized.available()
    weight = pack(random_group_quant(INT4, 32, 64, 32))
    hlo = jax.jit(quantized_project).lower(jnp.zeros((1, 64)), weight).as_text()
    assert "custom_call" in hlo
    hlo = jax.jit(quantized_project).lower(jnp.zeros((product.KERNEL_MAX_ROWS + 1, 64)),
                                           weight).as_text()
    assert "custom_call" not in hlo


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("cases", [("int4-g32-offsets", "int4-g32-offsets", "int4-g32-offsets"),
                                   ("int4-g64-rows-not-16", "int4-g64-rows-not-16"),
                                   ("int4-g32-zero-point", "int4-g32-zero-point"),
                                   ("int4-g32-offsets", "int4-g32-offsets-half"),
                                   ("int4-g32-offsets", "int4-g32-zero-point")])
def test_project_many_is_each_project(cases, rows):
    """A layer's products of one input (q/k/v, gate/up) through quantized_project_many: the
    bits of quantized_project for each weight, in one kernel call at decode rows where the
    weights share a format (float16 or float32 group arrays may differ), one call each
    where they do not (a zero point against offsets) or the rows are prefill's; and the
    float64 reference."""
    weights = [case_weight(case, seed=i) for i, case in enumerate(cases)]
    packed = [case_packed(case, seed=i) for i, case in enumerate(cases)]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((rows, weights[0].shape[1])),
                    jnp.float32)
    many = jax.jit(quantized_project_many)
    got = many(x, packed)
    for g, p, w in zip(got, packed, weights):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.jit(quantized_project)(x, p)))
        scale = np.abs(np.asarray(x)).max() * np.abs(w.dequantize()).sum(1).max()
        np.testing.assert_allclose(np.asarray(g), _reference(x, w),
                                   atol=_tolerance(rows, w) * scale, rtol=0)
    one_format = "int4-g32-zero-point" not in cases or len(set(cases)) == 1
    fused = product.uses_multi_kernel(packed, rows)
    assert fused == (one_format and rows <= product.KERNEL_MAX_ROWS)
    hlo = many.lower(x, packed).as_text()
    assert hlo.count("xla_inference_quantized_matmul_multi") == (1 if fused else 0)
