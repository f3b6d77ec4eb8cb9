"""A KV connector's worker side around our runner's steps, in the order vLLM's GPU runner
keeps (vllm/v1/worker/kv_connector_model_runner_mixin.py): bind the step's metadata, load
before the forward, save after it, report transfers on every step's output (empty steps
too), clear.

The worker creates the connector itself: vLLM's ensure_kv_transfer_initialized broadcasts
over torch process groups this platform does not create.

Across several JAX processes (distributed/multihost.py) every process runs the worker side over
its own KV heads (runner/kv_pages.ProcessSlotCopier), driven by the same connector metadata
(it rides the step's SchedulerOutput, which the driver sends every follower in its order);
only the driver's output reaches vLLM, so each follower hands its step's KVConnectorOutput
to the driver through jax.distributed's key-value store and the driver joins them
(ProcessOutputs)."""

from __future__ import annotations

import logging
import pickle
from copy import copy

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, KVConnectorOutput, ModelRunnerOutput

from xla_inference.kv_transfer.config import (OFFLOADING_CONNECTOR, register_connectors,
                                               refuse_unserved)
from xla_inference.kv_transfer.replicas import (ReplicaConnectorMetadata,
                                                 ReplicaKVConnectorOutput,
                                                 replica_kv_cache_config, replica_vllm_config)
from xla_inference.runner.kv_pages import EnginePages, ReplicaPages

logger = logging.getLogger(__name__)

# How long the driver waits for a follower's step output before it calls the follower lost.
FOLLOWER_OUTPUT_TIMEOUT_S = 300.0


class ProcessOutputs:
    """The driver's join of every JAX process's KVConnectorOutput of a step: a follower puts
    its output (and its transfer counts) in jax.distributed's key-value store under the
    step's number (every process makes the same connector steps in the driver's order); the
    driver takes each follower's and joins them with its own through vLLM's
    KVOutputAggregator, as vLLM joins its workers': a transfer finishes when every process
    has finished it (stores and loads of each process's own heads), a load that failed on
    any process fails the request, invalid blocks are the union, offload's completed jobs
    are summed (each process reports its share of vLLM's world size)."""

    def __init__(self, process_index: int, process_count: int, client=None):
        self.index, self.count = process_index, process_count
        self._client = client
        self._step = 0
        self._aggregator = KVOutputAggregator(process_count)
        self.follower_counts: dict[int, dict] = {}  # the driver's copy of each follower's

    @property
    def client(self):
        if self._client is None:
            from jax._src import distributed

            self._client = distributed.global_state.client
        return self._client

    def join(self, output: KVConnectorOutput, counts: dict) -> KVConnectorOutput:
        step, self._step = self._step, self._step + 1
        if self.index != 0:
            self.client.key_value_set_bytes(_output_key(step, self.index),
                                            pickle.dumps((output, counts)))
            return output
        outputs = [output]
        for process in range(1, self.count):
            key = _output_key(step, process)
            try:
                data = self.client.blocking_key_value_get_bytes(
                    key, int(FOLLOWER_OUTPUT_TIMEOUT_S * 1000))
            except Exception as error:
                raise RuntimeError(f"xla-inference: follower process {process} did not report "
                                   f"its KV transfers of step {step} within "
                                   f"{FOLLOWER_OUTPUT_TIMEOUT_S:.0f}s: {error}") from error
            self.client.key_value_delete(key)
            theirs, self.follower_counts[process] = pickle.loads(data)
            outputs.append(theirs)
        return self.aggregate(outputs)

    def aggregate(self, outputs: list[KVConnectorOutput]) -> KVConnectorOutput:
        """One output from every process's (the driver's first), through vLLM's aggregator."""
        wrapped = []
        for kv_output in outputs:
            runner_output = copy(EMPTY_MODEL_RUNNER_OUTPUT)
            runner_output.kv_connector_output = kv_output
            wrapped.append(runner_output)
        return self._aggregator.aggregate(wrapped).kv_connector_output


def _output_key(step: int, process: int) -> str:
    return f"xla-inference:kv-output/{step}/{process}"


