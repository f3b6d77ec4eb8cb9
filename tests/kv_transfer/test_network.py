"""XlaNetworkConnector's two sides without engines, over real localhost TCP: a producer's
finished request hands its pages to a consumer (the tokens the consumer lacks, written into
its own pages), then frees them; a lease that ends unread frees them too; a consumer whose
producer is gone, or whose pages were freed, fails the request with the reason; aborts on
either side free the producer's pages. Two servers end to end:
tests/e2e/test_server_disagg.py."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from tests.e2e.servers import free_port
from xla_inference.runner.kv_pages import ArraySetLayout, token_slots

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # imports vLLM's connector base

BLOCK = 16
LAYOUT = [ArraySetLayout(2, 2, 4, np.dtype(np.float32)), ArraySetLayout(1, 1, 8, np.dtype(np.float16))]


class HostPages:
    """runner/kv_pages.EnginePages' interface over numpy arrays of 64 pages."""

    def __init__(self, rng=None):
        self.layout = LAYOUT
        shape = lambda s: (64 * BLOCK, s.num_kv_heads, s.head_size)  # noqa: E731
        self.arrays = [[(rng.standard_normal(shape(s)) if rng else np.zeros(shape(s)))
                        .astype(s.dtype) for _ in range(s.num_arrays)] for s in LAYOUT]

    def tokens(self, block_ids, start, end):
        slots = token_slots(block_ids, BLOCK, start, end)
        return [tuple(a[slots] for a in arrays) for arrays in self.arrays]

    read_tokens = tokens

    def write_tokens(self, block_ids, start, end, values):
        slots = token_slots(block_ids, BLOCK, start, end)
        for arrays, set_values in zip(self.arrays, values):
            for a, v in zip(arrays, set_values):
                a[slots] = v


def _connector(role: str, side: str, port: int, lease_s: float = 30.0):
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from xla_inference.kv_transfer.network import XlaNetworkConnector

    config = SimpleNamespace(
        kv_transfer_config=KVTransferConfig(
            kv_connector="XlaNetworkConnector", kv_role=role, kv_port=port,
            kv_connector_extra_config={"lease_seconds": lease_s, "fetch_timeout_seconds": 5}),
        cache_config=SimpleNamespace(block_size=BLOCK))
    return XlaNetworkConnector(config, getattr(KVConnectorRole, side), None)


def _request(rid, prompt, params, status=None, computed=0):
    return SimpleNamespace(request_id=rid, prompt_token_ids=prompt, kv_transfer_params=params,
                           status=status, num_computed_tokens=computed)


def _step(worker, meta=None):
    """One engine step of a worker: -> its transfer results."""
    from xla_inference.kv_transfer.network import NetworkMetadata

    worker.bind_connector_metadata(meta if meta is not None else NetworkMetadata())
    worker.start_load_kv(None)
    results = worker.get_transfer_results(set())
    worker.clear_connector_metadata()
    return results


def _merge(into, results):
    into["sending"] |= results.finished_sending
    into["recving"] |= results.finished_recving
    into["failed"] |= results.failed_recving


def _steps_until(workers, done, timeout_s=10.0, first=None):
    """Step every worker until done(results per worker) holds; -> each worker's results
    over those steps (and `first`, per worker: results of an earlier step), merged."""
    merged = [dict(sending=set(), recving=set(), failed=set()) for _ in workers]
    for into, results in zip(merged, first or ()):
        if results is not None:
            _merge(into, results)
    deadline = time.monotonic() + timeout_s
    while not done(merged):
        assert time.monotonic() < deadline, merged
        for worker, into in zip(workers, merged):
            _merge(into, _step(worker))
        time.sleep(0.01)
    return merged


@pytest.fixture
def pair():
    """(producer scheduler, producer worker, consumer scheduler, consumer worker, port)."""
    port = free_port()
    sides = (_connector("kv_producer", "SCHEDULER", port), _connector("kv_producer", "WORKER", port),
             _connector("kv_consumer", "SCHEDULER", port), _connector("kv_consumer", "WORKER", port))
    sides[1].bind_pages(HostPages(np.random.default_rng(0)))
    sides[3].bind_pages(HostPages())
    yield (*sides, port)
    sides[1].shutdown()
    sides[3].shutdown()


def _prefill(p_sched, p_worker, rid, prompt, pages):
    """The producer finishes a max_tokens=1 request: -> the kv_transfer_params it answers."""
    from vllm.v1.request import RequestStatus

    request = _request(rid, prompt, {"do_remote_decode": True},
                       RequestStatus.FINISHED_LENGTH_CAPPED, computed=len(prompt))
    delay, params = p_sched.request_finished(request, pages)
    assert delay
    _step(p_worker, p_sched.build_connector_meta(None))
    return params


def _decode(c_sched, c_worker, rid, prompt, params, local_computed, pages):
    """The consumer admits the request with the producer's params and takes a step; ->
    (tokens to load, asynchronously?), that step's results (a quick failure may be in it)."""
    request = _request(rid, prompt, dict(params))
    count, is_async = c_sched.get_num_new_matched_tokens(request, local_computed)
    blocks = SimpleNamespace(get_block_ids=lambda: (pages,))
    c_sched.update_state_after_alloc(request, blocks, count)
    assert not request.kv_transfer_params["do_remote_prefill"]  # one transfer per request
    return (count, is_async), _step(c_worker, c_sched.build_connector_meta(None))


def test_a_consumer_fetches_the_tokens_it_lacks_and_the_producer_frees_the_pages(pair):
    p_sched, p_worker, c_sched, c_worker, port = pair
    prompt = list(range(3, 40))  # 37 tokens: 3 pages
    p_pages, c_pages = [7, 3, 12], [20, 21, 5]
    params = _prefill(p_sched, p_worker, "p-1", prompt, p_pages)
    assert params == dict(params, do_remote_prefill=True, do_remote_decode=False,
                          remote_host="127.0.0.1", remote_port=port, remote_request_id="p-1",
                          remote_block_ids=p_pages, remote_num_tokens=37)
    # The consumer's prefix cache holds the first page: it loads the other 21 tokens.
    loads, first = _decode(c_sched, c_worker, "d-1", prompt, params, 16, c_pages)
    assert loads == (21, True)
    merged = _steps_until([p_worker, c_worker], lambda m: m[1]["recving"] and m[0]["sending"],
                          first=[None, first])
    assert merged == [dict(sending={"p-1"}, recving=set(), failed=set()),
                      dict(sending=set(), recving={"d-1"}, failed=set())]
    want = p_worker.pages.tokens(p_pages, 16, 37)
    got = c_worker.pages.tokens(c_pages, 16, 37)
    for want_set, got_set in zip(want, got):
        for w, g in zip(want_set, got_set):
            np.testing.assert_array_equal(g, w)
    untouched = c_worker.pages.tokens(c_pages, 0, 16)
    assert not any(a.any() for s in untouched for a in s)
    assert c_worker.counts.loaded_tokens == 21 and p_worker.counts.served_tokens == 37
    # The pages are freed: a second fetch fails the request, naming why.
    _, first = _decode(c_sched, c_worker, "d-2", prompt, params, 0, [9, 10, 11])
    merged = _steps_until([p_worker, c_worker], lambda m: m[1]["failed"], first=[None, first])
    assert merged[1] == dict(sending=set(), recving={"d-2"}, failed={"d-2"})
    assert merged[0]["sending"] == set()


def test_pages_nobody_fetches_are_freed_when_the_lease_ends():
    port = free_port()
    p_sched = _connector("kv_producer", "SCHEDULER", port, lease_s=0.3)
    p_worker = _connector("kv_producer", "WORKER", port, lease_s=0.3)
    p_worker.bind_pages(HostPages(np.random.default_rng(1)))
    c_sched, c_worker = (_connector("kv_consumer", side, port) for side in ("SCHEDULER", "WORKER"))
    c_worker.bind_pages(HostPages())
    try:
        start = time.monotonic()
        params = _prefill(p_sched, p_worker, "p-1", list(range(20)), [1, 2])
        merged = _steps_until([p_worker], lambda m: m[0]["sending"])
        assert merged[0]["sending"] == {"p-1"} and time.monotonic() - start >= 0.3
        assert p_worker.counts.expired_leases == 1
        _, first = _decode(c_sched, c_worker, "d-1", list(range(20)), params, 0, [4, 5])
        merged = _steps_until([p_worker, c_worker], lambda m: m[1]["failed"], first=[None, first])
        assert merged[1]["failed"] == {"d-1"} and merged[0]["sending"] == set()
    finally:
        p_worker.shutdown()
        c_worker.shutdown()


def test_a_dead_producer_fails_the_request(caplog):
    port = free_port()  # nobody listens
    c_sched, c_worker = (_connector("kv_consumer", side, port) for side in ("SCHEDULER", "WORKER"))
    c_worker.bind_pages(HostPages())
    try:
        params = dict(do_remote_prefill=True, remote_host="127.0.0.1", remote_port=port,
                      remote_request_id="p-9", remote_num_tokens=20)
        _, first = _decode(c_sched, c_worker, "d-1", list(range(20)), params, 0, [4, 5])
        merged = _steps_until([c_worker], lambda m: m[0]["failed"], first=[first])
        assert merged[0] == dict(sending=set(), recving={"d-1"}, failed={"d-1"})
        assert f"KV fetch of request d-1 from the prefill server 127.0.0.1:{port}" in caplog.text
        # Kept by the prefill server's request id, for the server's error answer.
        assert c_worker.load_failure("p-9").startswith(
            f"KV fetch of request d-1 from the prefill server 127.0.0.1:{port} (its request "
            f"p-9) failed: ")
        assert c_worker.load_failure("p-1") is None
        assert not any(a.any() for s in c_worker.pages.tokens([4, 5], 0, 20) for a in s)
    finally:
        c_worker.shutdown()


def test_aborts_free_the_producers_pages(pair):
    from vllm.v1.request import RequestStatus

    p_sched, p_worker, c_sched, c_worker, _ = pair
    # Aborted on the producer: nothing kept, nothing answered.
    aborted = _request("p-0", list(range(20)), {"do_remote_decode": True},
                       RequestStatus.FINISHED_ABORTED, computed=20)
    assert p_sched.request_finished(aborted, [1, 2]) == (False, None)
    # Aborted on the consumer before its fetch was scheduled: the producer's pages are
    # released unread, and the consumer reports no load (the request holds no pages).
    params = _prefill(p_sched, p_worker, "p-1", list(range(20)), [1, 2])
    assert c_sched.request_finished(_request("d-1", list(range(20)), dict(params)),
                                    []) == (False, None)
    _step(c_worker, c_sched.build_connector_meta(None))
    merged = _steps_until([p_worker, c_worker], lambda m: m[0]["sending"])
    assert merged == [dict(sending={"p-1"}, recving=set(), failed=set()),
                      dict(sending=set(), recving=set(), failed=set())]
    assert p_worker.counts.released_unread == 1 and p_worker.counts.served_requests == 0
