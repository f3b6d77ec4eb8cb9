"""The Pallas quantized matmul (kernels/pallas_quantized_matmul.py): weights packed by
quantization/packed.pack, converted to the accelerator layout, multiplied by the TPU and
GPU kernels in interpret mode, against x @ the float64 dequantized weight (GroupQuant's own
formula); and both kernels lowered for their device (Mosaic, Triton)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import export

from tests.helpers import pallas_interpret
from xla_inference.kernels.pallas_quantized_matmul import (Tiling, accelerator_layout,
                                                           dequantized_reference,
                                                           quantized_matmul)
from xla_inference.quantization.groups import FP8, INT4, INT8, GroupQuant
from xla_inference.quantization.packed import pack

# name -> (kind, group size, offsets: None / "offsets" / "zero" (packed as a zero point), K)
WEIGHTS = {
    "int8-channel": (INT8, 256, None, 256),  # one scale a row: packed as groups of 128
    "fp8-channel": (FP8, 256, None, 256),
    "fp8-block128": (FP8, 128, None, 256),
    "int4-g32-offsets": (INT4, 32, "offsets", 256),
    "int4-g128": (INT4, 128, None, 256),
    "int4-g128-zero": (INT4, 128, "zero", 256),
    "int4-g32-small-k": (INT4, 32, "offsets", 64),  # K / 2 = 32 inputs a nibble half
}
M, N = 20, 48  # M: one full row tile of 16 and a partial one


def _group_quant(kind, group_size, offsets, k, seed=0) -> GroupQuant:
    rng = np.random.default_rng(seed)
    shape = (N, k)
    if kind == INT4:
        values = rng.integers(0, 16, shape).astype(np.uint8)
    elif kind == INT8:
        values = rng.integers(-128, 128, shape).astype(np.int8)
    else:
        values = (rng.standard_normal(shape) * 4).astype(ml_dtypes.float8_e4m3fn)
    scales = rng.uniform(0.01, 0.05, (N, k // group_size)).astype(np.float32)
    offs = None
    if offsets == "offsets":
        offs = rng.uniform(-0.2, 0.2, scales.shape).astype(np.float32)
    elif offsets == "zero":
        offs = -8 * scales  # GPTQ's symmetric midpoint
    return GroupQuant(values, scales, offs, kind, group_size)


def _device_weight(name):
    kind, group_size, offsets, k = WEIGHTS[name]
    quant = _group_quant(kind, group_size, offsets, k)
    packed = pack(quant, zero_point=offsets == "zero")
    assert (packed.zero_point != 0) == (offsets == "zero")
    bits = 4 if kind == INT4 else 8
    arrays = accelerator_layout(
        jnp.asarray(packed.values), jnp.asarray(packed.scales),
        None if packed.offsets is None else jnp.asarray(packed.offsets), bits=bits,
        in_features=k, out_features=N)
    args = dict(bits=bits, group_size=packed.group_size, zero_point=packed.zero_point)
    return quant, arrays, args


@pytest.mark.parametrize("name", WEIGHTS)
def test_accelerator_layout_holds_the_weight(name):
    """The converted arrays dequantize (this module's formula) to GroupQuant's weight."""
    quant, arrays, args = _device_weight(name)
    np.testing.assert_array_equal(dequantized_reference(*arrays, **args), quant.dequantize().T)


FAST = {("tpu", "int4-g32-offsets", "f32"), ("gpu", "int4-g128-zero", "bf16")}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _matrix():
    for backend in ("tpu", "gpu"):
        for name in WEIGHTS:
            for dtype_name, dtype in DTYPES.items():
                marks = () if (backend, name, dtype_name) in FAST else (pytest.mark.slow,)
                yield pytest.param(backend, name, dtype, marks=marks,
                                   id=f"{backend}-{name}-{dtype_name}")


def _tiling(backend, k, bits):
    """Small blocks: two row tiles, several K steps where the layout allows; the TPU
    interpreter pays per grid point, so its N is one tile."""
    tk = k if bits == 4 else 128
    return Tiling(16, tk, 16 if backend == "gpu" else N)


@pytest.mark.parametrize("backend,name,dtype", list(_matrix()))
def test_quantized_matmul_equals_dequantized_product(backend, name, dtype):
    quant, arrays, args = _device_weight(name)
    k = quant.shape[1]
    x = jax.random.normal(jax.random.key(1), (M, k), jnp.float32).astype(dtype)
    got = quantized_matmul(x, *arrays, **args, backend=backend, interpret=pallas_interpret(backend),
                           tiling=_tiling(backend, k, args["bits"]))
    want = np.asarray(x.astype(jnp.float32), np.float64) @ quant.dequantize().T
    assert got.dtype == dtype and got.shape == (M, N)
    # float32: scales applied to float32 sums; bfloat16: exact inputs, output rounded.
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got, np.float64) / scale, want / scale, atol=tol)


@pytest.mark.parametrize("backend", [pytest.param("tpu", marks=pytest.mark.slow), "gpu"])
def test_default_tiling_under_jit(backend):
    quant, arrays, args = _device_weight("int4-g32-offsets")
    x = jax.random.normal(jax.random.key(2), (5, 256), jnp.float32)
    run = jax.jit(functools.partial(quantized_matmul, **args, backend=backend,
                                    interpret=pallas_interpret(backend)))
    want = np.asarray(x, np.float64) @ quant.dequantize().T
    np.testing.assert_allclose(run(x, *arrays), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_refuses_a_tiling_that_splits_a_4bit_block():
    _, arrays, args = _device_weight("int4-g128")
    with pytest.raises(ValueError, match="blocks of 256"):
        quantized_matmul(jnp.ones((4, 256)), *arrays, **args, backend="gpu", interpret=True,
                         tiling=Tiling(16, 128, 16))


def _lowered(f, platform, *args) -> str:
    """StableHLO of f lowered for `platform` without such a device: Mosaic's lowering for
    "tpu", Triton's for "cuda"."""
    checks = ([export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
              if platform == "cuda" else [])
    return export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(
        *args).mlir_module()


@pytest.mark.parametrize("weights", ["int4-g32-offsets", "int8-g128", "fp8-channel"])
@pytest.mark.parametrize("backend,platform,call", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_lowers_for_its_device(backend, platform, call, weights):
    """Serving shapes: K = N = 1024, 40 bfloat16 rows, float16 scales."""
    k, n = 1024, 1024
    s = jax.ShapeDtypeStruct
    bits, group_size, values = {"int4-g32-offsets": (4, 32, s((k // 2, n), jnp.uint8)),
                                "int8-g128": (8, 128, s((k, n), jnp.int8)),
                                "fp8-channel": (8, k, s((k, n), jnp.float8_e4m3fn))}[weights]
    groups = s((k // group_size, n), jnp.float16)
    offsets = groups if "offsets" in weights else None
    f = lambda x, v, sc, o: quantized_matmul(x, v, sc, o, bits=bits,  # noqa: E731
                                             group_size=group_size, backend=backend)
    assert call in _lowered(f, platform, s((40, k), jnp.bfloat16), values, groups, offsets)
