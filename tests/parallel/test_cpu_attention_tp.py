"""The native CPU attention under tensor parallel (layers/attention.paged_attention's split
by KV heads) on the 8 virtual CPU devices: the same cache and output as the kernel on one
device, and a compiled program with no collective at all, where left to GSPMD the custom
call has its cache gathered onto every device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tests.parallel.test_collective_matmul import collectives
from xla_inference.kernels import cpu_attention
from xla_inference.kernels.metadata import AttentionMetadata, LayerCache
from xla_inference.layers.attention import paged_attention
from xla_inference.parallel.sharding import build_mesh, traced_over

BLOCK = 16
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 4, 32
RUNS = [(70, 1), (0, 21), (40, 5), (9, 1), (33, 16), (0, 1)]  # (cached, new) per sequence


def _step(seed, num_tokens=64, num_pages=48, max_blocks=8, cache_dtype=jnp.float32):
    """A mixed step (decodes, a prefill, chunks) on shuffled pages, the rest padding;
    a cache full of random rows (older context), new K/V and q."""
    rng = np.random.default_rng(seed)
    pages = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(RUNS) + 1, max_blocks), np.int32)
    seq_ids = np.full(num_tokens, len(RUNS), np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slots = np.zeros(num_tokens, np.int32)  # padding writes into the null page
    start, used = 0, 0
    for row, (cached, new) in enumerate(RUNS):
        n = -(-(cached + new) // BLOCK)
        tables[row, :n] = pages[used:used + n]
        used += n
        pos = np.arange(cached, cached + new)
        seq_ids[start:start + new], positions[start:start + new] = row, pos
        slots[start:start + new] = tables[row, pos // BLOCK] * BLOCK + pos % BLOCK
        start += new
    cache_shape = (num_pages * BLOCK, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal(cache_shape), cache_dtype) for _ in "kv")
    q = rng.standard_normal((num_tokens, NUM_HEADS, HEAD_DIM)).astype(np.float32)
    k, v = (rng.standard_normal((num_tokens, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
            for _ in "kv")
    md = AttentionMetadata(jnp.asarray(positions), jnp.asarray(seq_ids), jnp.asarray(slots[None]),
                           jnp.asarray(tables[None]), block_size=BLOCK)
    return (q, k, v), (k_cache, v_cache), md


def _attend(q, k, v, k_cache, v_cache, md, *, window, scales):
    kv, out = paged_attention(q, k, v, LayerCache((k_cache, v_cache), np.int32(0)), md,
                              scale=HEAD_DIM ** -0.5, sliding_window=window,
                              k_scale=scales[0], v_scale=scales[1])
    return kv.arrays, out


def _sharded(mesh, new, caches, md):
    heads = NamedSharding(mesh, PartitionSpec(None, "model", None))
    whole = NamedSharding(mesh, PartitionSpec())
    put = lambda tree, s: jax.tree.map(lambda a: jax.device_put(a, s), tree)  # noqa: E731
    return put(new, heads), put(caches, heads), put(md, whole)


@pytest.mark.parametrize("tp,window,cache_dtype", [(2, None, jnp.float32), (4, 29, jnp.float32),
                                                   (4, None, jnp.float8_e4m3fn),
                                                   (2, 29, jnp.bfloat16)])
def test_split_by_kv_heads_equals_one_device_without_collectives(tp, window, cache_dtype):
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    new, caches, md = _step(tp, cache_dtype=cache_dtype)
    scales = (0.5, 2.0) if cache_dtype == jnp.float8_e4m3fn else (1.0, 1.0)

    def fn(q, k, v, k_cache, v_cache, md):
        return _attend(q, k, v, k_cache, v_cache, md, window=window, scales=scales)

    one = jax.devices()[0]
    (want_k, want_v), want = jax.jit(fn)(*jax.device_put((*new, *caches, md), one))

    mesh = build_mesh(tp)
    args = _sharded(mesh, new, caches, md)
    split = jax.jit(traced_over(mesh, fn))
    (got_k, got_v), got = split(*args[0], *args[1], args[2])
    # Each device runs the same kernel on its heads: the same numbers as one device.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    for got_cache, want_cache in ((got_k, want_k), (got_v, want_v)):
        assert np.array_equal(np.asarray(got_cache.astype(jnp.float32)),
                              np.asarray(want_cache.astype(jnp.float32)))
        assert got_cache.sharding.spec == PartitionSpec(None, "model", None)
    assert got.sharding.spec == PartitionSpec(None, "model", None)

    hlo = split.lower(*args[0], *args[1], args[2]).compile().as_text()
    assert collectives(hlo) == {}, collectives(hlo)  # nothing gathered, nothing reduced
    # The kernel runs on each device's share: K / tp KV heads of the cache.
    local_cache = f"[{caches[0].shape[0]},{NUM_KV_HEADS // tp},{HEAD_DIM}]"
    calls = [line for line in hlo.splitlines() if "xla_inference_paged_attention" in line]
    assert calls and all(local_cache in line for line in calls), calls


def test_left_to_gspmd_the_cache_is_gathered():
    """The case the split removes: without the mesh in the trace the custom call has no
    partitioning rule, and XLA gathers the KV-head-sharded cache (and q) onto every device."""
    assert cpu_attention.available(), "the native CPU attention kernel did not build"
    mesh = build_mesh(2)
    new, caches, md = _step(0)
    args = _sharded(mesh, new, caches, md)

    def fn(q, k, v, k_cache, v_cache, md):
        return _attend(q, k, v, k_cache, v_cache, md, window=None, scales=(1.0, 1.0))

    hlo = jax.jit(fn).lower(*args[0], *args[1], args[2]).compile().as_text()
    whole_cache = rf"f32\[{caches[0].shape[0]},{NUM_KV_HEADS},{HEAD_DIM}\]\{{[0-9,]+\}} all-gather\("
    assert len(re.findall(whole_cache, hlo)) == 2, collectives(hlo)  # K and V, whole
