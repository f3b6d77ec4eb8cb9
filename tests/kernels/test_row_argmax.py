"""The native row argmax (kernels/cpu/row_argmax.cc) against numpy's argmax: the first index
of the maximum, a row's first NaN where it has one (as jnp.argmax), ties, -inf rows, signed
zeros, lengths around the vector widths; in each build (AVX-512 where the CPU has it, AVX2,
portable). And the sampler's greedy tokens through it (sampling/sampler.row_argmax)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_inference.kernels import cpu_argmax, native
from xla_inference.sampling import sampler

pytestmark = pytest.mark.skipif(not cpu_argmax.available(), reason="native argmax not built")

BUILDS = {
    "default": (),
    "avx2": ("-mno-avx512f",),
    "portable": ("-DXLA_INFERENCE_ARGMAX_PORTABLE",),
}


@functools.cache
def _build(name: str):
    """(the build's FFI target, its path: 2 AVX-512, 1 AVX2, 0 portable)."""
    target = f"xla_inference_row_argmax_test_{name}"
    library = native.load_targets(cpu_argmax._SOURCE, {target: cpu_argmax._SYMBOL},
                                  (*cpu_argmax._FLAGS, *BUILDS[name]))
    return target, library.XlaInferenceRowArgmaxPath()


def _argmax(build: str, x: np.ndarray) -> np.ndarray:
    target, _ = _build(build)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape[:1], jnp.int32))
    return np.asarray(jax.jit(call)(jnp.asarray(x)))


def _expected(x: np.ndarray) -> np.ndarray:
    """numpy's argmax, which takes a row's first NaN as its maximum too."""
    return np.argmax(x, axis=-1).astype(np.int32)


def _rows(V: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((7, V)).astype(np.float32)
    x[1] = np.round(x[1])  # many ties
    x[2] = -np.inf
    x[3, rng.integers(V)] = np.nan
    x[4, -1] = np.nan
    x[4, rng.integers(V)] = 50.0  # a maximum before the NaN: the NaN still wins
    x[5] = 0.0
    x[5, ::3] = -0.0  # signed zeros compare equal: the first of them
    x[6] = 1.0
    x[6, -1] = 2.0  # the maximum in the tail past the last whole vector
    return x


def test_each_build_takes_its_path():
    assert _build("portable")[1] == 0
    assert _build("avx2")[1] in (0, 1)  # (0 on a CPU without AVX2)
    assert _build("default")[1] == cpu_argmax.path()


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("V", [1, 7, 15, 16, 17, 31, 33, 63, 64, 65, 129, 1000, 49155])
def test_row_argmax_is_numpys(build, V):
    x = _rows(V, V)
    np.testing.assert_array_equal(_argmax(build, x), _expected(x))


def test_the_samplers_greedy_tokens_take_it():
    x = _rows(49152, 0)
    traced = jax.jit(sampler.row_argmax).lower(jnp.asarray(x)).as_text()
    assert cpu_argmax._TARGET in traced
    np.testing.assert_array_equal(np.asarray(sampler.row_argmax(jnp.asarray(x))), _expected(x))
    # [..., V] rows of any rank, as the rejection sampler passes them
    y = x[:6].reshape(2, 3, -1)
    np.testing.assert_array_equal(np.asarray(sampler.row_argmax(jnp.asarray(y))),
                                  _expected(y.reshape(6, -1)).reshape(2, 3))
