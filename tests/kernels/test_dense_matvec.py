"""The native one-row bfloat16 product (kernels/cpu_dense.py, cpu/dense_matvec.cc) against
float64 products of the same bfloat16 values, its portable build, a one-thread run, the
spare core's share of a call, and layers/linear.project choosing it for a single row."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (
    call_until_spare_core_counts,
    dense_kernel_on_one_cpu,
    spare_core_off,
    spare_core_testing_build,
)
from xla_inference.kernels import cpu_dense, native
from xla_inference.layers.linear import project


def _operands(rng, T, out, inn):
    x = rng.standard_normal((T, inn)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((out, inn)), jnp.bfloat16)
    return x, w


def _float64_product(x, w):
    """x rounded to bfloat16 (ties to even, as the kernel's operand) times w, in float64."""
    rounded = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    wide = np.asarray(w.astype(jnp.float32), np.float64)
    return rounded @ wide.T, np.abs(rounded) @ np.abs(wide).T


def _assert_float32_sums(y, x, w):
    """Each output is its float64 sum but for float32 rounding along the way: at most
    in * 2^-24 of the sum of the products' magnitudes."""
    want, magnitude = _float64_product(x, w)
    assert y.dtype == np.float32 and y.shape == want.shape
    assert np.all(np.abs(y - want) <= x.shape[1] * 2.0 ** -24 * magnitude + 1e-30)


@pytest.mark.parametrize("T,out,inn", [(1, 48, 64), (1, 1536, 576), (1, 61, 77), (1, 9, 31),
                                       (3, 200, 96), (1, 3000, 1024)])
def test_matches_float64(T, out, inn):
    assert cpu_dense.available()
    x, w = _operands(np.random.default_rng(out + inn), T, out, inn)
    y = np.asarray(jax.jit(cpu_dense.dense_matvec)(jnp.asarray(x), w))
    _assert_float32_sums(y, x, w)
    # and not the product of the unrounded x
    assert np.abs(y - x.astype(np.float64) @ np.asarray(w.astype(jnp.float32)).T).max() > 1e-4


def test_takes_the_avx512_path_where_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert cpu_dense.uses_avx512() == ("avx512f" in flags and "avx512bw" in flags)


_PORTABLE = "xla_inference_dense_matvec_portable"


def test_portable_build_gives_the_same_bits():
    """The C++ fallback (built with XLA_INFERENCE_DENSE_PORTABLE, as on CPUs without
    AVX-512) sums in the AVX-512 path's order: the same bits."""
    native.load_targets(cpu_dense._SOURCE, {_PORTABLE: cpu_dense._SYMBOL},
                        (*native.DEFAULT_FLAGS, "-DXLA_INFERENCE_DENSE_PORTABLE"))
    for T, out, inn in [(1, 40, 100), (2, 17, 64), (1, 300, 576)]:
        x, w = _operands(np.random.default_rng(inn), T, out, inn)
        x = jnp.asarray(x)
        np.testing.assert_array_equal(
            np.asarray(jax.jit(cpu_dense.ffi_dense_matvec, static_argnums=0)(_PORTABLE, x, w)),
            np.asarray(jax.jit(cpu_dense.dense_matvec)(x, w)))


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split())


_AVX2 = "xla_inference_dense_matvec_avx2"


@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="the CPU has no AVX2/FMA")
def test_avx2_build_gives_the_portable_bits():
    """The AVX2 path (CPUs without AVX-512; built with XLA_INFERENCE_DENSE_NO_AVX512 so that
    an AVX-512 CPU runs it too) sums each of the 16 lanes as the portable path does and adds
    them in its order: the same bits, partial last loads and rows past the last 4 included."""
    library = native.load_targets(
        cpu_dense._SOURCE, {_AVX2: cpu_dense._SYMBOL},
        (*native.DEFAULT_FLAGS, "-DXLA_INFERENCE_DENSE_NO_AVX512"))
    assert library.XlaInferenceDenseMatvecAvx2() == 1
    native.load_targets(cpu_dense._SOURCE, {_PORTABLE: cpu_dense._SYMBOL},
                        (*native.DEFAULT_FLAGS, "-DXLA_INFERENCE_DENSE_PORTABLE"))
    run = jax.jit(cpu_dense.ffi_dense_matvec, static_argnums=0)
    for T, out, inn in [(1, 43, 100), (2, 17, 64), (1, 300, 576), (1, 9, 31)]:
        x, w = _operands(np.random.default_rng(inn + 1), T, out, inn)
        x = jnp.asarray(x)
        avx2 = np.asarray(run(_AVX2, x, w))
        np.testing.assert_array_equal(avx2, np.asarray(run(_PORTABLE, x, w)))
        _assert_float32_sums(avx2, np.asarray(x), w)


