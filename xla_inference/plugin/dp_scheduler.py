"""Data parallelism inside one engine process: N vLLM schedulers behind one SchedulerInterface.

Each replica owns its requests, a 1/N slice of the KV block pool and its own prefix cache.
Their per-step batches are merged into one SchedulerOutput that the single model runner
executes as one SPMD program. Block-id contract: in a merged output every KV block id of
replica r is shifted by r * blocks_per_replica, so replica r owns global blocks
[r * bpr, (r + 1) * bpr) and its null block is r * bpr. A model with several KV cache
groups (sliding-window layers beside full ones) works the same way: every group's block
ids, the null blocks of freed pages included, are shifted alike. Select it with
scheduler_cls = "xla_inference.plugin.dp_scheduler.DataParallelScheduler" and
additional_config = {"xla_data_parallel_size": N}.

A KV connector (--kv-transfer-config) runs per replica too: each replica's scheduler has
its own connector over its share of the pages, the merged step carries their metadata
together, and each replica reads its own part of the step's KV output
(kv_transfer/replicas.py).

Each replica keeps vLLM's full scheduler_config budgets (max_num_seqs requests and
max_num_batched_tokens tokens a step): the engine pads each replica's share of a step to
its own bucket (runner/engine.py), so one merged step may carry N times either.
"""

import copy
import dataclasses
from collections import defaultdict

import numpy as np
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import SchedulerInterface
from vllm.v1.core.sched.output import (CachedRequestData, GrammarOutput, ScheduledEncoderInputStats,
                                       SchedulerOutput)
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.metrics.stats import PrefixCacheStats, SchedulerStats

from xla_inference.kv_transfer.replicas import (ReplicaConnectorMetadata,
                                                 ReplicaKVConnectorOutput,
                                                 replica_kv_cache_config, replica_vllm_config)

_OR_FLAGS = ("has_structured_output_requests", "pending_structured_output_tokens", "has_sync_kv_loads")
# Opaque per-scheduler payloads that cannot be merged: at most one replica may set each.
_SINGLE = ("aux_output_connector_metadata", "ec_connector_metadata",
           "ec_manager_metadata", "kv_connector_block_state")


