"""KV connectors with data parallel replicas inside one engine (plugin/dp_scheduler.py).

Each replica is one of vLLM's schedulers over its own share of the KV pages, with its own
connector's scheduler side; the worker runs one connector worker side per replica over the
same share (runner/kv_pages.ReplicaPages shifts the replica's page ids to the engine's).
Both sides of replica r are built from replica_config(r): its share of the cache
(num_blocks and the tensors' bytes over the replicas), its share of an offload tier
(cpu_bytes_to_use over the replicas: the replicas' tiers together keep the configured
bound), and, for a network connector, its own listening port (kv_port + r: each replica's
worker serves its own pages and its scheduler side advertises that port).

A step's metadata is one ReplicaConnectorMetadata (each replica's, in replica order, and
the requests each replica finished); the step's KV output is a ReplicaKVConnectorOutput
whose fields are the replicas' together and whose `per_replica` the DP scheduler hands back,
each to the scheduler it came from (vLLM's scheduler asserts it holds every request it is
told about, and offload job ids are per replica)."""

from __future__ import annotations

import copy
import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
from vllm.v1.outputs import KVConnectorOutput

from xla_inference.kv_transfer.config import OFFLOADING_CONNECTOR


def replica_kv_cache_config(kv_cache_config, replicas: int):
    """One replica's KVCacheConfig: its share of the pages, and of the tensors' bytes
    (vLLM's offload spec sizes a page as tensor bytes / num_blocks)."""
    replica = copy.deepcopy(kv_cache_config)
    replica.num_blocks = kv_cache_config.num_blocks // replicas
    for tensor in replica.kv_cache_tensors:
        tensor.size = tensor.size // kv_cache_config.num_blocks * replica.num_blocks
    return replica


def replica_vllm_config(vllm_config, replica: int, replicas: int):
    """The VllmConfig replica `replica`'s connector is built from: vllm_config itself
    without a connector or with one replica, else a shallow copy with its own
    kv_transfer_config (the offload tier's share, the network port)."""
    transfer = vllm_config.kv_transfer_config
    if replicas == 1 or transfer is None or transfer.kv_connector is None:
        return vllm_config
    transfer = copy.deepcopy(transfer)
    extra = transfer.kv_connector_extra_config
    if transfer.kv_connector == OFFLOADING_CONNECTOR and "cpu_bytes_to_use" in extra:
        extra["cpu_bytes_to_use"] = int(float(extra["cpu_bytes_to_use"])) // replicas
    if transfer.kv_port is not None:
        transfer.kv_port = int(transfer.kv_port) + replica
    config = copy.copy(vllm_config)
    object.__setattr__(config, "kv_transfer_config", transfer)
    return config


@dataclasses.dataclass
class ReplicaConnectorMetadata(KVConnectorMetadata):
    """A merged step's connector metadata: per replica, its scheduler's metadata and the
    requests it finished since its last step."""

    parts: list = dataclasses.field(default_factory=list)
    finished_req_ids: list[set[str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ReplicaKVConnectorOutput(KVConnectorOutput):
    """The replicas' KV outputs together (request ids are unique across replicas; page ids
    in invalid_block_ids are the engine's), and each replica's own, in its page ids."""

    per_replica: list[KVConnectorOutput] = dataclasses.field(default_factory=list)

    @classmethod
    def join(cls, outputs: list[KVConnectorOutput], blocks_per_replica: int
             ) -> ReplicaKVConnectorOutput:
        def union(name):
            return set().union(*(getattr(o, name) or () for o in outputs))

        return cls(finished_sending=union("finished_sending"),
                   finished_recving=union("finished_recving"),
                   failed_recving=union("failed_recving"),
                   invalid_block_ids={b + r * blocks_per_replica for r, o in enumerate(outputs)
                                      for b in o.invalid_block_ids},
                   per_replica=list(outputs))

    def is_empty(self) -> bool:
        return all(o.is_empty() for o in self.per_replica)
