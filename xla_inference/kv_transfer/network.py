"""XlaNetworkConnector: prefill/decode disaggregation between two servers over TCP, in
vLLM's kv_transfer_params flow (the one its NIXL connector and disaggregated proxy use):

1. The proxy sends the request to the prefill server (kv_producer) with max_tokens=1 and
   kv_transfer_params {"do_remote_decode": true}. When it finishes, request_finished keeps
   its pages (delay free) and answers, in the response's kv_transfer_params, where to fetch
   them: {"do_remote_prefill": true, "remote_host", "remote_port", "remote_request_id",
   "remote_block_ids", "remote_num_tokens", "remote_engine_id"}.
2. The proxy sends the original request to the decode server (kv_consumer) with those
   params. Its scheduler side reports the prompt's tokens beyond its own prefix cache as
   loaded asynchronously (the request waits in WAITING_FOR_REMOTE_KVS); its worker fetches
   them on a thread, writes them into the request's pages between steps and reports the
   request in finished_recving (failed_recving too when the fetch failed: vLLM then fails
   the request, kv_load_failure_policy "fail", or recomputes it, "recompute").
3. The producer's worker serves each finished request's tokens once, gathered from its
   cache by the jitted gather program between steps (runner/kv_pages.py), then reports it
   in finished_sending so vLLM frees its pages; a request nobody fetches within the lease
   ("lease_seconds") is freed the same way.

Values travel as whole (unsharded) arrays and are written with the consumer's shardings,
so the two servers may use different tensor parallel sizes.

Settings: kv_port (the producer's listening port), kv_connector_extra_config "host" (the
address it listens on and advertises; default 127.0.0.1), "lease_seconds" (default 60),
"fetch_timeout_seconds" (default 30)."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import socket
import threading
import time
import uuid

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole,
                                                               KVConnectorTransferResults)

from xla_inference.kv_transfer import wire
from xla_inference.kv_transfer.config import NETWORK_CONNECTOR

logger = logging.getLogger(__name__)

# How long a producer waits for its step thread to learn of a request that a consumer
# already asks for (the response reaches the proxy one step before the worker hears of it).
_UNKNOWN_REQUEST_GRACE_S = 5.0
_IDLE_WAIT_S = 0.005
_RECENT = 4096  # request ids remembered as read or expired, for a clear refusal


class _Recent(collections.OrderedDict):
    """The last _RECENT entries put."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if len(self) > _RECENT:
            self.popitem(last=False)


@dataclasses.dataclass
class Lease:
    """A finished request's pages the producer keeps for a consumer."""

    req_id: str
    block_ids: list[int]
    num_tokens: int
    expires: float = 0.0  # time.monotonic(); set by the worker when it learns of it


@dataclasses.dataclass
class Fetch:
    """Tokens [start, end) of a remote request's KV, into the local request's pages;
    start == end only releases the remote pages."""

    req_id: str
    host: str
    port: int
    remote_req_id: str
    block_ids: list[int]
    start: int
    end: int


@dataclasses.dataclass
class _Ask:
    """A consumer's ask, between a server thread and the step thread."""

    request_id: str
    start: int
    end: int
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future)
    taken: bool = False  # the step thread answers it
    abandoned: bool = False  # the server thread stopped waiting


@dataclasses.dataclass
class NetworkMetadata(KVConnectorMetadata):
    leases: list[Lease] = dataclasses.field(default_factory=list)
    fetches: list[Fetch] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class NetworkCounts:
    """What a worker has moved so far (tests, logs, benchmarks)."""

    served_requests: int = 0
    served_tokens: int = 0
    served_bytes: int = 0
    gather_seconds: float = 0.0
    expired_leases: int = 0
    released_unread: int = 0
    loaded_requests: int = 0
    loaded_tokens: int = 0
    loaded_bytes: int = 0
    failed_loads: int = 0
    fetch_seconds: float = 0.0  # on the fetch threads, ask to last byte
    scatter_seconds: float = 0.0


def _remote_prefill(params: dict | None) -> bool:
    return bool(params and params.get("do_remote_prefill")
                and all(k in params for k in ("remote_host", "remote_port",
                                              "remote_request_id", "remote_num_tokens")))


class XlaNetworkConnector(KVConnectorBase_V1):

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = self._kv_transfer_config
        self.host = str(config.get_from_extra_config("host", "127.0.0.1"))
        self.port = int(config.kv_port)
        self.lease_s = float(config.get_from_extra_config("lease_seconds", 60.0))
        self.fetch_timeout_s = float(config.get_from_extra_config("fetch_timeout_seconds", 30.0))
        self.engine_id = config.engine_id or str(uuid.uuid4())
        self.block_size = vllm_config.cache_config.block_size
        self.produces = config.is_kv_producer
        self.consumes = config.is_kv_consumer
        # Scheduler side: what the next step's metadata carries.
        self._new_leases: list[Lease] = []
        self._new_fetches: dict[str, Fetch] = {}
        # Worker side.
        self.pages = None  # runner/kv_pages.EnginePages, bound by the runner
        self.counts = NetworkCounts()
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}  # served on the step thread
        self._asks: queue.Queue = queue.Queue()  # _Ask from the server threads
        self._sent: set[str] = set()  # served or released: finished_sending next
        self._gone = _Recent()  # request id -> why its pages are no longer kept
        self._load_failures = _Recent()  # remote request id -> why its fetch failed
        self._fetched: queue.Queue = queue.Queue()  # (Fetch, values | error, seconds)
        self._fetchers = None
        self._server = None
        self._wake = threading.Event()  # an ask or a fetch arrived: the idle wait ends
        logger.info("xla-inference: %s (%s), %s:%d, lease %.0fs", NETWORK_CONNECTOR,
                    config.kv_role, self.host, self.port, self.lease_s)

    # -- scheduler side ---------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """A request with a remote prefill loads, asynchronously, its prompt's tokens
        beyond the local prefix cache."""
        params = request.kv_transfer_params
        if not _remote_prefill(params):
            return 0, False
        if not self.consumes:
            logger.warning("request %s asks for a remote prefill, but this engine's kv_role "
                           "%s does not consume KV: it prefills the prompt itself",
                           request.request_id, self._kv_transfer_config.kv_role)
            return 0, False
        remote = min(int(params["remote_num_tokens"]), len(request.prompt_token_ids or ()))
        count = remote - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not self.consumes or not _remote_prefill(params):
            return
        end = min(int(params["remote_num_tokens"]), len(request.prompt_token_ids or ()))
        start = end - num_external_tokens if num_external_tokens > 0 else end
        self._new_fetches[request.request_id] = Fetch(
            request.request_id, str(params["remote_host"]), int(params["remote_port"]),
            str(params["remote_request_id"]), list(blocks.get_block_ids()[0]), start, end)
        params["do_remote_prefill"] = False  # one transfer per request, preemptions included

    def build_connector_meta(self, scheduler_output) -> NetworkMetadata:
        meta = NetworkMetadata(leases=self._new_leases, fetches=list(self._new_fetches.values()))
        self._new_leases, self._new_fetches = [], {}
        return meta

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        """A prefill for a remote decode keeps its pages until the consumer read them (or
        the lease ends) and answers where to read them; anything else frees them now."""
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if self.consumes and _remote_prefill(params):  # aborted before its fetch was scheduled
            self._new_fetches[request.request_id] = Fetch(
                request.request_id, str(params["remote_host"]), int(params["remote_port"]),
                str(params["remote_request_id"]), [], 0, 0)
            params["do_remote_prefill"] = False
            return False, None
        if not params or not params.get("do_remote_decode"):
            return False, None
        if not self.produces:
            logger.warning("request %s asks for a remote decode, but this engine's kv_role %s "
                           "does not produce KV: its pages are freed", request.request_id,
                           self._kv_transfer_config.kv_role)
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted or failed: nothing to hand over
        pages = list(block_ids)  # group 0: one KV cache group (kv_transfer/steps.py)
        num_tokens = min(request.num_computed_tokens, len(pages) * self.block_size)
        if num_tokens <= 0:
            return False, None
        self._new_leases.append(Lease(request.request_id, pages, num_tokens))
        return True, dict(do_remote_prefill=True, do_remote_decode=False,
                          remote_engine_id=self.engine_id, remote_host=self.host,
                          remote_port=self.port, remote_request_id=request.request_id,
                          remote_block_ids=pages, remote_num_tokens=num_tokens)

    # -- worker side ------------------------------------------------------------------------
    def bind_pages(self, pages) -> None:
        """The engine's cache (runner/kv_pages.EnginePages); starts the producer's server."""
        self.pages = pages
        if self.produces and self._server is None:
            self._server = _PageServer(self)
        if self.consumes and self._fetchers is None:
            self._fetchers = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix="xla-kv-fetch")

    def register_kv_caches(self, kv_caches) -> None:
        raise NotImplementedError("xla-inference binds its JAX cache with bind_pages")

    def start_load_kv(self, forward_context, **kwargs) -> None:
        """The step thread's turn with the cache, before the forward: take the new leases,
        answer the server's waiting asks, start the new fetches."""
        meta = self._get_connector_metadata()
        now = time.monotonic()
        with self._lock:
            for lease in meta.leases:
                lease.expires = now + self.lease_s
                self._leases[lease.req_id] = lease
        self._answer_asks()
        for fetch in meta.fetches:
            self._fetchers.submit(self._fetch, fetch)

    def _answer_asks(self) -> None:
        """Gather what the server's asks want; asks for requests this worker has not heard
        of yet wait for a later step (the server thread gives up on them after a grace)."""
        waiting = []
        while True:
            try:
                ask = self._asks.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                if ask.abandoned:
                    continue
                lease = self._leases.pop(ask.request_id, None)
                ask.taken = lease is not None
            if lease is None:
                waiting.append(ask)
                continue
            try:
                ask.future.set_result(self._gather(lease, ask))
            except Exception as error:  # the server thread must hear of it
                ask.future.set_exception(wire.TransferError(f"gathering failed: {error}"))
                self._served(lease, 0)
                raise
        for ask in waiting:
            self._asks.put(ask)

    def _gather(self, lease: Lease, ask: _Ask):
        """(lease, values or None for a release, error or None); the lease is no longer
        kept (the server reports it sent once the answer went out)."""
        start, end = ask.start, ask.end
        if start == end:
            return lease, None, None
        if not 0 <= start < end <= lease.num_tokens:
            return lease, None, (f"tokens [{start}, {end}) asked of request {lease.req_id}, "
                                 f"which kept {lease.num_tokens}")
        begin = time.perf_counter()
        values = self.pages.read_tokens(lease.block_ids, start, end)
        self.counts.gather_seconds += time.perf_counter() - begin
        return lease, values, None

    def _fetch(self, fetch: Fetch) -> None:
        """On a fetch thread: ask the producer, read the answer; the step thread writes it."""
        begin = time.perf_counter()
        try:
            with socket.create_connection((fetch.host, fetch.port),
                                          timeout=self.fetch_timeout_s) as sock:
                wire.send_ask(sock, fetch.remote_req_id, fetch.start, fetch.end)
                values = (None if fetch.start == fetch.end else
                          wire.recv_values(sock, self.pages.layout, fetch.end - fetch.start))
            outcome = values
        except (OSError, ValueError, wire.TransferError) as error:
            outcome = wire.TransferError(
                f"KV fetch of request {fetch.req_id} from the prefill server "
                f"{fetch.host}:{fetch.port} (its request {fetch.remote_req_id}) failed: "
                f"{error}")
        self._fetched.put((fetch, outcome, time.perf_counter() - begin))
        self._wake.set()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Write the fetched tokens into their pages (dispatched after this step's forward,
        ahead of the next); report them, the failed fetches, and the producer's pages that
        were read, released or whose lease ended."""
        results = KVConnectorTransferResults()
        while True:
            try:
                fetch, outcome, seconds = self._fetched.get_nowait()
            except queue.Empty:
                break
            if fetch.start == fetch.end:  # a release: the request holds no pages waiting
                continue
            results.finished_recving.add(fetch.req_id)
            if isinstance(outcome, Exception):
                logger.error("xla-inference: %s", outcome)
                self._load_failures[fetch.remote_req_id] = str(outcome)
                self.counts.failed_loads += 1
                results.failed_recving.add(fetch.req_id)
                continue
            begin = time.perf_counter()
            self.pages.write_tokens(fetch.block_ids, fetch.start, fetch.end, outcome)
            self.counts.scatter_seconds += time.perf_counter() - begin
            self.counts.fetch_seconds += seconds
            self.counts.loaded_requests += 1
            self.counts.loaded_tokens += fetch.end - fetch.start
            self.counts.loaded_bytes += sum(a.nbytes for s in outcome for a in s)
        now = time.monotonic()
        with self._lock:
            results.finished_sending, self._sent = self._sent, set()
            for rid in [r for r, lease in self._leases.items() if lease.expires <= now]:
                self._gone[rid] = f"its lease of {self.lease_s:.0f}s ended unread"
                logger.warning("xla-inference: no decode server read request %s's KV within "
                               "its lease of %.0fs: its pages are freed", rid, self.lease_s)
                del self._leases[rid]
                self.counts.expired_leases += 1
                results.finished_sending.add(rid)
        return results

    def load_failure(self, remote_request_id: str) -> str | None:
        """Why the fetch of the prefill server's request `remote_request_id` failed (None:
        it did not, or too long ago): the server's error answer quotes it."""
        return self._load_failures.get(remote_request_id)

    def _served(self, lease: Lease, num_bytes: int | None) -> None:
        """From the server: the lease's answer went out (None: released unread)."""
        with self._lock:
            self._sent.add(lease.req_id)
            self._gone[lease.req_id] = "it was read already" if num_bytes else "it was released"
            if num_bytes is None:
                self.counts.released_unread += 1
            else:
                self.counts.served_requests += 1
                self.counts.served_tokens += lease.num_tokens
                self.counts.served_bytes += num_bytes

    def idle_wait(self) -> None:
        """Before a step with no tokens (kv_transfer/steps.py): vLLM's engine loops on empty
        steps while pages wait to be read or fetched; wait up to a few milliseconds for an
        ask or a fetch instead of spinning a core."""
        self._wake.wait(_IDLE_WAIT_S)
        self._wake.clear()

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Fetched tokens land whole between steps (get_transfer_results)."""

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        """The producer keeps pages in its cache; nothing is saved during the forward."""

    def wait_for_save(self) -> None:
        """Nothing to wait for: pages are read when a consumer asks."""

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._fetchers is not None:
            self._fetchers.shutdown(wait=False, cancel_futures=True)
            self._fetchers = None


class _PageServer:
    """The producer's TCP server: a thread accepting asks, one thread per connection that
    hands the ask to the step thread (which owns the cache) and sends its answer."""

    def __init__(self, connector: XlaNetworkConnector):
        self.connector = connector
        self.sock = socket.create_server((connector.host, connector.port), reuse_port=False)
        self.closed = False
        threading.Thread(target=self._accept, name="xla-kv-server", daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="xla-kv-serve",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        connector = self.connector
        with conn:
            conn.settimeout(connector.fetch_timeout_s)
            try:
                ask = wire.read_ask(conn)
            except (OSError, wire.TransferError) as error:
                logger.warning("xla-inference: bad KV ask: %s", error)
                return
            logger.debug("xla-inference: KV ask %s from %s", ask, conn.getpeername())
            ask = _Ask(ask["request_id"], ask["start"], ask["end"])
            try:
                lease, values, error = self._answer(ask)
            except wire.TransferError as refused:
                if ask.start == ask.end:  # a release of pages already gone: nothing to do
                    logger.debug("xla-inference: %s", refused)
                    return
                self._refuse(conn, str(refused))
                return
            try:
                if error is not None:
                    self._refuse(conn, error)
                    num_bytes = 0
                elif values is None:
                    num_bytes = None
                else:
                    num_bytes = wire.send_values(conn, connector.pages.layout, values)
            except OSError as lost:
                logger.warning("xla-inference: sending request %s's KV failed: %s; its pages "
                               "are freed", lease.req_id, lost)
                num_bytes = 0
            connector._served(lease, num_bytes)

    def _answer(self, ask: _Ask):
        """The step thread's answer; TransferError for a request whose pages are gone, or
        that the step thread has not heard of within a grace (idle engines take no steps)."""
        connector = self.connector
        with connector._lock:
            gone = connector._gone.get(ask.request_id)
        if gone is not None:
            raise wire.TransferError(f"request {ask.request_id}'s KV is no longer kept: {gone}")
        connector._asks.put(ask)
        connector._wake.set()
        try:
            return ask.future.result(timeout=_UNKNOWN_REQUEST_GRACE_S)
        except concurrent.futures.TimeoutError:
            with connector._lock:
                ask.abandoned = not ask.taken
            if ask.abandoned:
                raise wire.TransferError(f"no KV kept for request {ask.request_id} (never "
                                         f"prefilled here?)") from None
            return ask.future.result()  # being gathered now

    @staticmethod
    def _refuse(conn: socket.socket, message: str) -> None:
        logger.warning("xla-inference: KV ask refused: %s", message)
        try:
            wire.send_error(conn, message)
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()
