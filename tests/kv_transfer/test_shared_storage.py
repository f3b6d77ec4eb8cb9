"""XlaSharedStorageConnector's two sides without engines: the file format round trip, the
scheduler side's loads and saves from vLLM's request and step data, and the worker side's
copies and load failures (reported as vLLM's invalid block ids). The engines together:
tests/e2e/test_llm_kv_transfer.py."""

from types import SimpleNamespace

import numpy as np
import pytest

from xla_inference.kv_transfer import storage
from xla_inference.runner.kv_pages import ArraySetLayout

pytestmark = [pytest.mark.slow, pytest.mark.vllm]  # imports vLLM's connector base

BLOCK = 16
LAYOUT = [ArraySetLayout(2, 2, 4, np.dtype(np.float32)), ArraySetLayout(1, 1, 8, np.dtype(np.float32))]


def _values(rng, n):
    return [tuple(rng.standard_normal((n, s.num_kv_heads, s.head_size)).astype(s.dtype)
                  for _ in range(s.num_arrays)) for s in LAYOUT]


def test_a_saved_prompt_reads_back_in_any_token_range(tmp_path):
    rng = np.random.default_rng(0)
    values = _values(rng, 37)
    path = storage.path_for(tmp_path, storage.prompt_key("m", range(37)))
    storage.save(path, values)
    got = storage.load(path, LAYOUT, 5, 30)
    for got_set, want_set in zip(got, values):
        for g, w in zip(got_set, want_set):
            np.testing.assert_array_equal(g, w[5:30])
    with pytest.raises(ValueError, match="holds 37 tokens"):
        storage.load(path, LAYOUT, 0, 38)
    other = [LAYOUT[0], ArraySetLayout(1, 2, 8, np.dtype(np.float32))]
    with pytest.raises(ValueError, match="layout"):
        storage.load(path, other, 0, 4)


def test_prompt_keys_depend_on_model_and_every_token():
    key = storage.prompt_key("m", [1, 2, 3])
    assert key == storage.prompt_key("m", np.asarray([1, 2, 3], np.int32))
    assert key != storage.prompt_key("m", [1, 2, 4])
    assert key != storage.prompt_key("n", [1, 2, 3])


def _connector(tmp_path, role: str, side: str):
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from xla_inference.kv_transfer.shared_storage import XlaSharedStorageConnector

    config = SimpleNamespace(
        kv_transfer_config=KVTransferConfig(
            kv_connector="XlaSharedStorageConnector", kv_role=role,
            kv_connector_extra_config={"shared_storage_path": str(tmp_path)}),
        cache_config=SimpleNamespace(block_size=BLOCK), model_config=SimpleNamespace(model="m"))
    return XlaSharedStorageConnector(config, getattr(KVConnectorRole, side), None)


def _request(rid, prompt):
    return SimpleNamespace(request_id=rid, prompt_token_ids=prompt)


def _step(new=(), cached=(), blocks=None):
    """A SchedulerOutput's fields the connector reads. new: (rid, prompt, computed, scheduled);
    cached: (rid, computed, scheduled); blocks: rid -> page ids."""
    new_reqs = [SimpleNamespace(req_id=r, prompt_token_ids=p, num_computed_tokens=c,
                                block_ids=(blocks[r],)) for r, p, c, _ in new]
    cached_reqs = SimpleNamespace(req_ids=[r for r, _, _ in cached], resumed_req_ids=set(),
                                  num_computed_tokens=[c for _, c, _ in cached],
                                  new_block_ids=[None] * len(cached))
    scheduled = {r: n for r, _, _, n in new} | {r: n for r, _, n in cached}
    state = SimpleNamespace(get_block_ids=lambda r: (blocks[r],) if r in scheduled else None)
    return SimpleNamespace(scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached_reqs,
                           num_scheduled_tokens=scheduled, kv_connector_block_state=state,
                           finished_req_ids=set())


def test_a_producer_saves_each_prompt_in_the_step_that_completes_it(tmp_path):
    producer = _connector(tmp_path, "kv_producer", "SCHEDULER")
    long, short = list(range(3, 43)), list(range(50, 55))
    for rid, prompt in (("a", long), ("b", short)):
        producer.on_new_request(_request(rid, prompt))
        assert producer.get_num_new_matched_tokens(_request(rid, prompt), 0) == (0, False)
    blocks = {"a": [4, 5, 6], "b": [9]}
    # Step 1: a's first chunk (32 of 40 tokens) and all of b.
    meta = producer.build_connector_meta(_step(new=[("a", long, 0, 32), ("b", short, 0, 5)],
                                               blocks=blocks))
    assert meta.loads == [] and [(s.req_id, s.start, s.end, s.block_ids) for s in meta.saves] \
        == [("b", 0, 5, [9])]
    # Step 2: a's last chunk; b decodes (its prompt is done: no second save).
    meta = producer.build_connector_meta(_step(cached=[("a", 32, 8), ("b", 5, 1)], blocks=blocks))
    assert [(s.req_id, s.start, s.end, s.block_ids) for s in meta.saves] == \
        [("a", 0, 40, [4, 5, 6])]
    assert meta.saves[0].key == storage.prompt_key("m", long)


