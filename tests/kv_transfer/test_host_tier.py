"""The KV offload host tier (kv_transfer/host_tier.py) against numpy: pages copied out of a
device cache (the jitted gather of runner/kv_pages.py) into host chunks and back into other
pages, runs that start inside a chunk, the tier's bound, a file-backed tier; and the
offload settings refused at start-up (kv_transfer/config.py). The connector through
vllm.LLM: tests/e2e/test_llm_kv_offload.py."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_inference.kernels.metadata import KvCache
from xla_inference.kv_transfer.config import (refuse_unserved,
                                              refuse_unserved_offloading_size)
from xla_inference.kv_transfer.host_tier import HostPageStore, host_pages, page_bytes
from xla_inference.runner.kv_pages import EnginePages

BLOCK = 4
NUM_PAGES = 10


def _pages(rng):
    """EnginePages over a cache of two sets (K and V 2 x 8 float32; an MLA-style latent
    1 x 12 bfloat16) of random values, and that host copy."""
    host = [tuple(rng.standard_normal((NUM_PAGES * BLOCK, 2, 8)).astype(np.float32)
                  for _ in range(2)),
            (rng.standard_normal((NUM_PAGES * BLOCK, 1, 12)).astype(jnp.bfloat16),)]
    cache = KvCache([tuple(jax.device_put(a) for a in s) for s in host], (0, 1), (0, 0))
    engine = SimpleNamespace(replicas=1, kv_cache=cache,
                             cfg=SimpleNamespace(block_size=BLOCK, max_model_len=64))
    return EnginePages(engine), host


def _rows(pages_ids):
    return (np.asarray(pages_ids)[:, None] * BLOCK + np.arange(BLOCK)).ravel()


def _device_values(pages):
    return [tuple(np.asarray(a) for a in s) for s in pages.engine.kv_cache.arrays]


@pytest.mark.parametrize("disk", [False, True])
def test_pages_go_to_host_chunks_and_back_into_other_pages(tmp_path, disk):
    rng = np.random.default_rng(0)
    pages, host = _pages(rng)
    store = HostPageStore(pages.layout, BLOCK, num_chunks=3, blocks_per_chunk=2,
                          path=str(tmp_path / "tier") if disk else None)
    # Device pages 7, 2, 5 into chunks 2 and 0 from the second page of chunk 2 (a run
    # starting inside its chunk): host pages 5, 0, 1.
    to = host_pages([2, 0], 2, skip=1, count=3)
    assert to.tolist() == [5, 0, 1]
    assert store.store(pages, [7, 2, 5], to) == 3 * store.page_bytes
    for host_set, tier_set in zip(host, store.rows):
        for h, t in zip(host_set, tier_set):
            np.testing.assert_array_equal(t[_rows(to)], h[_rows([7, 2, 5])])
    # Back into pages 1, 9, 3 of a cache changed since (the copies keep no stale view).
    pages.write_tokens([1, 9, 3], 0, 3 * BLOCK,
                       [tuple(np.zeros((3 * BLOCK, *a.shape[1:]), a.dtype) for a in s)
                        for s in host])
    before = _device_values(pages)
    assert store.load(pages, to, [1, 9, 3]) == 3 * store.page_bytes
    after = _device_values(pages)
    untouched = np.setdiff1d(np.arange(NUM_PAGES * BLOCK), _rows([1, 9, 3]))
    for h, b, a in zip([x for s in host for x in s], [x for s in before for x in s],
                       [x for s in after for x in s]):
        np.testing.assert_array_equal(a[_rows([1, 9, 3])], h[_rows([7, 2, 5])])
        np.testing.assert_array_equal(a[untouched], b[untouched])
    if disk:  # the tier's file is unlinked at once: nothing left in the directory
        assert list((tmp_path / "tier").iterdir()) == []
    store.close()


def test_a_store_in_flight_keeps_the_pages_as_they_were_when_dispatched():
    """A store is dispatched before the next step's forward, which overwrites pages and
    donates the cache the gather reads: the tier gets the values of the dispatch, and only
    when the store finishes."""
    rng = np.random.default_rng(5)
    pages, host = _pages(rng)
    store = HostPageStore(pages.layout, BLOCK, num_chunks=2, blocks_per_chunk=2)
    pending = store.store_async(pages, [3, 6], [1, 2])
    old_cache = pages.engine.kv_cache.arrays
    pages.write_tokens([3, 6], 0, 2 * BLOCK,  # the next step: donates the cache
                       [tuple(np.zeros((2 * BLOCK, *a.shape[1:]), a.dtype) for a in s)
                        for s in host])
    assert old_cache[0][0].is_deleted()  # donated, while the gather may still read it
    assert not any(a.any() for s in store.rows for a in s)  # nothing written yet
    assert pending.finish() == 2 * store.page_bytes
    for host_set, tier_set, device_set in zip(host, store.rows, _device_values(pages)):
        for h, t, d in zip(host_set, tier_set, device_set):
            np.testing.assert_array_equal(t[_rows([1, 2])], h[_rows([3, 6])])
            assert not d[_rows([3, 6])].any()


def test_the_tier_holds_its_chunks_and_no_more():
    rng = np.random.default_rng(1)
    pages, _ = _pages(rng)
    store = HostPageStore(pages.layout, BLOCK, num_chunks=3, blocks_per_chunk=2)
    # Per page: 4 tokens x (2 x 2 x 8 x 4 bytes + 1 x 12 x 2 bytes).
    assert store.page_bytes == page_bytes(pages.layout, BLOCK) == BLOCK * (128 + 24)
    assert store.nbytes == 6 * store.page_bytes
    assert sum(a.nbytes for s in store.rows for a in s) == store.nbytes
    with pytest.raises(IndexError, match="outside the tier's 6"):
        store.store(pages, [1], [6])
    with pytest.raises(ValueError, match="the chunks hold 4"):
        host_pages([0, 1], 2, skip=1, count=4)
    with pytest.raises(ValueError, match="2 device pages into 1 host pages"):
        store.store(pages, [1, 2], [0])


def _offload_config(extra, path=None):
    return SimpleNamespace(kv_connector="OffloadingConnector", kv_connector_module_path=path,
                           kv_connector_extra_config=extra)


def test_offload_settings_served_and_refused_by_name():
    refuse_unserved(_offload_config({"cpu_bytes_to_use": 1 << 30, "eviction_policy": "arc",
                                     "blocks_per_chunk": 2, "disk_path": "/tmp/x"}))
    refuse_unserved(_offload_config({"cpu_bytes_to_use": "4096"}))
    refusals = [
        ({"num_cpu_blocks": 100, "cpu_bytes_to_use": 1}, "'num_cpu_blocks'"),
        ({}, "needs cpu_bytes_to_use"),
        ({"cpu_bytes_to_use": 0}, "needs cpu_bytes_to_use"),
        ({"cpu_bytes_to_use": 1, "spec_name": "TieringOffloadingSpec"},
         "spec_name 'TieringOffloadingSpec'"),
        ({"cpu_bytes_to_use": 1, "canonical_layout": True}, "canonical_layout"),
    ]
    for extra, match in refusals:
        with pytest.raises(ValueError, match=match):
            refuse_unserved(_offload_config(extra))
    with pytest.raises(ValueError, match="kv_connector_module_path 'my.module'"):
        refuse_unserved(_offload_config({"cpu_bytes_to_use": 1}, path="my.module"))
    with pytest.raises(ValueError, match="'SimpleCPUOffloadConnector'"):
        refuse_unserved(SimpleNamespace(kv_connector="SimpleCPUOffloadConnector",
                                        kv_connector_module_path=None))


def test_kv_offloading_size_refused_for_other_backends():
    native = SimpleNamespace(kv_offloading_size=1.0, kv_offloading_backend="native")
    refuse_unserved_offloading_size(native, use_simple_offload=False)
    refuse_unserved_offloading_size(SimpleNamespace(kv_offloading_size=None), True)
    with pytest.raises(ValueError, match="--kv-offloading-backend lmcache"):
        refuse_unserved_offloading_size(
            SimpleNamespace(kv_offloading_size=1.0, kv_offloading_backend="lmcache"), False)
    with pytest.raises(ValueError, match="VLLM_USE_SIMPLE_KV_OFFLOAD"):
        refuse_unserved_offloading_size(native, use_simple_offload=True)


def test_engine_pages_refuse_an_engine_with_pipeline_stages():
    """With pipeline stages the cache is [stages * slots] per replica; the copier's slot
    arithmetic would write into another stage's or replica's pages, so it is refused
    (the start-up refusal: tests/plugin/test_refusals.py)."""
    cache = KvCache([(jax.device_put(np.zeros((8, 1, 2), np.float32)),)], (0,), (0,))
    engine = SimpleNamespace(replicas=2, stages=2, kv_cache=cache,
                             cfg=SimpleNamespace(block_size=BLOCK, max_model_len=64))
    with pytest.raises(NotImplementedError, match="KV transfer with pipeline stages"):
        EnginePages(engine)
    EnginePages(SimpleNamespace(**dict(vars(engine), stages=1, replicas=1)))  # accepted
