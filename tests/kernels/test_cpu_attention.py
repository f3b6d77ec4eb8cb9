"""The native CPU attention kernel at the head dims it compiles specially (64 and 128, as
compile-time constants) and at another one, against the plain-jnp kernel on the same
ragged step: decode tokens, tiles of one sequence longer and shorter than 16 tokens, a
sliding window, GQA. (test_ragged_paged_attention.py checks both against float64.)
The kernel shares a step's tiles out over XLA's intra-op thread pool: the pool follows the
process's CPU affinity, and the output is the same bit for bit on one thread as on many."""

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
from xla_inference.kernels import cpu_attention, native
from xla_inference.kernels.ragged_paged_attention import ragged_paged_attention

BLOCK = 16


def _step(rng, runs, num_tokens, num_kv_heads, head_dim, num_pages=128, max_blocks=40):
    """runs: (cached, new) per sequence, on shuffled pages; the rest of T is padding."""
    pages = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(runs) + 1, max_blocks), np.int32)
    seq_ids = np.full(num_tokens, len(runs), np.int32)  # padding: an empty row, position 0
    positions = np.zeros(num_tokens, np.int32)
    start, used = 0, 0
    for row, (cached, new) in enumerate(runs):
        n = -(-(cached + new) // BLOCK)
        tables[row, :n] = pages[used:used + n]
        used += n
        seq_ids[start:start + new] = row
        positions[start:start + new] = np.arange(cached, cached + new)
        start += new
    shape = (num_pages * BLOCK, num_kv_heads, head_dim)
    k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    return k, v, jnp.asarray(seq_ids), jnp.asarray(positions), jnp.asarray(tables)


@functools.partial(jax.jit, static_argnames=("native", "window"))
def _attend(q, k, v, seq_ids, positions, tables, *, native, window):
    return ragged_paged_attention(q, k, v, seq_ids, positions, tables, block_size=BLOCK,
                                  scale=q.shape[-1] ** -0.5, sliding_window=window,
                                  native=native)


@pytest.mark.parametrize("head_dim", [64, 128, 48])
@pytest.mark.parametrize("window", [None, 37])
def test_native_matches_jnp(head_dim, window):
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    rng = np.random.default_rng(head_dim)
    runs = [(300, 1), (0, 40), (100, 7), (17, 1), (250, 16), (5, 1), (0, 3)]
    num_heads, num_kv_heads, T = 12, 4, 96
    k, v, seq_ids, positions, tables = _step(rng, runs, T, num_kv_heads, head_dim)
    q = jnp.asarray(rng.standard_normal((T, num_heads, head_dim)), jnp.float32)
    native = _attend(q, k, v, seq_ids, positions, tables, native=True, window=window)
    plain = _attend(q, k, v, seq_ids, positions, tables, native=False, window=window)
    assert "xla_inference_paged_attention" in _attend.lower(
        q, k, v, seq_ids, positions, tables, native=True, window=window).as_text()
    np.testing.assert_allclose(np.asarray(native), np.asarray(plain), rtol=1e-5, atol=1e-5)


# A subprocess pinned to one CPU before JAX starts (and one CPU device): it reports the size
# of XLA's pool and runs the native kernel on the step saved in argv[1], saving the output
# to argv[2].
_PINNED = textwrap.dedent("""
    import os, sys
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import jax, numpy as np
    from xla_inference.kernels import cpu_attention
    assert cpu_attention.available()
    step = dict(np.load(sys.argv[1]))
    window = int(step.pop("window"))
    out = jax.jit(lambda **a: cpu_attention.paged_attention(
        **a, block_size=16, scale=0.125, sliding_window=window))(**step)
    np.savez(sys.argv[2], out=np.asarray(out), pool=cpu_attention.pool_threads())
""")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_pool_follows_affinity_and_output_is_the_same_on_one_thread(tmp_path):
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    # XLA hands the kernel its pool (here a thread per CPU, or per virtual device if more).
    assert cpu_attention.pool_threads() > 0
    rng = np.random.default_rng(5)
    # Many tiles of unequal cost: decodes, prefills cut into several tiles, short chunks.
    runs = [(int(rng.integers(0, 200)), int(rng.choice([1, 1, 5, 20, 40]))) for _ in range(24)]
    T = sum(new for _, new in runs) + 9
    k, v, seq_ids, positions, tables = _step(rng, runs, T, 2, 64, num_pages=512)
    step = dict(q=rng.standard_normal((T, 6, 64), np.float32), k_cache=np.asarray(k),
                v_cache=np.asarray(v), seq_ids=np.asarray(seq_ids),
                positions=np.asarray(positions), block_tables=np.asarray(tables))
    for window in (0, 37):
        np.savez(tmp_path / "step.npz", window=window, **step)
        subprocess.run([sys.executable, "-c", _PINNED, tmp_path / "step.npz",
                        tmp_path / "out.npz"], check=True, env={**os.environ,
                        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
        pinned = np.load(tmp_path / "out.npz")
        assert pinned["pool"] == 1
        here = jax.jit(lambda **a: cpu_attention.paged_attention(
            **a, block_size=BLOCK, scale=0.125, sliding_window=window))(**step)
        np.testing.assert_array_equal(np.asarray(here), pinned["out"])
        plain = _attend(step["q"], k, v, seq_ids, positions, tables, native=False,
                        window=window or None)
        np.testing.assert_allclose(np.asarray(here), np.asarray(plain), rtol=1e-5, atol=1e-5)


def _float64_reference(q, k, v, seq_ids, positions, tables, window):
    """Each token's attention over its sequence's keys (read from the cache through its
    block table), in float64: q [T, N, H], k/v [slots, K, H] as float64."""
    out = np.zeros(q.shape)
    group = q.shape[1] // k.shape[1]
    for t in range(q.shape[0]):
        pos = int(positions[t])
        keys = np.arange(max(0, pos - window + 1) if window else 0, pos + 1)
        slots = tables[seq_ids[t], keys // BLOCK] * BLOCK + keys % BLOCK
        kt, vt = np.repeat(k[slots], group, axis=1), np.repeat(v[slots], group, axis=1)
        scores = np.einsum("nh,snh->ns", q[t], kt) * q.shape[-1] ** -0.5
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[t] = np.einsum("ns,snh->nh", p / p.sum(axis=1, keepdims=True), vt)
    return out


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float8_e4m3fn],
                         ids=["bfloat16", "fp8_e4m3"])
@pytest.mark.parametrize("head_dim", [64, 128, 48])
def test_narrow_caches_match_float64(cache_dtype, head_dim):
    """bfloat16 and fp8 caches, widened in registers 16 values at a time on the decode path
    (head dims 64 and 128 with AVX-512) and row by row elsewhere, against float64 on the
    very values the cache holds: the same accuracy as a float32 cache."""
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    rng = np.random.default_rng(head_dim + 1)
    runs = [(300, 1), (0, 40), (100, 7), (17, 1), (250, 16), (5, 1), (0, 3), (64, 1)]
    T = 96
    k, v, seq_ids, positions, tables = _step(rng, runs, T, 2, head_dim)
    k, v = k.astype(cache_dtype), v.astype(cache_dtype)
    q = jnp.asarray(rng.standard_normal((T, 8, head_dim)), jnp.float32)
    for window in (None, 37):
        out = _attend(q, k, v, seq_ids, positions, tables, native=True, window=window)
        expected = _float64_reference(*(np.asarray(a, np.float64) for a in (q, k, v)),
                                      np.asarray(seq_ids), np.asarray(positions),
                                      np.asarray(tables), window)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("option", [dict(soft_cap=1.5), dict(attention_chunk=40),
                                    dict(attention_chunk=64, sliding_window=37, soft_cap=2.0),
                                    dict(shared_kv=True)],
                         ids=["soft-cap", "chunk", "chunk-window-cap", "shared-kv"])
def test_native_serves_soft_cap_chunks_and_shared_kv(option):
    """Gemma 2's soft cap, Llama 4's local chunks and MLA's shared K/V go to the native
    kernel too (a bfloat16 cache on the jnp kernel would be widened whole every step), and
    give the jnp kernel's answer (both checked against float64 in
    test_ragged_paged_attention*.py)."""
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    rng = np.random.default_rng(9)
    runs = [(300, 1), (0, 40), (100, 7), (17, 1), (250, 16), (5, 1)]
    kv_heads = 1 if option.get("shared_kv") else 2
    k, v, seq_ids, positions, tables = _step(rng, runs, 96, kv_heads, 64)
    q = jnp.asarray(rng.standard_normal((96, 8, 64)), jnp.float32)

    def attend(native):
        return functools.partial(
            ragged_paged_attention, block_size=BLOCK, scale=0.125, native=native,
            **option)(q, k, None if option.get("shared_kv") else v, seq_ids, positions, tables)

    assert "xla_inference_paged_attention" in jax.jit(attend, static_argnums=0).lower(
        True).as_text()
    np.testing.assert_allclose(np.asarray(jax.jit(attend, static_argnums=0)(True)),
                               np.asarray(jax.jit(attend, static_argnums=0)(False)),
                               rtol=1e-5, atol=1e-5)


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split())


_AVX2_TARGET = "xla_inference_paged_attention_avx2"
_AVX2_PER_HEAD_TARGET = "xla_inference_paged_attention_avx2_per_head"


@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= _cpu_flags(), reason="no AVX2/FMA/F16C")
@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e5m2],
                         ids=["float32", "bfloat16", "fp8_e5m2"])