def test_a_consumer_loads_a_stored_prompt_but_its_last_token(tmp_path):
    prompt = list(range(3, 40))  # 37 tokens
    storage.save(storage.path_for(tmp_path, storage.prompt_key("m", prompt)),
                 _values(np.random.default_rng(1), 37))
    consumer = _connector(tmp_path, "kv_consumer", "SCHEDULER")
    request = _request("r", prompt)
    consumer.on_new_request(request)
    # 16 tokens in the consumer's own prefix cache: the connector adds the next 20.
    assert consumer.get_num_new_matched_tokens(request, 16) == (20, False)
    assert consumer.get_num_new_matched_tokens(_request("x", prompt[:-1]), 0) == (0, False)
    consumer.update_state_after_alloc(request, None, 20)
    meta = consumer.build_connector_meta(_step(new=[("r", prompt, 36, 1)],
                                               blocks={"r": [7, 8, 2]}))
    assert [(c.req_id, c.start, c.end, c.block_ids) for c in meta.loads] == \
        [("r", 16, 36, [7, 8, 2])]
    assert meta.saves == []  # a consumer saves nothing
    assert consumer.request_finished(request, [7, 8, 2]) == (False, None)


def test_the_same_tokens_under_another_adapter_image_or_salt_are_another_prompt(tmp_path):
    """vLLM's prefix cache tells these apart (its block hashes' extra keys); the directory
    must too: a prompt's KV saved under one LoRA adapter, image or cache salt is not loaded
    for another, and a producer saves each under its own name."""
    from vllm.lora.request import LoRARequest
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    prompt = list(range(3, 40))
    storage.save(storage.path_for(tmp_path, storage.prompt_key("m", prompt)),
                 _values(np.random.default_rng(1), 37))

    def image(identifier, offset=2):
        return MultiModalFeatureSpec(data=None, modality="image", identifier=identifier,
                                     mm_position=PlaceholderRange(offset=offset, length=8))

    variants = {
        "adapter": dict(lora_request=LoRARequest("a16", 1, "/adapters/a16")),
        "image": dict(mm_features=[image("img-1")]),
        "image elsewhere": dict(mm_features=[image("img-1", offset=10)]),
        "other image": dict(mm_features=[image("img-2")]),
        "salt": dict(cache_salt="tenant-7"),
    }
    consumer = _connector(tmp_path, "kv_consumer", "SCHEDULER")
    plain = SimpleNamespace(request_id="plain", prompt_token_ids=prompt, lora_request=None,
                            mm_features=[], cache_salt=None)
    assert consumer.get_num_new_matched_tokens(plain, 0) == (36, False)
    keys = {consumer._key(plain)}
    for name, fields in variants.items():
        request = SimpleNamespace(**{**vars(plain), "request_id": name, **fields})
        assert consumer.get_num_new_matched_tokens(request, 0) == (0, False), name
        keys.add(consumer._key(request))
    assert len(keys) == 1 + len(variants)
    # A producer saves the adapter's prompt under the adapter's name, beside the plain one.
    producer = _connector(tmp_path, "kv_producer", "SCHEDULER")
    adapted = SimpleNamespace(**{**vars(plain), "request_id": "a", **variants["adapter"]})
    producer.on_new_request(adapted)
    meta = producer.build_connector_meta(_step(new=[("a", prompt, 0, 37)],
                                               blocks={"a": [4, 5, 6]}))
    assert [s.key for s in meta.saves] == [consumer._key(adapted)]


class _Pages:
    layout = LAYOUT

    def __init__(self):
        self.written = []

    def write_tokens(self, block_ids, start, end, values):
        self.written.append((list(block_ids), start, end, values))


def test_the_worker_writes_loads_and_reports_failed_ones_as_invalid_blocks(tmp_path):
    rng = np.random.default_rng(2)
    good, bad = list(range(3, 40)), list(range(60, 90))
    values = _values(rng, 37)
    storage.save(storage.path_for(tmp_path, storage.prompt_key("m", good)), values)
    wrong = [tuple(np.zeros((30, 3, 4), np.float32) for _ in range(2)), values[1][:1]]
    storage.save(storage.path_for(tmp_path, storage.prompt_key("m", bad)), wrong)
    from xla_inference.kv_transfer.shared_storage import KvCopy, SharedStorageMetadata

    worker = _connector(tmp_path, "kv_consumer", "WORKER")
    pages = _Pages()
    worker.bind_pages(pages)
    worker.bind_connector_metadata(SharedStorageMetadata(loads=[
        KvCopy("g", storage.prompt_key("m", good), [7, 8, 2], 16, 36),
        KvCopy("b", storage.prompt_key("m", bad), [3, 4], 0, 29)]))
    worker.start_load_kv(None)
    worker.wait_for_save()
    worker.clear_connector_metadata()
    [(block_ids, start, end, written)] = pages.written
    assert (block_ids, start, end) == ([7, 8, 2], 16, 36)
    np.testing.assert_array_equal(written[0][1], values[0][1][16:36])
    assert worker.get_block_ids_with_load_errors() == {3, 4}
    assert worker.get_block_ids_with_load_errors() == set()  # reported once
    assert (worker.counts.loaded_requests, worker.counts.loaded_tokens,
            worker.counts.failed_loads) == (1, 20, 1)
