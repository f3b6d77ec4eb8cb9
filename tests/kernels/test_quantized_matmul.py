"""The native CPU quantized matrix product (kernels/cpu_quantized.py) against a float64 numpy
reference of its formula, on random group-quantized weights: int4 with and without offsets,
int8 symmetric, groups of 16 to 128, T of 1 to 13 (more than one tile of 8 rows), out not a
multiple of 16. The weights are packed into the tile layout by this file's own packer, written
from the layout's definition (quantization/packed.py has the production one), so the test also
checks the layout contract. The VNNI and portable builds, one thread and many, a row of T alone
and in a batch: all give the same bits."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_inference.kernels import cpu_quantized, native

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


def _random_weight(rng, out, n, bits, group_size, with_offsets):
    """GroupQuant-like: q [out, in] (uint8 0..15 for int4, int8), scales and offsets [out, G]."""
    groups = n // group_size
    if bits == 4:
        q = rng.integers(0, 16, (out, n)).astype(np.uint8)
    else:
        q = rng.integers(-128, 128, (out, n)).astype(np.int8)
    scales = rng.uniform(0.5, 2.0, (out, groups)).astype(np.float32) * 1e-3
    offsets = (rng.uniform(-8, 0, (out, groups)).astype(np.float32) * 1e-3
               if with_offsets else None)
    return q, scales, offsets


def _kernel_operands(q, scales, offsets, bits):
    """The kernel's operands for the weight, padded to a multiple of 16 rows."""
    out_padded = -(-q.shape[0] // ROWS) * ROWS
    values = _pack(_pad_rows(q, out_padded), bits)
    packed_scales = _pack_groups(_pad_rows(scales, out_padded))
    packed_offsets = None if offsets is None else _pack_groups(_pad_rows(offsets, out_padded))
    return values, packed_scales, packed_offsets


def _random_activations(rng, T, n):
    xq = rng.integers(-16383, 16384, (T, n)).astype(np.int16)
    x_scale = rng.uniform(0.5, 2.0, T).astype(np.float32) / 16383
    return xq, x_scale


def _reference(xq, x_scale, q, scales, offsets, group_size):
    """y and the sum of the terms' magnitudes (the scale of float32 rounding), float64."""
    T, n = xq.shape
    groups = n // group_size
    x = xq.astype(np.float64).reshape(T, groups, group_size)
    w = q.astype(np.float64).reshape(q.shape[0], groups, group_size)
    S = np.einsum("tgk,ogk->tog", x, w)  # exact: integers below 2^53
    terms = S * scales.astype(np.float64)[None]
    magnitude = np.abs(terms)
    if offsets is not None:
        offset_terms = x.sum(-1)[:, None, :] * offsets.astype(np.float64)[None]
        terms = terms + offset_terms
        magnitude = magnitude + np.abs(offset_terms)
    xs = x_scale.astype(np.float64)[:, None]
    return xs * terms.sum(-1), xs * magnitude.sum(-1)


def _run(xq, x_scale, values, scales, offsets, bits, group_size):
    return np.asarray(cpu_quantized.quantized_matmul(
        jnp.asarray(xq), jnp.asarray(x_scale), jnp.asarray(values), jnp.asarray(scales),
        None if offsets is None else jnp.asarray(offsets), bits=bits, group_size=group_size))


def _check(y, xq, x_scale, q, scales, offsets, group_size):
    out = q.shape[0]
    ref, magnitude = _reference(xq, x_scale, q, scales, offsets, group_size)
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


@pytest.mark.parametrize("bits,with_offsets", CASES)
def test_portable_build_gives_the_same_bits(bits, with_offsets):
    """The C++ fallback (built with XLA_INFERENCE_QMM_PORTABLE, as on CPUs without VNNI)."""
    library = native.load_targets(cpu_quantized._SOURCE, {_PORTABLE: cpu_quantized._SYMBOL},
                                  (*native.DEFAULT_FLAGS, "-DXLA_INFERENCE_QMM_PORTABLE"))
    assert library.XlaInferenceQuantizedMatmulVnni() == 0
    rng = np.random.default_rng(bits)
    q, scales, offsets = _random_weight(rng, 72, 384, bits, 64, with_offsets)
    operands = _kernel_operands(q, scales, offsets, bits)
    xq, x_scale = _random_activations(rng, 11, 384)
    portable = np.asarray(cpu_quantized.ffi_quantized_matmul(
        _PORTABLE, jnp.asarray(xq), jnp.asarray(x_scale),
        *(None if a is None else jnp.asarray(a) for a in operands), bits=bits, group_size=64))
    _check(portable, xq, x_scale, q, scales, offsets, 64)
    np.testing.assert_array_equal(portable, _run(xq, x_scale, *operands, bits, 64))


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
    # and within the rounding of x to int16 of the float product with the dequantized weight
    w = q.astype(np.float64) * np.repeat(scales, 32, 1) + np.repeat(offsets, 32, 1)
    rounding = 0.5 * x_scale[:, None] * np.abs(w).sum(1)[None]
    assert np.all(np.abs(y[:, :48] - x @ w.T) <= rounding * (1 + 1e-4))


def test_bad_operands_are_refused():
    rng = np.random.default_rng(3)
    q, scales, offsets = _random_weight(rng, 16, 256, 8, 32, False)
    values, packed_scales, _ = _kernel_operands(q, scales, offsets, 8)
    xq, x_scale = _random_activations(rng, 2, 256)
    with pytest.raises(Exception, match="quantized_matmul"):
        _run(xq, x_scale, values, packed_scales, None, 4, 32)  # int8 values read as 4-bit
    with pytest.raises(Exception, match="quantized_matmul"):
        _run(xq, x_scale, values, packed_scales, None, 8, 64)  # scales for groups of 32


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
    q, scales, offsets = _random_weight(rng, 1024, 512, 4, 32, True)  # many work items
    values, packed_scales, packed_offsets = _kernel_operands(q, scales, offsets, 4)
    xq, x_scale = _random_activations(rng, 9, 512)
    np.savez(tmp_path / "in.npz", xq=xq, x_scale=x_scale, values=values, scales=packed_scales,
             offsets=packed_offsets)
    subprocess.run([sys.executable, "-c", _PINNED, tmp_path / "in.npz", tmp_path / "out.npy"],
                   check=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    here = _run(xq, x_scale, values, packed_scales, packed_offsets, 4, 32)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), here)


def test_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_CPU_QUANTIZED", "0")
    assert not cpu_quantized.available.__wrapped__()  # available() itself is cached
    monkeypatch.setenv("XLA_INFERENCE_CPU_QUANTIZED", "1")
    assert cpu_quantized.available.__wrapped__()
