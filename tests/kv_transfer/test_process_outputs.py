"""The driver's join of every JAX process's KV connector output of a step
(kv_transfer/steps.ProcessOutputs, through jax.distributed's key-value store, here a dict):
a transfer finishes once every process has finished it, a load failed on one process fails
the request, invalid blocks are the union, offload job reports are summed to vLLM's world
size (each process its share: kv_transfer/offload.process_reports)."""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # vLLM's output and metadata classes


class _KeyValueStore:
    """jax.distributed's key-value store, as ProcessOutputs uses it."""

    def __init__(self):
        self.values = {}

    def key_value_set_bytes(self, key, value):
        assert key not in self.values
        self.values[key] = value

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        return self.values[key]

    def key_value_delete(self, key):
        del self.values[key]


def test_the_driver_joins_the_processes_step_outputs():
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
        OffloadingWorkerMetadata,
    )
    from vllm.v1.outputs import KVConnectorOutput

    from xla_inference.kv_transfer.offload import process_reports
    from xla_inference.kv_transfer.steps import ProcessOutputs

    kv = _KeyValueStore()
    driver, follower = ProcessOutputs(0, 2, kv), ProcessOutputs(1, 2, kv)
    # Step 0: each process finished a different request's load; the follower's load of
    # block 3 failed (shared storage reports such blocks), the driver's of block 9.
    mine = follower.join(KVConnectorOutput(finished_recving={"a"}, invalid_block_ids={3}),
                         {"loaded_tokens": 5})
    assert mine.finished_recving == {"a"}  # a follower's own output (vLLM never sees it)
    out = driver.join(KVConnectorOutput(finished_recving={"b"}, finished_sending={"s"},
                                        invalid_block_ids={9}), {"loaded_tokens": 7})
    assert not out.finished_recving and not out.finished_sending
    assert out.invalid_block_ids == {3, 9}
    assert driver.follower_counts == {1: {"loaded_tokens": 5}}
    # Step 1: the other halves; "a" failed on the driver: failed for the request.
    follower.join(KVConnectorOutput(finished_recving={"b"}, finished_sending={"s"}), {})
    out = driver.join(KVConnectorOutput(finished_recving={"a"}, failed_recving={"a"}), {})
    assert out.finished_recving == {"a", "b"} and out.failed_recving == {"a"}
    assert out.finished_sending == {"s"} and not out.invalid_block_ids
    assert kv.values == {}  # every follower output taken and deleted
    # Offload: each process reports its share of vLLM's world size for a job it finished.
    shares = [process_reports(2, p, 2) for p in range(2)]
    assert shares == [1, 1]
    follower.join(KVConnectorOutput(kv_connector_worker_meta=OffloadingWorkerMetadata(
        completed_jobs={7: shares[1]})), {})
    out = driver.join(KVConnectorOutput(kv_connector_worker_meta=OffloadingWorkerMetadata(
        completed_jobs={7: shares[0], 8: shares[0]})), {})
    assert out.kv_connector_worker_meta.completed_jobs == {7: 2, 8: 1}
    assert [process_reports(8, p, 3) for p in range(3)] == [4, 2, 2]
    with pytest.raises(ValueError, match="world size"):
        process_reports(1, 0, 2)