class DataParallelScheduler(SchedulerInterface):
    """N independent (Async)Schedulers; a request stays on one replica for its life."""

    def __init__(self, vllm_config, kv_cache_config, structured_output_manager, block_size,
                 hash_block_size=None, mm_registry=MULTIMODAL_REGISTRY, include_finished_set=False,
                 log_stats=False, **kwargs):
        n = int((vllm_config.additional_config or {}).get("xla_data_parallel_size", 1))
        if n < 1 or kv_cache_config.num_blocks // n < 1:
            raise ValueError(f"xla_data_parallel_size={n} with {kv_cache_config.num_blocks} KV blocks")
        # vLLM checked that one max_model_len sequence fits the whole cache; here it must fit
        # one replica's share (its null block excluded), or such a request would wait forever.
        usable = kv_cache_config.num_blocks // n - 1
        needed = _blocks_per_request(vllm_config, kv_cache_config)
        if usable < needed:
            raise ValueError(
                f"the KV cache ({kv_cache_config.num_blocks} blocks of {block_size} tokens) split "
                f"over {n} data parallel replicas holds {usable} blocks per replica "
                f"({usable * block_size} tokens), fewer than the {needed} one request of "
                f"max_model_len={vllm_config.model_config.max_model_len} takes: give the cache "
                "more memory (kv_cache_memory_bytes / gpu_memory_utilization) or lower "
                "max_model_len")
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.structured_output_manager = structured_output_manager
        self.log_stats = log_stats
        self.data_parallel_size = n
        self.blocks_per_replica = kv_cache_config.num_blocks // n
        cls = AsyncScheduler if vllm_config.scheduler_config.async_scheduling else Scheduler
        self.replicas: list[Scheduler] = []
        replica_kv = replica_kv_cache_config(kv_cache_config, n)
        for r in range(n):
            # The structured output manager is shared: its state is per request, and its one
            # bitmask buffer is copied out after each replica's call (get_grammar_bitmask).
            # A KV connector is built from the replica's own config (its share of an offload
            # tier, its port), as the worker builds the replica's worker side.
            self.replicas.append(cls(
                vllm_config=replica_vllm_config(vllm_config, r, n),
                kv_cache_config=copy.deepcopy(replica_kv),
                structured_output_manager=structured_output_manager, block_size=block_size,
                hash_block_size=hash_block_size, mm_registry=mm_registry,
                include_finished_set=include_finished_set, log_stats=log_stats))
        if any(r.ec_connector is not None for r in self.replicas):
            raise NotImplementedError("EC transfer connectors are not supported with data parallelism")
        self.kv_cache_manager = self.replicas[0].kv_cache_manager  # EngineCore reads its block size
        # EngineCore asks whether a KV connector runs (request hashes, kv_transfer_params)
        # and sets workers' handshake metadata on it (ours exchange none: steps.py refuses).
        self.connector = self.replicas[0].connector
        self.ec_connector = None
        self.replica_of: dict[str, int] = {}  # live request id -> replica index
        # id(merged output) -> (merged output, per-replica outputs) until update_from_output;
        # with async scheduling the next step is scheduled before the last one is updated.
        self._parts: dict[int, tuple[SchedulerOutput, list[SchedulerOutput]]] = {}

    # Requests.

    def add_request(self, request) -> None:
        """New requests go to the least loaded replica (ties: lowest index); a streaming
        update for a live request goes to the replica that holds it."""
        r = self.replica_of.get(request.request_id)
        if r is None:
            loads = [sum(replica.get_request_counts()) for replica in self.replicas]
            r = loads.index(min(loads))
        self.replicas[r].add_request(request)
        self.replica_of[request.request_id] = r
        self._forget(r, [request.request_id])

    def finish_requests(self, request_ids, finished_status) -> list:
        """Finish requests (None: all) on the replicas that hold them."""
        if request_ids is None:
            groups = {r: None for r in range(self.data_parallel_size)}
        else:
            groups = defaultdict(list)
            for rid in ((request_ids,) if isinstance(request_ids, str) else request_ids):
                if rid in self.replica_of:
                    groups[self.replica_of[rid]].append(rid)
        finished = []
        for r, ids in groups.items():
            done = self.replicas[r].finish_requests(ids, finished_status)
            self._forget(r, [req.request_id for req in done])
            finished.extend(done)
        return finished

    def _forget(self, r: int, request_ids) -> None:
        """Drop the routes of requests that replica r no longer holds."""
        for rid in request_ids:
            if rid not in self.replicas[r].requests and self.replica_of.get(rid) == r:
                del self.replica_of[rid]

    # Scheduling.

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        parts = [replica.schedule(throttle_prefills) for replica in self.replicas]
        merged = self._merge(parts)
        self._parts[id(merged)] = (merged, parts)
        return merged

    def _merge(self, parts: list[SchedulerOutput]) -> SchedulerOutput:
        """One SchedulerOutput from the replicas' outputs, block ids shifted, inputs untouched."""
        new_reqs, shift = [], self._shift
        cached = CachedRequestData.make_empty()
        for r, part in enumerate(parts):
            new_reqs += [dataclasses.replace(new, block_ids=shift(r, new.block_ids))
                         for new in part.scheduled_new_reqs]
            c = part.scheduled_cached_reqs
            for name in ("req_ids", "new_token_ids", "num_computed_tokens", "num_output_tokens"):
                getattr(cached, name).extend(getattr(c, name))
            cached.resumed_req_ids |= c.resumed_req_ids
            cached.all_token_ids.update(c.all_token_ids)
            cached.new_block_ids += [shift(r, ids) for ids in c.new_block_ids]
        merged = SchedulerOutput(
            scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached,
            num_scheduled_tokens=_union(p.num_scheduled_tokens for p in parts),
            total_num_scheduled_tokens=sum(p.total_num_scheduled_tokens for p in parts),
            scheduled_spec_decode_tokens=_union(p.scheduled_spec_decode_tokens for p in parts),
            scheduled_encoder_inputs=_union(p.scheduled_encoder_inputs for p in parts),
            finished_req_ids=set().union(*(p.finished_req_ids for p in parts)),
            free_encoder_mm_hashes=[h for p in parts for h in p.free_encoder_mm_hashes],
            num_spec_tokens_to_schedule=max(p.num_spec_tokens_to_schedule for p in parts),
            num_common_prefix_blocks=[0] * len(self.kv_cache_config.kv_cache_groups))
        for name in _OR_FLAGS:
            setattr(merged, name, any(getattr(p, name) for p in parts))
        if self.connector is not None:
            merged.kv_connector_metadata = ReplicaConnectorMetadata(
                [p.kv_connector_metadata for p in parts], [p.finished_req_ids for p in parts])
        for name in _SINGLE:
            values = [getattr(p, name) for p in parts if getattr(p, name) is not None]
            if len(values) > 1:
                raise NotImplementedError(f"cannot merge {name} of several replicas")
            setattr(merged, name, values[0] if values else None)
        if any(p.preempted_req_ids is not None for p in parts):
            merged.preempted_req_ids = set().union(*(p.preempted_req_ids or () for p in parts))
        merged.num_invalid_spec_tokens = _union_or_none(p.num_invalid_spec_tokens for p in parts)
        if stats := [p.scheduled_encoder_input_stats for p in parts if p.scheduled_encoder_input_stats]:
            merged.scheduled_encoder_input_stats = ScheduledEncoderInputStats(
                sum(s.num_inputs for s in stats), sum(s.output_tokens for s in stats))
        if any(p.new_block_ids_to_zero is not None for p in parts):
            merged.new_block_ids_to_zero = [b + r * self.blocks_per_replica for r, p in enumerate(parts)
                                            for b in p.new_block_ids_to_zero or ()]
        if any(p.kv_cache_block_copies is not None for p in parts):
            bpr = self.blocks_per_replica
            merged.kv_cache_block_copies = [
                type(c)(c.src_block_id + r * bpr, c.dst_block_id + r * bpr)
                for r, p in enumerate(parts) for c in p.kv_cache_block_copies or ()]
        return merged

    def _shift(self, r: int, block_ids):
        """Replica r's per-group block id lists in global ids (new lists; None stays None)."""
        if block_ids is None or r == 0:
            return block_ids
        offset = r * self.blocks_per_replica
        return tuple([b + offset for b in group] for group in block_ids)

    def get_grammar_bitmask(self, scheduler_output):
        """Each replica's rows, in replica order; None when no request needs a grammar."""
        ids, masks, drafts = [], [], []
        for replica, part in zip(self.replicas, self._parts[id(scheduler_output)][1]):
            out = replica.get_grammar_bitmask(part)
            if out is None:
                continue
            ids += out.structured_output_request_ids
            # Copy: the shared manager returns a view of one buffer that the next call refills.
            masks.append(np.array(out.grammar_bitmask, copy=True))
            drafts += out.num_acceptable_drafts or [0] * len(out.structured_output_request_ids)
        return GrammarOutput(ids, np.concatenate(masks), drafts) if ids else None

    def update_from_output(self, scheduler_output, model_runner_output) -> dict[int, EngineCoreOutputs]:
        """Each replica reads its own requests from the shared runner output (its lookups go
        through req_id_to_index, so the other replicas' ids are ignored); the per-client
        outputs are concatenated and one merged SchedulerStats is attached."""
        _, parts = self._parts.pop(id(scheduler_output))
        merged: dict[int, EngineCoreOutputs] = {}
        stats = []
        for r, (replica, part) in enumerate(zip(self.replicas, parts)):
            output = _replica_output(model_runner_output, r)
            for client, eco in replica.update_from_output(part, output).items():
                if eco.scheduler_stats is not None:
                    stats.append(eco.scheduler_stats)
                self._forget(r, [o.request_id for o in eco.outputs if o.finished])
                into = merged.setdefault(client, EngineCoreOutputs(outputs=[]))
                into.outputs.extend(eco.outputs)
                if eco.finished_requests:
                    into.finished_requests = (into.finished_requests or set()) | eco.finished_requests
        # Drop what is left empty (a replica's stats-only entry), then attach one SchedulerStats
        # (the runner's cudagraph_stats reached every replica: it is kept once, not N times).
        merged = {c: e for c, e in merged.items() if e.outputs or e.finished_requests is not None}
        if stats:
            eco = next(iter(merged.values()), None) or merged.setdefault(0, EngineCoreOutputs(outputs=[]))
            eco.scheduler_stats = self._merge_stats(stats)
        return merged

    def get_kv_connector(self):
        return self.connector

    def update_draft_token_ids(self, draft_token_ids) -> None:
        for replica in self.replicas:  # each skips requests it does not hold
            replica.update_draft_token_ids(draft_token_ids)

    def update_draft_token_ids_in_output(self, draft_token_ids, scheduler_output) -> None:
        parts = self._parts[id(scheduler_output)][1]
        for replica, part in zip(self.replicas, parts):
            replica.update_draft_token_ids_in_output(draft_token_ids, part)
        scheduler_output.scheduled_spec_decode_tokens = _union(p.scheduled_spec_decode_tokens for p in parts)
        scheduler_output.num_invalid_spec_tokens = _union_or_none(p.num_invalid_spec_tokens for p in parts)

    # State and stats.

    def get_num_unfinished_requests(self) -> int:
        return sum(r.get_num_unfinished_requests() for r in self.replicas)

    def has_finished_requests(self) -> bool:
        return any(r.has_finished_requests() for r in self.replicas)

    def has_requests(self) -> bool:
        return any(r.has_requests() for r in self.replicas)

    def get_request_counts(self) -> tuple[int, int]:
        counts = [r.get_request_counts() for r in self.replicas]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def get_kv_cache_usage(self) -> float:
        return sum(r.get_kv_cache_usage() for r in self.replicas) / self.data_parallel_size

    def make_stats(self) -> SchedulerStats | None:
        if not self.log_stats:
            return None
        return self._merge_stats([r.make_stats() for r in self.replicas])

    def _merge_stats(self, stats: list[SchedulerStats]) -> SchedulerStats:
        """Counts, prefix-cache counters (the connectors' too) and KV connector stats summed,
        KV usage averaged over the replicas; the other per-step payloads (cudagraph, perf)
        are the first replica's."""
        connector_prefix = [s.connector_prefix_cache_stats for s in stats
                            if s.connector_prefix_cache_stats is not None]
        out = dataclasses.replace(
            stats[0], prefix_cache_stats=PrefixCacheStats(), kv_cache_eviction_events=[],
            num_kv_fetch_reqs_by_stage={},
            connector_prefix_cache_stats=PrefixCacheStats() if connector_prefix else None,
            kv_connector_stats=self._merge_kv_connector_stats(
                [s.kv_connector_stats for s in stats]))
        out.kv_cache_usage = sum(s.kv_cache_usage for s in stats) / len(stats)
        for s in stats[1:]:
            for name in ("num_running_reqs", "num_waiting_reqs", "num_skipped_waiting_reqs"):
                setattr(out, name, getattr(out, name) + getattr(s, name))
        for p in connector_prefix:
            _add_prefix_cache_stats(out.connector_prefix_cache_stats, p)
        for s in stats:
            _add_prefix_cache_stats(out.prefix_cache_stats, s.prefix_cache_stats)
            for stage, count in s.num_kv_fetch_reqs_by_stage.items():
                out.num_kv_fetch_reqs_by_stage[stage] = out.num_kv_fetch_reqs_by_stage.get(stage, 0) + count
            out.kv_cache_eviction_events += s.kv_cache_eviction_events
        specs = [s.spec_decoding_stats for s in stats if s.spec_decoding_stats is not None]
        if specs:
            spec = out.spec_decoding_stats = copy.deepcopy(specs[0])
            for other in specs[1:]:
                for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
                    setattr(spec, name, getattr(spec, name) + getattr(other, name))
                for name in ("num_accepted_tokens_per_pos", "num_draft_tokens_per_pos"):
                    setattr(spec, name, [a + b for a, b in zip(getattr(spec, name), getattr(other, name))])
        return out

    def _merge_kv_connector_stats(self, payloads: list) -> dict | None:
        """The replicas' KV connector stats (each a connector's to_dict payload) as one,
        aggregated by the connector's own stats class."""
        payloads = [p for p in payloads if p]
        if len(payloads) < 2:
            return payloads[0] if payloads else None
        build = type(self.connector).build_kv_connector_stats
        merged = build(data=copy.deepcopy(payloads[0]))
        if merged is None:  # the connector keeps no stats class: the first replica's
            return payloads[0]
        for payload in payloads[1:]:
            merged = merged.aggregate(build(data=copy.deepcopy(payload)))
        return merged.to_dict()

    @property
    def pause_state(self):
        return self.replicas[0].pause_state

    def set_pause_state(self, pause_state) -> None:
        for replica in self.replicas:
            replica.set_pause_state(pause_state)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        return all([r.reset_prefix_cache(reset_running_requests, reset_connector) for r in self.replicas])

    def reset_encoder_cache(self) -> None:
        for replica in self.replicas:
            replica.reset_encoder_cache()

    def get_kv_event_publisher_config(self):
        return self.replicas[0].get_kv_event_publisher_config()

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()


