"""A KV connector's worker side around our runner's steps, in the order vLLM's GPU runner
keeps (vllm/v1/worker/kv_connector_model_runner_mixin.py): bind the step's metadata, load
before the forward, save after it, report transfers on every step's output (empty steps
too), clear.

The worker creates the connector itself: vLLM's ensure_kv_transfer_initialized broadcasts
over torch process groups this platform does not create."""

from __future__ import annotations

import logging

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

from xla_inference.kv_transfer.config import (OFFLOADING_CONNECTOR, register_connectors,
                                               refuse_unserved)
from xla_inference.runner.kv_pages import EnginePages

logger = logging.getLogger(__name__)


class KvConnectorSteps:
    """The worker's connector and the engine's pages it copies."""

    def __init__(self, connector, pages: EnginePages):
        self.connector, self.pages = connector, pages

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
        if config.kv_connector == OFFLOADING_CONNECTOR:  # vLLM's, with our worker side
            from xla_inference.kv_transfer.offload import XlaOffloadingConnector

            connector = XlaOffloadingConnector(vllm_config, KVConnectorRole.WORKER,
                                               kv_cache_config)
        else:
            connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER,
                                                            kv_cache_config)
        pages = EnginePages(engine)
        connector.bind_pages(pages)
        return cls(connector, pages)

    def warm_up(self) -> None:
        """Compile the copy programs (runner/kv_pages.py) before serving."""
        self.pages.warm_up()

    def before_forward(self, so) -> None:
        """Bind the step's metadata and land its loads in the cache the forward will read."""
        meta = so.kv_connector_metadata
        if meta is None:
            raise RuntimeError("a KV connector is configured but the step carries no "
                               "connector metadata")
        self.connector.handle_preemptions(meta)
        self.connector.bind_connector_metadata(meta)
        self.connector.start_load_kv(None)

    def after_step(self, so) -> KVConnectorOutput:
        """Saves (after the forward was dispatched), then what finished, for the step's
        ModelRunnerOutput; the metadata is cleared."""
        connector = self.connector
        try:
            connector.wait_for_save()
            results = connector.get_transfer_results(so.finished_req_ids)
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

    def no_forward(self, so) -> ModelRunnerOutput:
        """A step with no tokens: transfers still run and report."""
        idle_wait = getattr(self.connector, "idle_wait", None)
        if idle_wait is not None:
            idle_wait()
        self.before_forward(so)
        return ModelRunnerOutput.with_kv_conn_output_only(self.after_step(so))

    def handshake_metadata(self) -> dict | None:
        """vLLM's worker contract: {(pp rank, tp rank): metadata}, or None when the
        connector exchanges none (one process drives every local device: rank 0)."""
        metadata = self.connector.get_handshake_metadata()
        return None if metadata is None else {(0, 0): metadata}

    def load_failure(self, remote_request_id: str) -> str | None:
        """Why a remote prefill's KV failed to load (network connector), else None."""
        explain = getattr(self.connector, "load_failure", None)
        return None if explain is None else explain(remote_request_id)

    def counts(self) -> dict:
        counts = getattr(self.connector, "counts", None)
        return {} if counts is None else dict(vars(counts))

    def shutdown(self) -> None:
        self.connector.shutdown()