@pytest.mark.parametrize("group", [1, 3, 4, 6])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_avx2_decode_path_matches_float64(cache_dtype, group, head_dim):
    """The decode path of CPUs without AVX-512 (attend_one_grouped over
    range_partials_grouped_avx2: 8 lanes, each cache type's load8; the same bits as
    attend_one_avx2, one head at a time), built with XLA_INFERENCE_ATTENTION_NO_AVX512 so
    that an AVX-512 CPU runs it too:
    lone decode tokens (contexts of 1 to 301 keys, so partial blocks of 8 keys; from 64 keys
    on, two key ranges' softmaxes merged: 63 keys in one, 64 and 65 in two), `group`
    query heads a KV head (the weighted values' passes of 32 dims for up to 3 heads, 16 for
    4; 6 as 4 + 2), a sliding window, beside tiles, against float64 on the values the cache
    holds."""
    native.load_targets(cpu_attention._SOURCE, {_AVX2_TARGET: "XlaInferencePagedAttention"},
                        (*native.DEFAULT_FLAGS, "-DXLA_INFERENCE_ATTENTION_NO_AVX512"))
    native.load_targets(cpu_attention._SOURCE,
                        {_AVX2_PER_HEAD_TARGET: "XlaInferencePagedAttention"},
                        (*native.DEFAULT_FLAGS, "-DXLA_INFERENCE_ATTENTION_NO_AVX512",
                         "-DXLA_INFERENCE_ATTENTION_GROUPED=0"))
    rng = np.random.default_rng(head_dim + 7)
    runs = [(300, 1), (0, 1), (100, 7), (17, 1), (5, 1), (64, 1), (250, 3), (62, 1), (63, 1)]
    T = 24
    k, v, seq_ids, positions, tables = _step(rng, runs, T, 3, head_dim)
    k, v = k.astype(cache_dtype), v.astype(cache_dtype)
    q = jnp.asarray(rng.standard_normal((T, 3 * group, head_dim)), jnp.float32)
    for window in (None, 37):
        out, per_head = (jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
            q, k, v, seq_ids, positions, tables, block_size=np.int64(BLOCK),
            scale=np.float32(head_dim ** -0.5), sliding_window=np.int64(window or 0),
            soft_cap=np.float32(0.0), attention_chunk=np.int64(0))
            for target in (_AVX2_TARGET, _AVX2_PER_HEAD_TARGET))
        # the grouped path (KV heads' rows read once) has the one-head-at-a-time path's bits
        np.testing.assert_array_equal(np.asarray(out), np.asarray(per_head))
        expected = _float64_reference(*(np.asarray(a.astype(jnp.float32), np.float64)
                                        for a in (q, k, v)),
                                      np.asarray(seq_ids), np.asarray(positions),
                                      np.asarray(tables), window)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


