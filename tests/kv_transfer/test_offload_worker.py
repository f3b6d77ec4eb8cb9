"""The offload connector's transfer worker (kv_transfer/offload.HostOffloadWorker) on vLLM's
own transfer specs, against numpy: chunks of two pages, a run that starts inside its first
chunk (vLLM's block index), stores and loads reported once with their bytes; a store lands
when get_finished finds it arrived or when vLLM waits for it."""

import time

import numpy as np
import pytest

from tests.kv_transfer.test_host_tier import BLOCK, _device_values, _pages, _rows
from xla_inference.kv_transfer.host_tier import HostPageStore

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # vLLM's connector and spec classes


def test_stores_and_loads_follow_vllms_specs():
    from vllm.v1.kv_offload.base import GPULoadStoreSpec
    from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec

    from xla_inference.kv_transfer.offload import HostOffloadWorker, OffloadCounts

    pages, host = _pages(np.random.default_rng(2))
    store = HostPageStore(pages.layout, BLOCK, num_chunks=4, blocks_per_chunk=2)
    worker = HostOffloadWorker(store, pages, OffloadCounts())
    # Blocks 3..5 of a request (device pages 8, 6, 2): block 3 is the second page of its
    # chunk, so they go to host pages 2*3+1, 2*1, 2*1+1 of chunks 3 and 1.
    device = GPULoadStoreSpec([8, 6, 2], group_sizes=[3], block_indices=[3])
    assert worker.submit_store(7, device, CPULoadStoreSpec([3, 1]))
    assert not any(a.any() for s in store.rows for a in s)  # dispatched: not landed yet
    worker.wait({7, 99})  # vLLM waits before it reuses the pages (99: not a store here)
    for host_set, tier_set in zip(host, store.rows):
        for h, t in zip(host_set, tier_set):
            np.testing.assert_array_equal(t[_rows([7, 2, 3])], h[_rows([8, 6, 2])])
    # Loaded back into device pages 1, 4, 9 by a later request.
    assert worker.submit_load(8, CPULoadStoreSpec([3, 1]),
                              GPULoadStoreSpec([1, 4, 9], group_sizes=[3], block_indices=[3]))
    after = _device_values(pages)
    for h, a in zip([x for s in host for x in s], [x for s in after for x in s]):
        np.testing.assert_array_equal(a[_rows([1, 4, 9])], h[_rows([8, 6, 2])])
    finished = worker.get_finished()
    assert [(r.job_id, r.success, r.transfer_size) for r in finished] == \
        [(7, True, 3 * store.page_bytes), (8, True, 3 * store.page_bytes)]
    assert worker.get_finished() == []
    assert (worker.counts.stored_pages, worker.counts.loaded_pages, worker.counts.loads) == (3, 3, 1)
    # A store nobody waits for is reported by the get_finished that finds it arrived.
    assert worker.submit_store(9, GPULoadStoreSpec([5], group_sizes=[1], block_indices=[0]),
                               CPULoadStoreSpec([0]))
    for _ in range(1000):
        if worker.get_finished():
            break
        time.sleep(0.001)
    for host_set, tier_set in zip(host, store.rows):
        for h, t in zip(host_set, tier_set):
            np.testing.assert_array_equal(t[_rows([0])], h[_rows([5])])
    assert worker.counts.stored_pages == 4
    with pytest.raises(ValueError, match="does not pair up"):  # one chunk too many
        worker.submit_store(10, device, CPULoadStoreSpec([3, 1, 0]))
