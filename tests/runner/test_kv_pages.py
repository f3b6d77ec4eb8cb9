"""The KV transfer copy programs (runner/kv_pages.py) against numpy: gather and scatter of
token slots, chunked copies, a cache sharded over KV heads, and no compile after warm-up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xla_inference.kernels.metadata import KvCache
from xla_inference.runner import compile_counter
from xla_inference.runner.kv_pages import KvSlotCopier, slot_buckets, token_slots

BLOCK = 16
NUM_SLOTS = 12 * BLOCK


def _host_cache(rng):
    """Two sets of arrays: K and V of 4 heads x 8 (float32), and one MLA-style latent
    array of 1 x 24 (bfloat16)."""
    kv = tuple(rng.standard_normal((NUM_SLOTS, 4, 8)).astype(np.float32) for _ in range(2))
    latent = (rng.standard_normal((NUM_SLOTS, 1, 24)).astype(jnp.bfloat16),)
    return [kv, latent]


def _device_cache(host, shardings=None):
    """shardings: (the K/V set's, the latent set's); None: one device. Committed to their
    devices, as the engine's cache is (a jit's output)."""
    shardings = shardings or (jax.devices()[0],) * 2
    put = [(lambda a, s=s: jax.device_put(a, s)) for s in shardings]
    return KvCache([tuple(put[i](a) for a in host[i]) for i in range(2)], (0, 1), (0, 0))


def test_slot_buckets_are_powers_of_two_up_to_the_cap():
    assert slot_buckets(100) == [16, 32, 64, 128]
    assert slot_buckets(16) == [16]
    assert slot_buckets(1 << 20)[-1] == 2048


def test_token_slots_follow_the_pages():
    slots = token_slots([5, 2, 9], BLOCK, 14, 35)
    expected = [5 * 16 + p for p in (14, 15)] + [2 * 16 + p for p in range(16)] + \
               [9 * 16 + p for p in range(3)]
    assert slots.tolist() == expected


@pytest.mark.parametrize("max_slots", [128, 16])  # 16: copies of 40 slots run in 3 chunks
def test_gather_and_scatter_match_numpy(max_slots):
    rng = np.random.default_rng(0)
    host = _host_cache(rng)
    copier = KvSlotCopier(_device_cache(host), max_slots)
    cache = _device_cache(host)
    slots = token_slots([3, 7, 1], BLOCK, 5, 45)  # 40 slots over three pages
    got = copier.gather(cache, slots)
    for got_set, host_set in zip(got, host):
        for g, h in zip(got_set, host_set):
            np.testing.assert_array_equal(g, h[slots])

    values = [tuple(rng.standard_normal(v.shape).astype(v.dtype) for v in s) for s in got]
    cache = copier.scatter(cache, slots, values)
    for device_set, host_set, value_set in zip(cache.arrays, host, values):
        for d, h, v in zip(device_set, host_set, value_set):
            expected = h.copy()
            expected[slots] = v
            np.testing.assert_array_equal(np.asarray(d), expected)


def test_a_cache_sharded_over_kv_heads_keeps_its_sharding():
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("model",))
    sharding = NamedSharding(mesh, PartitionSpec(None, "model", None))
    rng = np.random.default_rng(1)
    host = _host_cache(rng)
    cache = _device_cache(host, (sharding, NamedSharding(mesh, PartitionSpec())))
    copier = KvSlotCopier(cache, 64)
    slots = token_slots([4, 6], BLOCK, 0, 20)
    values = [tuple(np.full(v.shape, 3, v.dtype) for v in s) for s in copier.gather(cache, slots)]
    cache = copier.scatter(cache, slots, values)
    assert cache.arrays[0][0].sharding == sharding
    expected = host[0][1].copy()
    expected[slots] = 3
    np.testing.assert_array_equal(np.asarray(cache.arrays[0][1]), expected)


def test_values_of_another_layout_are_refused():
    rng = np.random.default_rng(2)
    host = _host_cache(rng)
    cache = _device_cache(host)
    copier = KvSlotCopier(cache, 64)
    slots = token_slots([2], BLOCK, 0, 4)
    values = copier.gather(cache, slots)
    wrong_dtype = [values[0], (values[1][0].astype(np.float32),)]
    with pytest.raises(ValueError, match="set 1"):
        copier.scatter(cache, slots, wrong_dtype)
    with pytest.raises(ValueError, match="for 1 sets.*has 2"):
        copier.scatter(cache, slots, values[:1])


def test_no_compile_after_warm_up():
    compile_counter.install()
    rng = np.random.default_rng(3)
    cache = _device_cache(_host_cache(rng))
    copier = KvSlotCopier(cache, 100)
    cache = copier.warm_up(cache)
    before = compile_counter.num_compilations()
    for n in (1, 16, 17, 70, 128):
        slots = token_slots(list(range(1, 10)), BLOCK, 0, n)
        cache = copier.scatter(cache, slots, copier.gather(cache, slots))
    jax.block_until_ready(cache.arrays)
    assert compile_counter.num_compilations() == before