_AVX512_TARGET = "xla_inference_paged_attention_avx512"
_AVX512_PER_HEAD_TARGET = "xla_inference_paged_attention_avx512_per_head"


@pytest.mark.skipif("avx512f" not in _cpu_flags(), reason="no AVX-512")
@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn,
                                         jnp.float8_e5m2],
                         ids=["float32", "bfloat16", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_avx512_grouped_decode_path_has_per_head_bits(cache_dtype, group, head_dim):
    """The AVX-512 decode path (attend_one_grouped over range_partials_grouped_avx512: each
    KV head's key and value chunks widened once for its `group` query heads) gives exactly the bits of
    attend_one_avx512 (one head at a time, built with -DXLA_INFERENCE_ATTENTION_GROUPED=0):
    lone decode tokens with contexts of 1 to 521 keys (partial blocks of 16 keys, many
    pages), two KV heads, with and without a sliding window, a soft cap and local chunks;
    and float64's answer on the values the cache holds."""
    native.load_targets(cpu_attention._SOURCE, {_AVX512_TARGET: "XlaInferencePagedAttention"})
    native.load_targets(cpu_attention._SOURCE,
                        {_AVX512_PER_HEAD_TARGET: "XlaInferencePagedAttention"},
                        (*native.DEFAULT_FLAGS, "-DXLA_INFERENCE_ATTENTION_GROUPED=0"))
    rng = np.random.default_rng(head_dim * 10 + group)
    runs = [(300, 1), (0, 1), (15, 1), (16, 1), (47, 1), (100, 1), (250, 1), (520, 1)]
    T, kv_heads = len(runs), 2
    k, v, seq_ids, positions, tables = _step(rng, runs, T, kv_heads, head_dim)
    k, v = k.astype(cache_dtype), v.astype(cache_dtype)
    q = jnp.asarray(rng.standard_normal((T, group * kv_heads, head_dim)), jnp.float32)
    for window, soft_cap, chunk in ((None, 0.0, 0), (37, 0.0, 0), (100, 2.0, 64)):
        out, per_head = (np.asarray(jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
            q, k, v, seq_ids, positions, tables, block_size=np.int64(BLOCK),
            scale=np.float32(head_dim ** -0.5), sliding_window=np.int64(window or 0),
            soft_cap=np.float32(soft_cap), attention_chunk=np.int64(chunk)))
            for target in (_AVX512_TARGET, _AVX512_PER_HEAD_TARGET))
        np.testing.assert_array_equal(out.view(np.uint32), per_head.view(np.uint32))
        if soft_cap == 0.0:
            expected = _float64_reference(*(np.asarray(a.astype(jnp.float32), np.float64)
                                            for a in (q, k, v)),
                                          np.asarray(seq_ids), np.asarray(positions),
                                          np.asarray(tables), window)
            np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------ the spare core
