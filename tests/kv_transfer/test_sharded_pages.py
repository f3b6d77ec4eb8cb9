"""KV transfer's page copies (runner/kv_pages.py) and the offload host tier
(kv_transfer/host_tier.py) on caches split over virtual devices, as the engine allocates
them: tensor parallel 2 (kv heads over the model axis) and data parallel 2 x tensor
parallel 2 ([replicas, slots, kv heads, head size], replicas over the data axis, global page
ids as plugin/dp_scheduler.py hands them out). A store is dispatched, the cache is donated
by the next write before the store lands, and the tier still gets the pages bit for bit;
loaded back into other pages (another replica's too), they are bit for bit the stored ones,
every other page is untouched and the cache keeps the step's shardings."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xla_inference.kernels.metadata import KvCache
from xla_inference.kv_transfer.host_tier import HostPageStore
from xla_inference.runner.kv_pages import EnginePages

BLOCK = 4
PAGES_PER_REPLICA = 6
HEADS, HEAD_SIZE = 4, 8


def _sharded_pages(rng, replicas: int, tp: int):
    """EnginePages over a cache of K and V (float32) and one bfloat16 set, split as the
    engine splits it, and the values as [pages of all replicas * BLOCK, heads, head size]
    host arrays (global slot order)."""
    devices = np.asarray(jax.devices()[:replicas * tp]).reshape(replicas, tp)
    mesh = Mesh(devices, ("data", "model"))
    slots = PAGES_PER_REPLICA * BLOCK
    if replicas > 1:
        shape, spec = (replicas, slots, HEADS, HEAD_SIZE), PartitionSpec("data", None, "model")
    else:
        shape, spec = (slots, HEADS, HEAD_SIZE), PartitionSpec(None, "model")
    sharding = NamedSharding(mesh, spec)
    host = [tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(2)),
            (rng.standard_normal(shape).astype(jnp.bfloat16),)]
    cache = KvCache([tuple(jax.device_put(a, sharding) for a in s) for s in host], (0, 1),
                    (0, 0))
    engine = SimpleNamespace(replicas=replicas, kv_cache=cache,
                             cfg=SimpleNamespace(block_size=BLOCK, max_model_len=64))
    flat = [tuple(a.reshape(-1, HEADS, HEAD_SIZE) for a in s) for s in host]
    return EnginePages(engine), flat, sharding


def _rows(page_ids):
    return (np.asarray(page_ids)[:, None] * BLOCK + np.arange(BLOCK)).ravel()


def _device_values(pages):
    return [tuple(np.asarray(a).reshape(-1, HEADS, HEAD_SIZE) for a in s)
            for s in pages.engine.kv_cache.arrays]


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _zeros(host, n):
    return [tuple(np.zeros((n * BLOCK, HEADS, HEAD_SIZE), a.dtype) for a in s) for s in host]


@pytest.mark.parametrize("replicas, tp, stored, loaded_into", [
    (1, 2, [5, 1, 3], [2, 4, 0]),
    # Replica 1's pages (6..11) stored, loaded into replica 0's and replica 1's.
    (2, 2, [9, 7, 11], [1, 10, 4]),
])
def test_an_offload_store_on_a_split_cache_restores_the_pages_bit_for_bit(replicas, tp,
                                                                          stored, loaded_into):
    pages, host, sharding = _sharded_pages(np.random.default_rng(7), replicas, tp)
    store = HostPageStore(pages.layout, BLOCK, num_chunks=2, blocks_per_chunk=2)
    assert [(s.num_kv_heads, s.head_size) for s in pages.layout] == [(HEADS, HEAD_SIZE)] * 2
    pending = store.store_async(pages, stored, [3, 0, 1])
    old = pages.engine.kv_cache.arrays
    pages.write_tokens(stored, 0, len(stored) * BLOCK, _zeros(host, len(stored)))  # next step
    assert old[0][0].is_deleted()  # donated while the store may still read it
    assert pending.finish() == len(stored) * store.page_bytes
    for host_set, tier_set in zip(host, store.rows):
        for h, t in zip(host_set, tier_set):
            np.testing.assert_array_equal(_bits(t[_rows([3, 0, 1])]), _bits(h[_rows(stored)]))
    before = _device_values(pages)
    assert not before[0][0][_rows(stored)].any()  # the write landed in the right replica
    assert store.load(pages, [3, 0, 1], loaded_into) == len(stored) * store.page_bytes
    after = _device_values(pages)
    untouched = np.setdiff1d(np.arange(replicas * PAGES_PER_REPLICA * BLOCK), _rows(loaded_into))
    for h, b, a in zip([x for s in host for x in s], [x for s in before for x in s],
                       [x for s in after for x in s]):
        np.testing.assert_array_equal(_bits(a[_rows(loaded_into)]), _bits(h[_rows(stored)]))
        np.testing.assert_array_equal(_bits(a[untouched]), _bits(b[untouched]))
    assert all(a.sharding == sharding for s in pages.engine.kv_cache.arrays for a in s)
