"""KV cache offload to host memory through vLLM's own OffloadingConnector
(`--kv-offloading-size GiB`, or `--kv-transfer-config '{"kv_connector":"OffloadingConnector",
"kv_role":"kv_both","kv_connector_extra_config":{"cpu_bytes_to_use":N}}'`).

vLLM's scheduler side runs unchanged (the engine core creates vLLM's OffloadingConnector by
name): its CPU offloading manager keys each full page by its prefix hash, hands out host
chunks (cpu_bytes_to_use / bytes per chunk of them), evicts the least recently used, and on
a request whose prefix the device cache lost but the host tier holds, admits it with those
tokens counted as external hits, loading them before it runs. Only the worker side is
ours: vLLM's copies index torch tensors by raw pointers, and our donated JAX cache moves
every step, so XlaOffloadingConnector (vLLM's connector class with our transfer worker in
place of its CUDA one) copies pages with the runner's jitted gather/scatter programs
(host_tier.HostPageStore). A store is dispatched right before the next step's forward
(vLLM defers stores so) and lands in the tier while that forward runs (reported by the
get_finished that finds it arrived); a load is copied before the forward that first
reads it.

Across several JAX processes each process keeps its own KV heads of every offloaded page in
its own host memory (the pages it copies are its shards: runner/kv_pages.ProcessSlotCopier),
and reports its share of each finished job (process_reports); the driver sums them
(kv_transfer/steps.ProcessOutputs)."""

from __future__ import annotations

import dataclasses
import logging
import time

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
    OffloadingConnector,
)
from vllm.v1.kv_offload.base import OffloadingWorker, TransferResult

from xla_inference.kv_transfer.config import OFFLOAD_DISK_PATH
from xla_inference.kv_transfer.host_tier import HostPageStore, host_pages

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class OffloadCounts:
    """What the worker has moved so far (tests, logs)."""

    stored_pages: int = 0  # stores finished (landed in the tier)
    loaded_pages: int = 0
    loads: int = 0
    stored_bytes: int = 0
    loaded_bytes: int = 0
    store_seconds: float = 0.0  # the step thread's: dispatch, then the host copy
    load_seconds: float = 0.0