# (kernels/cpu/spare_core.h: a lone decode token's attention shared with one helper thread,
# by key range and KV head (AVX-512 and AVX2 alike), which the caller takes items
# back from when it holds them too long)

_SPARE_TESTING = "xla_inference_paged_attention_spare_testing"
_AVX2_SPARE_TESTING = "xla_inference_paged_attention_avx2_spare_testing"
_NO_AVX512 = ("-DXLA_INFERENCE_ATTENTION_NO_AVX512",)


@functools.cache
def _spare_testing_library():
    return spare_core_testing_build(cpu_attention._SOURCE,
                                    {_SPARE_TESTING: "XlaInferencePagedAttention"})


_HAS_AVX2 = {"avx2", "fma", "f16c"} <= _cpu_flags()
# The decode paths the spare core shares: this CPU's (AVX-512's or AVX2's grouped one) and
# the AVX2 one built for any CPU that has AVX2; elsewhere there is none to test.
_SPARE_ISAS = [
    pytest.param("native", marks=pytest.mark.skipif(
        "avx512f" not in _cpu_flags() and not _HAS_AVX2,
        reason="the spare core's decode paths are AVX-512's and AVX2's")),
    pytest.param("avx2", marks=pytest.mark.skipif(not _HAS_AVX2, reason="no AVX2/FMA/F16C")),
]


def _spare_builds(isa):
    """(the build without its spare core: its target and library; the testing build of the
    same decode path: its target and library) for "native" (this CPU's path: AVX-512's or
    AVX2's grouped one) or "avx2" (the AVX2 path, which an AVX-512 CPU runs too)."""
    if isa == "native":
        return (cpu_attention._TARGET, cpu_attention._library(), _SPARE_TESTING,
                _spare_testing_library())
    plain = native.load_targets(cpu_attention._SOURCE,
                                {_AVX2_TARGET: "XlaInferencePagedAttention"},
                                (*native.DEFAULT_FLAGS, *_NO_AVX512))
    testing = spare_core_testing_build(
        cpu_attention._SOURCE, {_AVX2_SPARE_TESTING: "XlaInferencePagedAttention"}, _NO_AVX512)
    return _AVX2_TARGET, plain, _AVX2_SPARE_TESTING, testing