def test_bad_operands_are_refused():
    x, w = _operands(np.random.default_rng(0), 1, 16, 32)
    with pytest.raises(Exception, match="dense_matvec"):
        cpu_dense.dense_matvec(jnp.zeros((1, 48)), w)


def test_output_is_the_same_on_one_thread(tmp_path):
    # 8 MB of weights: many work items, and pool threads woken for them
    x, w = _operands(np.random.default_rng(11), 1, 8192, 512)
    alone = dense_kernel_on_one_cpu("dense_matvec", "available", x, w, tmp_path)
    here = np.asarray(cpu_dense.dense_matvec(jnp.asarray(x), w))
    np.testing.assert_array_equal(alone, here)


def test_a_bad_spare_core_setting_is_refused_not_taken_for_a_build_failure(monkeypatch):
    """XLA_INFERENCE_SPARE_CORE=yes fails naming the variable; it does not quietly turn the
    kernel off as a build that failed would."""
    monkeypatch.setenv("XLA_INFERENCE_SPARE_CORE", "yes")
    with pytest.raises(ValueError, match="XLA_INFERENCE_SPARE_CORE must be 0 or 1"):
        cpu_dense.available.__wrapped__()  # available() itself is cached


def test_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv("XLA_INFERENCE_CPU_DENSE", "0")
    assert not cpu_dense.available.__wrapped__()  # available() itself is cached
    monkeypatch.setenv("XLA_INFERENCE_CPU_DENSE", "1")
    assert cpu_dense.available.__wrapped__()


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96)])
def test_project_takes_the_kernel_for_one_row_only(shape):
    """layers/linear.project: a single row (any leading shape) of float32 activations times a
    bfloat16 weight runs the kernel, with its numbers; two rows do not (XLA's product, or
    the several-row kernel, tests/kernels/test_dense_matmul.py)."""
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((40, 96)), jnp.bfloat16)
    x = rng.standard_normal(shape).astype(np.float32)
    hlo = jax.jit(project).lower(jnp.asarray(x), w).as_text()
    assert "dense_matvec" in hlo
    y = np.asarray(jax.jit(project)(jnp.asarray(x), w))
    assert y.shape == (*shape[:-1], 40)
    _assert_float32_sums(y.reshape(1, 40), x.reshape(1, 96), w)
    two = jnp.zeros((2, 96))
    assert "dense_matvec" not in jax.jit(project).lower(two, w).as_text()
    # float32 weights (dtype=float32) keep XLA's product too
    assert "dense_matvec" not in jax.jit(project).lower(jnp.asarray(x), w.astype(jnp.float32)
                                                        ).as_text()


# ------------------------------------------------------------------ the spare core
# (kernels/cpu/spare_core.h: calls the pool would add at most one thread to, shared with one
# helper thread that the caller takes items back from when it holds them too long)

_SPARE_TESTING = "xla_inference_dense_matvec_spare_testing"
_DEFAULT_BUILD = (cpu_dense._TARGET, cpu_dense._MULTI_TARGET)


@functools.cache
def _spare_testing_library():
    return spare_core_testing_build(cpu_dense._SOURCE,
                                    {_SPARE_TESTING + "_one": cpu_dense._SYMBOL,
                                     _SPARE_TESTING + "_multi": cpu_dense._MULTI_SYMBOL})


_TESTING_BUILD = (_SPARE_TESTING + "_one", _SPARE_TESTING + "_multi")


def _spare_weights(rng):
    """A weight of 0.88 MB (no pool thread is woken for it on any machine: the spare core's)
    and a pair of 1.1 MB together (one pool thread at most: the spare core's too)."""
    return [jnp.asarray(rng.standard_normal((out, 576)), jnp.bfloat16) for out in (768, 192)]


def _one_and_multi(build, xs, ws):
    """The one-weight entry with xs[0], then the multi entry with xs[1]: consecutive calls
    with other inputs, so that an output XLA's allocator hands out again holds other values
    than its next call's (rows a broken kernel left unwritten would keep them)."""
    one, multi = build
    return [cpu_dense.ffi_dense_matvec(one, jnp.asarray(xs[0]), ws[0]),
            *cpu_dense.ffi_dense_matvec_multi(multi, jnp.asarray(xs[1]), ws)]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spare core needs 2 CPUs")
@pytest.mark.parametrize("T", [1, 3])
def test_spare_core_gives_the_bits_of_one_thread(T):
    """Rows the helper computes (into its scratch, copied out by the caller) give the bits of
    the kernel without the spare core, which are float32 sums of the float64 products."""
    rng = np.random.default_rng([41, T])
    ws = _spare_weights(rng)
    xs = rng.standard_normal((2, T, 576)).astype(np.float32)
    with spare_core_off(cpu_dense._library()):
        expected = [np.asarray(y) for y in _one_and_multi(_DEFAULT_BUILD, xs, ws)]
    _assert_float32_sums(expected[0], xs[0], ws[0])
    _assert_float32_sums(expected[2], xs[1], ws[1])
    call_until_spare_core_counts(_spare_testing_library(), 0,
                                 lambda: _one_and_multi(_TESTING_BUILD, xs, ws), expected)
    # The default build (its helper at SCHED_IDLE) too, whether or not its helper ran.
    for got, want in zip(_one_and_multi(_DEFAULT_BUILD, xs, ws), expected):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spare core needs 2 CPUs")