def _page_pairs(device_spec, host_spec, blocks_per_chunk: int):
    """(device pages, host pages) of a transfer: vLLM's device spec lists each cache
    group's pages in turn (group_sizes), starting at block index block_indices[g] of the
    request; the host spec lists chunks, each group's run starting inside its first chunk
    at that index modulo blocks_per_chunk."""
    device, host = [], []
    offset, chunk = 0, 0
    chunks = host_spec.block_ids
    for count, first in zip(device_spec.group_sizes, device_spec.block_indices):
        if count == 0:
            continue
        skip = first % blocks_per_chunk
        used = -(-(skip + count) // blocks_per_chunk)
        device.extend(int(b) for b in device_spec.block_ids[offset:offset + count])
        host.extend(host_pages(chunks[chunk:chunk + used], blocks_per_chunk, skip, count))
        offset, chunk = offset + count, chunk + used
    if offset != len(device_spec.block_ids) or chunk != len(chunks):
        raise ValueError(f"a transfer of {len(device_spec.block_ids)} device pages and "
                         f"{len(chunks)} host chunks of {blocks_per_chunk} pages does not "
                         f"pair up (groups {list(device_spec.group_sizes)})")
    return device, host


@dataclasses.dataclass
class _Store:
    """A store job whose pages are on their way from the device."""

    pending: object  # host_tier.PendingStore
    num_pages: int
    submitted: float  # time.perf_counter()


class HostOffloadWorker(OffloadingWorker):
    """vLLM's OffloadingWorker for the host tier. A load finishes in its submit call. A
    store is dispatched (the device gathers the pages and sends them to the host while the
    step's forward runs) and finishes in the first get_finished that finds its values
    arrived, or in wait(), which vLLM calls before it reuses the pages of a store it has not
    heard back from; either reports it."""

    def __init__(self, store: HostPageStore, pages, counts: OffloadCounts):
        self.store, self.pages, self.counts = store, pages, counts
        self._finished: list[TransferResult] = []
        self._stores: dict[int, _Store] = {}

    def submit_store(self, job_id, src_spec, dst_spec) -> bool:
        start = time.perf_counter()
        device, host = _page_pairs(src_spec, dst_spec, self.store.blocks_per_chunk)
        self._stores[job_id] = _Store(self.store.store_async(self.pages, device, host),
                                      len(device), start)
        self.counts.store_seconds += time.perf_counter() - start
        return True

    def _finish_stores(self, job_ids) -> None:
        for job_id in job_ids:
            job = self._stores.pop(job_id)
            start = time.perf_counter()
            nbytes = job.pending.finish()
            self._done(job_id, nbytes, time.perf_counter() - job.submitted)
            self.counts.stored_pages += job.num_pages
            self.counts.stored_bytes += nbytes
            self.counts.store_seconds += time.perf_counter() - start

    def submit_load(self, job_id, src_spec, dst_spec) -> bool:
        start = time.perf_counter()
        device, host = _page_pairs(dst_spec, src_spec, self.store.blocks_per_chunk)
        nbytes = self.store.load(self.pages, host, device)
        self._done(job_id, nbytes, time.perf_counter() - start)
        self.counts.loads += 1
        self.counts.loaded_pages += len(device)
        self.counts.loaded_bytes += nbytes
        self.counts.load_seconds += time.perf_counter() - start
        return True

    def _done(self, job_id: int, nbytes: int, seconds: float) -> None:
        self._finished.append(TransferResult(job_id=job_id, success=True,
                                             transfer_size=nbytes, transfer_time=seconds))

    def get_finished(self) -> list[TransferResult]:
        self._finish_stores([j for j, job in self._stores.items() if job.pending.ready()])
        finished, self._finished = self._finished, []
        return finished

    def wait(self, job_ids: set[int]) -> None:
        """Finish the given stores now (loads finish when submitted)."""
        self._finish_stores([j for j in job_ids if j in self._stores])

    def shutdown(self) -> None:
        self._stores.clear()
        self.store.close()


def process_reports(world_size: int, process_index: int, process_count: int) -> int:
    """How many of vLLM's world_size reports of a finished job one of several JAX processes
    makes: shares that sum to world_size, so vLLM's scheduler (which counts reports across
    steps) completes a job once every process has finished its own heads of it."""
    if world_size < process_count:
        raise ValueError(f"KV offload across {process_count} JAX processes needs vLLM's world "
                         f"size ({world_size}) of at least that many")
    share = world_size // process_count
    return share + (world_size % process_count if process_index == 0 else 0)


class XlaOffloadingConnector(OffloadingConnector):
    """vLLM's OffloadingConnector, worker side, on the runner's JAX cache."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config):
        if role != KVConnectorRole.WORKER:
            raise ValueError("XlaOffloadingConnector is the worker side; the scheduler runs "
                             "vLLM's OffloadingConnector")
        super().__init__(vllm_config, role, kv_cache_config)
        # One process drives every local device (the worker for all tensor parallel ranks),
        # while vLLM's scheduler waits for world_size reports of each finished transfer.
        self._num_workers = vllm_config.parallel_config.world_size
        self._disk_path = self._kv_transfer_config.get_from_extra_config(OFFLOAD_DISK_PATH,
                                                                          None)
        self.counts = OffloadCounts()

    def bind_pages(self, pages) -> None:
        """Give vLLM's worker side our transfer worker over the engine's cache (instead of
        register_kv_caches, which takes torch tensors)."""
        worker_side = self.connector_worker
        spec = worker_side.spec
        store = HostPageStore(pages.layout, pages.block_size, spec.num_chunks,
                              spec.blocks_per_chunk, path=self._disk_path)
        # vLLM sized the tier (num_chunks) from its own estimate of a chunk's bytes; ours
        # must not exceed it, or the tier would outgrow cpu_bytes_to_use.
        if store.page_bytes * spec.blocks_per_chunk > spec.kv_bytes_per_chunk:
            raise ValueError(f"KV offload: a chunk of this cache takes "
                             f"{store.page_bytes * spec.blocks_per_chunk} bytes, more than "
                             f"vLLM's {spec.kv_bytes_per_chunk} per chunk")
        if spec.num_chunks == 0:
            raise ValueError(f"KV offload: cpu_bytes_to_use holds no chunk of "
                             f"{spec.kv_bytes_per_chunk} bytes")
        worker_side.worker = HostOffloadWorker(store, pages, self.counts)
        share = getattr(pages, "share", None)
        if share is not None:  # several JAX processes, each its own heads in its own tier
            self._num_workers = process_reports(self._num_workers, share.process_index,
                                                share.process_count)
        logger.info("xla-inference: KV offload to %s: %d chunks of %d pages (%.1f MiB)",
                    self._disk_path or "host memory", spec.num_chunks, spec.blocks_per_chunk,
                    store.nbytes / 2**20)

    def register_kv_caches(self, kv_caches) -> None:
        raise NotImplementedError("xla-inference binds its JAX cache with bind_pages")

    def build_connector_worker_meta(self):
        meta = super().build_connector_worker_meta()
        if meta is not None and self._num_workers > 1:
            meta.completed_jobs = dict.fromkeys(meta.completed_jobs, self._num_workers)
        return meta
