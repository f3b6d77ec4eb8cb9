"""KV connectors with data parallel replicas (kv_transfer/replicas.py) without engines: the
worker's steps (kv_transfer/steps.py) hand each replica's connector its own part of the
merged metadata and the requests its replica finished; their outputs are joined (page ids
of failed loads shifted into the engine's) and the DP scheduler hands each replica back its
own part (vLLM's scheduler asserts it holds every request it is told about)."""

from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # vLLM's connector and output classes


class _Recorder:
    """A connector worker side that records its calls and reports what it is told to."""

    def __init__(self, finished_recving, failed_blocks):
        self.calls, self.meta = [], None
        self._recving, self._failed = finished_recving, failed_blocks
        self.counts = SimpleNamespace(loaded_pages=len(failed_blocks), loads=1)

    def handle_preemptions(self, meta):
        self.calls.append(("preempt", meta))

    def bind_connector_metadata(self, meta):
        self.meta = meta

    def start_load_kv(self, _):
        self.calls.append(("load", self.meta))

    def wait_for_save(self):
        self.calls.append(("save", self.meta))

    def get_transfer_results(self, finished):
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

        self.calls.append(("finished", set(finished)))
        return KVConnectorTransferResults(finished_recving=set(self._recving))

    def get_block_ids_with_load_errors(self):
        return set(self._failed)

    def get_kv_connector_stats(self):
        return None

    def get_kv_connector_kv_cache_events(self):
        return None

    def build_connector_worker_meta(self):
        return None

    def clear_connector_metadata(self):
        self.meta = None


def test_each_replica_gets_its_own_part_and_its_own_output_back():
    from vllm.v1.outputs import ModelRunnerOutput

    from xla_inference.kv_transfer.replicas import ReplicaConnectorMetadata
    from xla_inference.kv_transfer.steps import KvConnectorSteps
    from xla_inference.plugin.dp_scheduler import _replica_output

    connectors = [_Recorder({"a"}, {3}), _Recorder({"b", "c"}, {1, 2})]
    steps = KvConnectorSteps(connectors, pages=None, blocks_per_replica=10)
    so = SimpleNamespace(kv_connector_metadata=ReplicaConnectorMetadata(
        ["meta0", "meta1"], [{"x"}, {"y", "z"}]), finished_req_ids={"x", "y", "z"})
    steps.before_forward(so)
    out = steps.after_step(so)
    assert connectors[0].calls == [("preempt", "meta0"), ("load", "meta0"), ("save", "meta0"),
                                   ("finished", {"x"})]
    assert connectors[1].calls == [("preempt", "meta1"), ("load", "meta1"), ("save", "meta1"),
                                   ("finished", {"y", "z"})]
    assert all(c.meta is None for c in connectors)  # cleared after the step
    assert out.finished_recving == {"a", "b", "c"}
    assert out.invalid_block_ids == {3, 11, 12}  # the engine's page ids
    assert steps.counts() == {"loaded_pages": 3, "loads": 2}
    runner_output = ModelRunnerOutput.with_kv_conn_output_only(out)
    parts = [_replica_output(runner_output, r).kv_connector_output for r in range(2)]
    assert [(p.finished_recving, p.invalid_block_ids) for p in parts] == \
        [({"a"}, {3}), ({"b", "c"}, {1, 2})]  # each in its replica's own page ids
    assert runner_output.kv_connector_output is out  # the runner's output is not changed
    with pytest.raises(RuntimeError, match="not one part per replica"):
        steps.before_forward(SimpleNamespace(kv_connector_metadata="meta"))


def test_a_replica_whose_output_raises_leaves_no_metadata_bound():
    """The error reaches the runner, and every replica's metadata is cleared anyway: none is
    left bound into the next step."""
    from xla_inference.kv_transfer.replicas import ReplicaConnectorMetadata
    from xla_inference.kv_transfer.steps import KvConnectorSteps

    class _Failing(_Recorder):
        def wait_for_save(self):
            raise OSError("disk full")

    connectors = [_Recorder(set(), set()), _Failing(set(), set()), _Recorder(set(), set())]
    steps = KvConnectorSteps(connectors, pages=None, blocks_per_replica=10)
    so = SimpleNamespace(kv_connector_metadata=ReplicaConnectorMetadata(
        ["m0", "m1", "m2"], [set(), set(), set()]), finished_req_ids=set())
    steps.before_forward(so)
    assert [c.meta for c in connectors] == ["m0", "m1", "m2"]
    with pytest.raises(OSError, match="disk full"):
        steps.after_step(so)
    assert [c.meta for c in connectors] == [None, None, None]
    assert ("save", "m2") not in connectors[2].calls  # never reached, cleared all the same