class KvConnectorSteps:
    """The worker's connectors (one per data parallel replica, each over its replica's
    share of the engine's pages: kv_transfer/replicas.py) and the engine's pages."""

    def __init__(self, connectors: list, pages: EnginePages, blocks_per_replica: int = 0):
        self.connectors, self.pages = connectors, pages
        self.blocks_per_replica = blocks_per_replica
        share = getattr(pages, "share", None)
        self.processes = (None if share is None else
                          ProcessOutputs(share.process_index, share.process_count))

    @property
    def connector(self):
        """The first replica's connector (the only one without data parallel replicas)."""
        return self.connectors[0]

    @classmethod
    def build(cls, vllm_config, kv_cache_config, engine) -> KvConnectorSteps | None:
        """None without a --kv-transfer-config."""
        config = vllm_config.kv_transfer_config
        if config is None or config.kv_connector is None:
            return None
        if engine.cfg.num_groups != 1:
            raise ValueError(f"xla-inference's KV connectors serve models with one KV cache "
                             f"group; this model has {engine.cfg.num_groups}")
        register_connectors()
        refuse_unserved(config)  # --kv-offloading-size set its connector after the front-end's checks
        pages = EnginePages(engine)
        replicas = engine.replicas
        if replicas == 1:
            return cls([_worker_connector(vllm_config, kv_cache_config, pages)], pages)
        replica_kv = replica_kv_cache_config(kv_cache_config, replicas)
        connectors = [
            _worker_connector(replica_vllm_config(vllm_config, r, replicas), replica_kv,
                              ReplicaPages(pages, r * engine.blocks_per_replica))
            for r in range(replicas)]
        return cls(connectors, pages, engine.blocks_per_replica)

    def warm_up(self) -> None:
        """Compile the copy programs (runner/kv_pages.py) before serving."""
        self.pages.warm_up()

    def _parts(self, so) -> list[tuple[object, object, set[str]]]:
        """(connector, its metadata, the requests its replica finished) of each replica."""
        meta = so.kv_connector_metadata
        if meta is None:
            raise RuntimeError("a KV connector is configured but the step carries no "
                               "connector metadata")
        if len(self.connectors) == 1:
            return [(self.connector, meta, so.finished_req_ids)]
        if not isinstance(meta, ReplicaConnectorMetadata) or \
                len(meta.parts) != len(self.connectors):
            raise RuntimeError(f"{len(self.connectors)} data parallel replicas' KV connectors "
                               f"got metadata {type(meta).__name__}, not one part per replica "
                               f"(plugin/dp_scheduler.py merges them)")
        return list(zip(self.connectors, meta.parts, meta.finished_req_ids))

    def before_forward(self, so) -> None:
        """Bind the step's metadata and land its loads in the cache the forward will read."""
        for connector, meta, _ in self._parts(so):
            connector.handle_preemptions(meta)
            connector.bind_connector_metadata(meta)
            connector.start_load_kv(None)

    def after_step(self, so) -> KVConnectorOutput:
        """Saves (after the forward was dispatched), then what finished, for the step's
        ModelRunnerOutput; the metadata is cleared. With replicas: each replica's output,
        joined (kv_transfer/replicas.py)."""
        parts, outputs = self._parts(so), []
        try:
            for connector, _, finished in parts:
                outputs.append(_output(connector, finished))
        finally:
            # One replica's connector raising must not leave the later replicas' metadata
            # bound into the next step (the one that raised cleared its own in _output).
            for connector, _, _ in parts[len(outputs) + 1:]:
                connector.clear_connector_metadata()
        if len(outputs) == 1:
            output = outputs[0]
        else:
            output = ReplicaKVConnectorOutput.join(outputs, self.blocks_per_replica)
        if self.processes is not None:
            output = self.processes.join(output, self.counts())
        return output

    def no_forward(self, so) -> ModelRunnerOutput:
        """A step with no tokens: transfers still run and report."""
        for connector in self.connectors:
            idle_wait = getattr(connector, "idle_wait", None)
            if idle_wait is not None:
                idle_wait()
        self.before_forward(so)
        return ModelRunnerOutput.with_kv_conn_output_only(self.after_step(so))

    def handshake_metadata(self) -> dict | None:
        """vLLM's worker contract: {(pp rank, tp rank): metadata}, or None when the
        connector exchanges none (one process drives every local device: rank 0)."""
        metadata = self.connector.get_handshake_metadata()
        if len(self.connectors) > 1 and any(c.get_handshake_metadata() is not None
                                            for c in self.connectors):
            raise NotImplementedError("KV connectors that exchange handshake metadata with "
                                      "data parallel replicas")
        return None if metadata is None else {(0, 0): metadata}

    def load_failure(self, remote_request_id: str) -> str | None:
        """Why a remote prefill's KV failed to load (network connector), else None."""
        for connector in self.connectors:
            explain = getattr(connector, "load_failure", None)
            why = None if explain is None else explain(remote_request_id)
            if why is not None:
                return why
        return None

    def counts_by_process(self) -> list[dict]:
        """This process's counts, then (on the driver across processes) each follower's as
        of its last step."""
        others = {} if self.processes is None else self.processes.follower_counts
        return [self.counts()] + [others[p] for p in sorted(others)]

    def counts(self) -> dict:
        """What the connectors moved, summed over the replicas."""
        total: dict = {}
        for connector in self.connectors:
            counts = getattr(connector, "counts", None)
            for name, value in ({} if counts is None else vars(counts)).items():
                total[name] = total.get(name, 0) + value
        return total

    def shutdown(self) -> None:
        for connector in self.connectors:
            connector.shutdown()


def _worker_connector(vllm_config, kv_cache_config, pages):
    """A connector's worker side over `pages` (the engine's, or a replica's share)."""
    if vllm_config.kv_transfer_config.kv_connector == OFFLOADING_CONNECTOR:
        from xla_inference.kv_transfer.offload import XlaOffloadingConnector  # vLLM's, our worker

        connector = XlaOffloadingConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
    else:
        connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER,
                                                        kv_cache_config)
    connector.bind_pages(pages)
    return connector


def _output(connector, finished_req_ids: set[str]) -> KVConnectorOutput:
    """One connector's saves and transfer results; its metadata cleared."""
    try:
        connector.wait_for_save()
        results = connector.get_transfer_results(finished_req_ids)
        return KVConnectorOutput(
            finished_sending=results.finished_sending,
            finished_recving=results.finished_recving,
            failed_recving=results.failed_recving,
            invalid_block_ids=connector.get_block_ids_with_load_errors(),
            kv_connector_stats=connector.get_kv_connector_stats(),
            kv_cache_events=connector.get_kv_connector_kv_cache_events(),
            kv_connector_worker_meta=connector.build_connector_worker_meta())
    finally:
        connector.clear_connector_metadata()
