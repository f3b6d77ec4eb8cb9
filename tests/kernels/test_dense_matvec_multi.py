"""Several bfloat16 weights times one row in one native call (cpu_dense.dense_matvec_multi,
cpu/dense_matvec.cc), against float64 products and the one-weight entry's bits; the
software-prefetch build's bits; layers/linear.project_many choosing the multi call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.test_dense_matvec import _assert_float32_sums
from xla_inference.kernels import cpu_dense, native
from xla_inference.layers.linear import project, project_many


def _weights(rng, outs, inn):
    return [jnp.asarray(rng.standard_normal((out, inn)), jnp.bfloat16) for out in outs]


@pytest.mark.parametrize("T,outs,inn", [(1, (576, 192, 192), 576), (1, (1536, 1536), 576),
                                        (1, (9, 61, 3000), 77), (2, (40, 17), 64)])
def test_multi_matches_float64_and_the_single_calls_bits(T, outs, inn):
    assert cpu_dense.available()
    rng = np.random.default_rng(sum(outs) + inn)
    x = rng.standard_normal((T, inn)).astype(np.float32)
    ws = _weights(rng, outs, inn)
    ys = jax.jit(cpu_dense.dense_matvec_multi)(jnp.asarray(x), ws)
    assert len(ys) == len(ws)
    for y, w in zip(ys, ws):
        y = np.asarray(y)
        _assert_float32_sums(y, x, w)
        np.testing.assert_array_equal(y, np.asarray(cpu_dense.dense_matvec(jnp.asarray(x), w)))


def test_multi_refuses_mismatched_operands():
    rng = np.random.default_rng(0)
    ws = _weights(rng, (16, 8), 32) + _weights(rng, (8,), 48)
    with pytest.raises(Exception, match="dense_matvec_multi"):
        cpu_dense.dense_matvec_multi(jnp.zeros((1, 32)), ws)


_PREFETCH = "xla_inference_dense_matvec_rows_ahead"


def test_prefetch_build_gives_the_same_bits():
    """A build with the other software prefetch scheme (16 rows ahead into L1, in place of
    the next block into L2) reads the same values in the same order: the same bits, single
    and multi entry."""
    native.load_targets(cpu_dense._SOURCE,
                        {_PREFETCH: cpu_dense._SYMBOL, _PREFETCH + "_multi": cpu_dense._MULTI_SYMBOL},
                        (*native.DEFAULT_FLAGS, "-DXLA_INFERENCE_DENSE_PREFETCH_BLOCKS=0",
                         "-DXLA_INFERENCE_DENSE_PREFETCH_ROWS=16",
                         "-DXLA_INFERENCE_DENSE_PREFETCH_HINT=_MM_HINT_T0"))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 576)), jnp.float32)
    ws = _weights(rng, (1536, 200), 576)
    for w in ws:
        np.testing.assert_array_equal(
            np.asarray(jax.jit(cpu_dense.ffi_dense_matvec, static_argnums=0)(_PREFETCH, x, w)),
            np.asarray(cpu_dense.dense_matvec(x, w)))
    ys = cpu_dense.ffi_dense_matvec_multi(_PREFETCH + "_multi", x, ws)
    for y, w in zip(ys, ws):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(cpu_dense.dense_matvec(x, w)))


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96)])
def test_project_many_takes_one_call_for_one_row(shape):
    """layers/linear.project_many: one row of float32 activations times bfloat16 weights is
    one multi call with each project()'s bits; two rows are not."""
    rng = np.random.default_rng(7)
    ws = _weights(rng, (40, 24, 24), 96)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    hlo = jax.jit(project_many).lower(x, ws).as_text()
    assert hlo.count("@xla_inference_dense_matvec_multi(") == 1
    assert "@xla_inference_dense_matvec(" not in hlo
    ys = jax.jit(project_many)(x, ws)
    for y, w in zip(ys, ws):
        assert y.shape == (*shape[:-1], w.shape[0]) and y.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(project)(x, w)))
    assert "dense_matvec_multi" not in jax.jit(project_many).lower(jnp.zeros((2, 96)), ws).as_text()
    # float32 weights keep XLA's products
    wide = [w.astype(jnp.float32) for w in ws]
    assert "dense_matvec" not in jax.jit(project_many).lower(x, wide).as_text()
