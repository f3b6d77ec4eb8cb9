"""KV cache offload through vLLM's OffloadingConnector (kv_transfer/offload.py) in one
vllm.LLM: a device cache of 11 pages, too small to keep a long prompt's pages while other
prompts run, and a host tier of 24 pages. The long prompt, repeated after the others, is
served from the host tier (its pages loaded, counted as vLLM's external prefix-cache hits)
with transformers' greedy output; the tier evicts least recently used pages first and holds
no more than its size."""

import numpy as np
import pytest

from tests.e2e.engines import metric, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

# The host tier's least-recently-used order below depends on when each request's stores
# finish: an engine core in its own process keeps stepping until they have (vLLM holds the
# finished request while its KV is sent), one in the test's process steps only inside
# generate(), so the last stores of one call finish in the next. tests/conftest.py.
ENGINE_CORE_PROCESS = "the host tier's LRU order counts when stores finish"

NUM_NEW = 8
PAGE_BYTES = 16 * 2 * 2 * 2 * 16 * 4  # tokens x layers x (K, V) x kv heads x head size x fp32
HOST_PAGES = 24


def _generate(llm, prompts):
    """(token ids, num_cached_tokens, pages loaded from the host tier) of the first of
    `prompts`, generated together."""
    from vllm import SamplingParams

    before = llm.collective_rpc("kv_transfer_counts")[0]["loaded_pages"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    loaded = llm.collective_rpc("kv_transfer_counts")[0]["loaded_pages"] - before
    return list(outs[0].outputs[0].token_ids), outs[0].num_cached_tokens, loaded


def test_a_long_prompt_evicted_from_the_device_is_served_from_the_host_tier(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(3)
    long = rng.integers(3, 128, size=96).tolist()  # 6 pages, all stored
    # 90 tokens: 5 full pages of prompt stored each (generated tokens are not offloaded).
    others = [rng.integers(3, 128, size=90).tolist() for _ in range(11)]
    expected = hf_greedy_ids(model_dir, [long], NUM_NEW)[0]
    llm = start_llm(model_dir, kv_cache_memory_bytes=12 * PAGE_BYTES, max_num_seqs=2,
                    kv_transfer_config=dict(
                        kv_connector="OffloadingConnector", kv_role="kv_both",
                        kv_connector_extra_config={"cpu_bytes_to_use": HOST_PAGES * PAGE_BYTES}))
    try:
        runs = [_generate(llm, [long])]
        _generate(llm, others[:3])  # host tier: long (6) + 15 pages
        runs.append(_generate(llm, [long]))  # the device lost it: loaded from the host
        _generate(llm, others[3:6])  # 15 more pages: the 12 least recently used go
        runs.append(_generate(llm, [long]))  # recently used, so kept
        _generate(llm, others[6:])  # 25 more: the tier keeps 24 pages, the long prompt goes
        runs.append(_generate(llm, [long]))
        external_hits = metric(llm, "vllm:external_prefix_cache_hits")
        loaded_bytes = metric(llm, "vllm:kv_offload_load_bytes")
    finally:
        shutdown(llm)
    assert [r[0] for r in runs] == [expected] * 4
    assert [r[1:] for r in runs] == [(0, 0), (96, 6), (96, 6), (0, 0)]
    assert external_hits == 2 * 96
    assert loaded_bytes == 2 * 6 * PAGE_BYTES
