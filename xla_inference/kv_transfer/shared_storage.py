"""XlaSharedStorageConnector: prefill/decode disaggregation between two engines through a
directory both can read (a local disk for engines on one machine, a shared file system
across machines). vLLM's KVConnectorBase_V1, both sides:

- scheduler side (vLLM's scheduler process): a producer (kv_producer, kv_both) asks, in
  the step that completes a request's prompt, to save that prompt's KV; a consumer
  (kv_consumer, kv_both) answers get_num_new_matched_tokens with the prompt's tokens but
  the last when the directory holds a file for the prompt, and asks to load them into the
  pages vLLM allocated. Loads are synchronous: they land before the step's forward.
- worker side (our runner, plugin/model_runner.py): reads and writes the KV through
  runner/kv_pages.EnginePages (jitted gather/scatter of the donated JAX cache).

Files are keyed by a hash of the model and the prompt's token ids (kv_transfer/storage.py),
so the decode engine needs no kv_transfer_params from the prefill engine: the same prompt
finds its file. An engine over several JAX processes (distributed/multihost.py): each process
saves and loads its own KV heads of the prompt, one file per process (storage.py), the
scheduler side (on the driver) asking for a load once every process's file is there; a
consumer whose processes hold other heads than the producer's is refused on load, naming
both layouts (vLLM then fails or recomputes the request: kv_load_failure_policy).
Settings (kv_connector_extra_config): "shared_storage_path" (the directory; default
<tmp>/xla-inference-kv)."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)

from xla_inference import envs
from xla_inference.kv_transfer import storage
from xla_inference.kv_transfer.config import CONNECTOR_NAME

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class KvCopy:
    """One request's copy in one step: tokens [start, end) of its prompt, in its pages of
    KV cache group 0."""

    req_id: str
    key: str
    block_ids: list[int]
    start: int
    end: int


@dataclasses.dataclass
class SharedStorageMetadata(KVConnectorMetadata):
    loads: list[KvCopy] = dataclasses.field(default_factory=list)
    saves: list[KvCopy] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TransferCounts:
    """What a worker has moved so far (tests, logs)."""

    loaded_requests: int = 0
    loaded_tokens: int = 0
    failed_loads: int = 0
    saved_requests: int = 0
    saved_tokens: int = 0
    saved_bytes: int = 0
    load_seconds: float = 0.0
    save_seconds: float = 0.0


class XlaSharedStorageConnector(KVConnectorBase_V1):

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = self._kv_transfer_config
        self.directory = config.get_from_extra_config(
            "shared_storage_path", os.path.join(tempfile.gettempdir(), "xla-inference-kv"))
        self.block_size = vllm_config.cache_config.block_size
        self.model = str(vllm_config.model_config.model)
        self.produces = config.is_kv_producer
        self.consumes = config.is_kv_consumer
        self.process_count = envs.num_hosts()  # JAX processes of the engine
        # Scheduler side.
        self._requests: dict[str, Any] = {}  # req_id -> vLLM's Request, while it runs
        self._loads: dict[str, tuple[str, int, int]] = {}  # admitted this step: key, start, end
        self._loaded: set[str] = set()  # requests whose prompt came from the directory
        # Worker side.
        self.pages = None  # runner/kv_pages.EnginePages, bound by the runner
        self.counts = TransferCounts()
        self._failed_blocks: set[int] = set()
        logger.info("xla-inference: %s (%s) in %s", CONNECTOR_NAME, config.kv_role,
                    self.directory)

    def _key(self, request) -> str:
        """The prompt's file: its tokens, and what else vLLM's prefix cache tells apart for
        the same tokens (its block hashes' extra keys): the LoRA adapter, each image's hash
        and place, the cache salt. Keyed by tokens alone, a prompt's KV computed under one
        adapter or image was loaded for another."""
        context = []
        lora = getattr(request, "lora_request", None)
        if lora is not None:
            context.append(f"lora:{lora.lora_name}:{lora.lora_path}")
        for feature in getattr(request, "mm_features", None) or ():
            context.append(f"mm:{feature.identifier}:{feature.mm_position.offset}")
        if getattr(request, "cache_salt", None):
            context.append(f"salt:{request.cache_salt}")
        return storage.prompt_key(self.model, request.prompt_token_ids, tuple(context))

    def _stored(self, key: str) -> bool:
        return storage.is_stored(self.directory, key, self.process_count)

    # -- scheduler side ---------------------------------------------------------------------
    def on_new_request(self, request) -> None:
        self._requests[request.request_id] = request

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """The prompt's tokens but the last (the step that computes it samples the first
        output token) beyond what the local prefix cache holds, when the directory holds
        the prompt's KV."""
        prompt = request.prompt_token_ids
        if not self.consumes or not prompt or len(prompt) - 1 <= num_computed_tokens:
            return 0, False
        if not self._stored(self._key(request)):
            return 0, False
        return len(prompt) - 1 - num_computed_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            end = len(request.prompt_token_ids) - 1  # what get_num_new_matched_tokens promised
            self._loads[request.request_id] = (self._key(request),
                                               end - num_external_tokens, end)

    def build_connector_meta(self, scheduler_output) -> SharedStorageMetadata:
        meta = SharedStorageMetadata()
        for rid, (key, start, end) in self._loads.items():  # admitted, so scheduled, now
            block_ids = self._block_ids(scheduler_output, rid)[0]
            meta.loads.append(KvCopy(rid, key, list(block_ids), start, end))
            self._loaded.add(rid)
        self._loads.clear()
        if self.produces:
            meta.saves = self._saves(scheduler_output)
        return meta

    def _saves(self, so) -> list[KvCopy]:
        """A save for each request whose prompt this step completes, unless its prompt's KV
        is in the directory already (it came from there, or an earlier request saved it)."""
        computed = {req.req_id: req.num_computed_tokens for req in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        saves = []
        for rid, num_new in so.num_scheduled_tokens.items():
            request = self._requests.get(rid)
            if request is None or rid in self._loaded or not request.prompt_token_ids:
                continue
            prompt = request.prompt_token_ids
            if not computed[rid] < len(prompt) <= computed[rid] + num_new:
                continue
            key = self._key(request)
            if storage.is_stored(self.directory, key, self.process_count, other_layouts=False):
                continue
            saves.append(KvCopy(rid, key, list(self._block_ids(so, rid)[0]), 0, len(prompt)))
        return saves

    def _block_ids(self, so, rid: str):
        state = so.kv_connector_block_state
        ids = state.get_block_ids(rid) if state is not None else None
        return ids if ids is not None else self._kv_cache_manager.get_block_ids(rid)

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        """Saves finish within the step that asks for them: the pages are free to go."""
        self._requests.pop(request.request_id, None)
        self._loaded.discard(request.request_id)
        self._loads.pop(request.request_id, None)
        return False, None

    # -- worker side ------------------------------------------------------------------------
    def bind_pages(self, pages) -> None:
        """The engine's cache (runner/kv_pages.EnginePages): our runner's counterpart of
        vLLM's register_kv_caches, which takes torch tensors."""
        self.pages = pages

    def register_kv_caches(self, kv_caches) -> None:
        raise NotImplementedError("xla-inference binds its JAX cache with bind_pages")

    def start_load_kv(self, forward_context, **kwargs) -> None:
        """Write each load's tokens into its pages, before the step's forward reads them."""
        meta = self._get_connector_metadata()
        for load in meta.loads:
            start = time.perf_counter()
            try:
                share = getattr(self.pages, "share", None)
                values = storage.load(storage.path_for(self.directory, load.key, share),
                                      self.pages.layout, load.start, load.end, share)
            except (OSError, ValueError) as error:
                # vLLM fails the request or recomputes these pages (kv_load_failure_policy).
                logger.error("xla-inference: KV load for request %s failed: %s", load.req_id,
                             error)
                self.counts.failed_loads += 1
                first, last = load.start // self.block_size, (load.end - 1) // self.block_size
                self._failed_blocks.update(load.block_ids[first:last + 1])
                continue
            self.pages.write_tokens(load.block_ids, load.start, load.end, values)
            self.counts.loaded_requests += 1
            self.counts.loaded_tokens += load.end - load.start
            self.counts.load_seconds += time.perf_counter() - start

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads land whole before the forward (start_load_kv)."""

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        """Saves copy every layer's pages at once after the forward (wait_for_save)."""

    def wait_for_save(self) -> None:
        """Copy each save's prompt out of the cache the step wrote and write its file;
        called after the step's forward was dispatched (the gather runs after it), and done
        before the step's output goes back, so a consumer finds the file once the producer
        has answered."""
        meta = self._get_connector_metadata()
        for save in meta.saves:
            start = time.perf_counter()
            values = self.pages.read_tokens(save.block_ids, save.start, save.end)
            share = getattr(self.pages, "share", None)
            self.counts.saved_bytes += storage.save(
                storage.path_for(self.directory, save.key, share), values, share)
            self.counts.saved_requests += 1
            self.counts.saved_tokens += save.end - save.start
            self.counts.save_seconds += time.perf_counter() - start

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed
