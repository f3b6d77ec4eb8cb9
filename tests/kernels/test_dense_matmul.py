"""The native AMX product of several rows times a bfloat16 weight (kernels/cpu_dense.py,
cpu/dense_matmul.cc) against float64 products of the same bfloat16 values, on odd shapes
(partial tiles in every dimension), a one-thread run, and layers/linear.project choosing it
for 2..NATIVE_MATMUL_MAX_ROWS rows."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import dense_kernel_on_one_cpu
from xla_inference.kernels import cpu_dense
from xla_inference.layers import linear


def _operands(rng, T, out, inn):
    x = rng.standard_normal((T, inn)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((out, inn)), jnp.bfloat16)
    return x, w


def _assert_float32_sums(y, x, w):
    """Each output is the float64 sum of x rounded to bfloat16 times w, but for float32
    rounding along the way: at most in * 2^-24 of the sum of the products' magnitudes."""
    rounded = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    wide = np.asarray(w.astype(jnp.float32), np.float64)
    want, magnitude = rounded @ wide.T, np.abs(rounded) @ np.abs(wide).T
    assert y.dtype == np.float32 and y.shape == want.shape
    assert np.all(np.abs(y - want) <= x.shape[1] * 2.0 ** -24 * magnitude + 1e-30)


def _cpu_has_amx() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    return "amx_bf16" in flags and "amx_tile" in flags


# The kernel's own numbers need AMX; without it (an AMD or older Intel CPU) the tests below
# that run it do not apply, and test_available_where_the_cpu_has_amx and
# test_project_takes_the_kernel_for_a_few_rows check that XLA's product is kept instead.
needs_amx = pytest.mark.skipif(not _cpu_has_amx(), reason="the AMX kernel: this CPU has no AMX")


def test_available_where_the_cpu_has_amx():
    assert cpu_dense.matmul_available() == _cpu_has_amx()


# rows 1..300; columns and inputs off every multiple of 16 and 32 (tails in all three)
@pytest.mark.parametrize("T,out,inn", [(1, 1, 2), (2, 17, 33), (5, 7, 1), (31, 50, 577),
                                       (64, 576, 576), (65, 1536, 576), (129, 200, 96),
                                       (300, 45, 100), (64, 192, 1536)])
@needs_amx
def test_matches_float64(T, out, inn):
    assert cpu_dense.matmul_available()
    x, w = _operands(np.random.default_rng(T * out + inn), T, out, inn)
    y = np.asarray(jax.jit(cpu_dense.dense_matmul)(jnp.asarray(x), w))
    _assert_float32_sums(y, x, w)


def test_bad_operands_are_refused():
    _, w = _operands(np.random.default_rng(0), 2, 16, 32)
    with pytest.raises(Exception, match="dense_matmul"):
        cpu_dense.dense_matmul(jnp.zeros((2, 48)), w)


@needs_amx
def test_output_is_the_same_on_one_thread(tmp_path):
    # 128 x 4096 x 512: enough work that pool threads are woken for it
    x, w = _operands(np.random.default_rng(11), 128, 4096, 512)
    alone = dense_kernel_on_one_cpu("dense_matmul", "matmul_available", x, w, tmp_path)
    here = np.asarray(cpu_dense.dense_matmul(jnp.asarray(x), w))
    np.testing.assert_array_equal(alone, here)


@pytest.mark.parametrize("shape", [(2, 96), (4, 16, 96), (linear.NATIVE_MATMUL_MAX_ROWS, 96)])
def test_project_takes_the_kernel_for_a_few_rows(shape):
    """layers/linear.project: 2..NATIVE_MATMUL_MAX_ROWS rows (any leading shape) of float32
    activations times a bfloat16 weight run the kernel, with its numbers; more rows, and
    float32 weights, keep XLA's product."""
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((40, 96)), jnp.bfloat16)
    x = rng.standard_normal(shape).astype(np.float32)
    taken = "dense_matmul" in jax.jit(linear.project).lower(jnp.asarray(x), w).as_text()
    assert taken == _cpu_has_amx()
    if not taken:
        return  # XLA's product: its numbers are XLA's
    y = np.asarray(jax.jit(linear.project)(jnp.asarray(x), w))
    assert y.shape == (*shape[:-1], 40)
    _assert_float32_sums(y.reshape(-1, 40), x.reshape(-1, 96), w)
    more = jnp.zeros((linear.NATIVE_MATMUL_MAX_ROWS + 1, 96))
    assert "dense_matmul" not in jax.jit(linear.project).lower(more, w).as_text()
    assert "dense_matmul" not in jax.jit(linear.project).lower(
        jnp.asarray(x), w.astype(jnp.float32)).as_text()


@pytest.mark.parametrize("variable", ["XLA_INFERENCE_CPU_DENSE", "XLA_INFERENCE_CPU_DENSE_MATMUL"])
def test_environment_variables_turn_it_off(monkeypatch, variable):
    monkeypatch.setenv(variable, "0")
    assert not cpu_dense.matmul_available.__wrapped__()  # matmul_available() itself is cached
    monkeypatch.setenv(variable, "1")
    assert cpu_dense.matmul_available.__wrapped__() == _cpu_has_amx()