def _blocks_per_request(vllm_config, kv_cache_config) -> int:
    """Blocks one request of max_model_len takes at most: its pages in every KV cache group
    (a sliding window's group holds only its window's), all from one pool."""
    return sum(cdiv(group.kv_cache_spec.max_memory_usage_bytes(vllm_config),
                    group.kv_cache_spec.page_size_bytes)
               for group in kv_cache_config.kv_cache_groups)


def _add_prefix_cache_stats(into: PrefixCacheStats, p: PrefixCacheStats) -> None:
    into.reset |= p.reset
    for name in ("requests", "queries", "hits",
                 "preempted_requests", "preempted_queries", "preempted_hits"):
        setattr(into, name, getattr(into, name) + getattr(p, name))
    for source, hits in p.hits_by_source.items():
        into.hits_by_source[source] = into.hits_by_source.get(source, 0) + hits


def _replica_output(model_runner_output, r: int):
    """The runner's output as replica r reads it: its own part of a KV output of several
    replicas (a shallow copy; the output itself may be vLLM's shared empty one)."""
    kv_output = getattr(model_runner_output, "kv_connector_output", None)
    if not isinstance(kv_output, ReplicaKVConnectorOutput):
        return model_runner_output
    output = copy.copy(model_runner_output)
    output.kv_connector_output = kv_output.per_replica[r]
    return output


def _union(dicts) -> dict:
    merged = {}
    for d in dicts:
        merged.update(d)
    return merged


def _union_or_none(dicts) -> dict | None:
    dicts = [d for d in dicts if d is not None]
    return _union(dicts) if dicts else None