def _lone_tokens(cache_dtype, group, kv_heads, head_dim):
    """Decode steps of one token each (contexts of 1 to 521 keys on shuffled pages) and
    a call of the kernel build `target` on step i."""
    rng = np.random.default_rng([head_dim, group, kv_heads])
    runs = [(0, 1), (15, 1), (16, 1), (47, 1), (250, 1), (520, 1)]
    k, v, seq_ids, positions, tables = _step(rng, runs, len(runs), kv_heads, head_dim)
    k, v = k.astype(cache_dtype), v.astype(cache_dtype)
    q = jnp.asarray(rng.standard_normal((len(runs), group * kv_heads, head_dim)), jnp.float32)

    def call(target, i, window=0):
        return np.asarray(jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q[i:i + 1].shape,
                                                                          jnp.float32))(
            q[i:i + 1], k, v, seq_ids[i:i + 1], positions[i:i + 1], tables,
            block_size=np.int64(BLOCK), scale=np.float32(head_dim ** -0.5),
            sliding_window=np.int64(window), soft_cap=np.float32(0.0),
            attention_chunk=np.int64(0)))

    return len(runs), call, (q, k, v, seq_ids, positions, tables)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spare core needs 2 CPUs")
@pytest.mark.parametrize("isa", _SPARE_ISAS)
@pytest.mark.parametrize("cache_dtype,group,kv_heads,head_dim", [
    (jnp.bfloat16, 3, 3, 64), (jnp.float32, 1, 2, 128), (jnp.float8_e4m3fn, 4, 4, 64)])
def test_spare_core_gives_the_bits_of_one_thread(cache_dtype, group, kv_heads, head_dim, isa):
    """KV heads the helper computes (into its scratch, copied out by the caller) give the
    bits of the kernel without the spare core, which match float64 on the cache's values:
    this CPU's decode path, and the AVX2 one."""
    assert cpu_attention.available()
    plain_target, plain, spare_target, spare = _spare_builds(isa)
    steps, call, (q, k, v, seq_ids, positions, tables) = _lone_tokens(
        cache_dtype, group, kv_heads, head_dim)
    with spare_core_off(plain):
        expected = [call(plain_target, i, window) for i in range(steps) for window in (0, 37)]
    reference = _float64_reference(*(np.asarray(a.astype(jnp.float32), np.float64)
                                     for a in (q, k, v)), np.asarray(seq_ids),
                                   np.asarray(positions), np.asarray(tables), None)
    for i in range(steps):
        np.testing.assert_allclose(expected[2 * i][0], reference[i], rtol=2e-5, atol=2e-5)
    calls = lambda: [call(spare_target, i, window) for i in range(steps)  # noqa: E731
                     for window in (0, 37)]
    call_until_spare_core_counts(spare, 0, calls, expected)
    # The plain build (its helper at SCHED_IDLE) too, whether or not its helper ran.
    for i in range(steps):
        np.testing.assert_array_equal(call(plain_target, i), expected[2 * i])



@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spare core needs 2 CPUs")
@pytest.mark.skipif(not _HAS_AVX2, reason="no AVX2/FMA/F16C")
def test_avx2_shares_a_lone_kv_head_by_key_range():
    """On AVX2 the spare core's items are key ranges' KV heads, so a model with one KV head
    shares its decode tokens' attention too (the second range to the helper): the bits of the
    build without the spare core."""
    plain_target, plain, spare_target, spare = _spare_builds("avx2")
    steps, call, _ = _lone_tokens(jnp.bfloat16, 4, 1, 64)
    with spare_core_off(plain):
        expected = [call(plain_target, i) for i in range(steps)]
    call_until_spare_core_counts(spare, 0, lambda: [call(spare_target, i) for i in range(steps)],
                                 expected)

@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spare core needs 2 CPUs")
@pytest.mark.parametrize("isa", _SPARE_ISAS)
def test_items_taken_back_from_the_helper_give_the_same_bits(isa):
    """A helper that holds its items (KV heads; on AVX2 key ranges' KV heads) too long
    (paused 300 us in each) has them taken back and computed by the caller; its late results
    never reach a later call's output."""
    plain_target, plain, spare_target, library = _spare_builds(isa)
    steps, call, _ = _lone_tokens(jnp.bfloat16, 3, 3, 64)
    with spare_core_off(plain):
        expected = [call(plain_target, i) for i in range(steps)]
    library.XlaInferenceSpareCoreTestDelay(300)
    try:
        calls = lambda: [call(spare_target, i) for i in range(steps)]  # noqa: E731
        call_until_spare_core_counts(library, 1, calls, expected)
        for _ in range(5):  # calls while the helper still finishes taken-back heads
            for got, want in zip(calls(), expected):
                np.testing.assert_array_equal(got, want)
    finally:
        library.XlaInferenceSpareCoreTestDelay(0)