def test_rows_taken_back_from_the_helper_give_the_same_bits():
    """A helper that holds its items too long (paused 300 us in each, ten times the caller's
    patience) has them taken back and computed by the caller; its late results go to the old
    call's scratch, never to a later call's outputs (every call's bits checked)."""
    rng = np.random.default_rng(42)
    ws = _spare_weights(rng)
    xs = rng.standard_normal((2, 1, 576)).astype(np.float32)
    with spare_core_off(cpu_dense._library()):
        expected = [np.asarray(y) for y in _one_and_multi(_DEFAULT_BUILD, xs, ws)]
    library = _spare_testing_library()
    library.XlaInferenceSpareCoreTestDelay(300)
    try:
        calls = lambda: _one_and_multi(_TESTING_BUILD, xs, ws)  # noqa: E731
        call_until_spare_core_counts(library, 1, calls, expected)
        for _ in range(5):  # calls while the helper still finishes taken-back items
            for got, want in zip(calls(), expected):
                np.testing.assert_array_equal(np.asarray(got), want)
    finally:
        library.XlaInferenceSpareCoreTestDelay(0)


def _spare_core_script(script: str) -> str:
    """What `script` prints, run in a process of its own (its helper thread and its threads'
    CPUs its own), the spare core on."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                          "XLA_INFERENCE_SPARE_CORE": "1"}).stdout


_ONE_SPARE_CORE = """
import os
import numpy as np
from tests.kernels import test_dense_matvec as dense, test_quantized_matmul as quantized
from xla_inference.kernels import cpu_dense, cpu_quantized
assert cpu_dense.available() and cpu_quantized.available()
rng = np.random.default_rng(0)
_, operands = quantized._spare_operands(rng)
ws = dense._spare_weights(rng)
for _ in range(20):
    quantized._float_and_multi(quantized._DEFAULT_BUILD,
                               rng.standard_normal((1, 576)).astype(np.float32), operands)
    dense._one_and_multi(dense._DEFAULT_BUILD,
                         rng.standard_normal((2, 1, 576)).astype(np.float32), ws)
tasks = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(tasks.count("xla-spare-core"))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spare core needs 2 CPUs")
def test_the_one_row_kernels_share_one_spare_core():
    """The bfloat16 and the quantized one-row kernels (and decode attention) are one library
    with one helper thread (native.SPARE_CORE_KERNELS): two would each spin on the second
    core and halve each other when a step runs both (AWQ's int4 projections and its
    bfloat16 LM head)."""
    assert _spare_core_script(_ONE_SPARE_CORE).split()[-1] == "1"


_HELPER_STEERED = """
import os
import time
import numpy as np
from tests.kernels import test_quantized_matmul as quantized
from xla_inference.kernels import cpu_quantized
assert cpu_quantized.available()
rng = np.random.default_rng(0)
_, operands = quantized._spare_operands(rng)
x = rng.standard_normal((1, 576)).astype(np.float32)
quantized._float_and_multi(quantized._DEFAULT_BUILD, x, operands)  # the helper starts
tasks = {int(t): open(f"/proc/self/task/{t}/comm").read().strip()
         for t in os.listdir("/proc/self/task")}
cpu = min(os.sched_getaffinity(0))
for tid in tasks:  # every thread on one CPU: the calls' and the helper's
    os.sched_setaffinity(tid, {cpu})
for _ in range(20):
    quantized._float_and_multi(quantized._DEFAULT_BUILD, x, operands)
    time.sleep(0.005)  # (the helper runs while the caller sleeps, and says where)
helper = [tid for tid, name in tasks.items() if name == "xla-spare-core"]
print(len(helper), cpu in os.sched_getaffinity(helper[0]))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spare core needs 2 CPUs")
def test_a_caller_on_the_helpers_cpu_moves_the_helper_off_it():
    """A call that runs on the CPU where the helper last ran moves the helper to the
    process's other CPUs (spare_core.h, steer_helper): Linux wakes the thread that runs XLA's
    program on the helper's CPU as if it were idle, and the preempted helper would wait there
    for the kernel's balancing while the other CPU idles. Every thread pinned to one CPU,
    the helper included: after a few calls the helper may no longer run there."""
    assert _spare_core_script(_HELPER_STEERED).split()[-2:] == ["1", "False"]
