"""KV cache offload (kv_transfer/offload.py) on a cache split over virtual devices: tensor
parallel 2 (each page split by kv heads; its stores dispatched and landing while the next
step runs), and data parallel 2 x tensor parallel 2 (kv_transfer/replicas.py: each replica's
scheduler and worker run their own connector over their share of the pages and of the host
tier). A long prompt, evicted from the device by later prompts, is served from the host tier
(on replica 1 under data parallel: its pages are not the engine's first) with the greedy
tokens of its first run, a miss, and of transformers. The pages' bits: the host tier's
tests/kv_transfer/test_sharded_pages.py."""

import numpy as np
import pytest

from tests.e2e.engines import metric, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

NUM_NEW = 8
TP = 2
PAGE_BYTES = 16 * 2 * 2 * 2 * 16 * 4  # tokens x layers x (K, V) x kv heads x head size x fp32


def _generate(llm, prompts, index):
    """(token ids, num_cached_tokens, pages loaded from the host tier) of prompts[index],
    generated with the others."""
    from vllm import SamplingParams

    before = llm.collective_rpc("kv_transfer_counts")[0]["loaded_pages"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    loaded = llm.collective_rpc("kv_transfer_counts")[0]["loaded_pages"] - before
    return list(outs[index].outputs[0].token_ids), outs[index].num_cached_tokens, loaded


@pytest.mark.parametrize("replicas", [1, 2], ids=["tp2", "dp2-tp2"])
def test_an_evicted_prompt_comes_back_from_the_host_tier_on_a_split_cache(tmp_path, replicas):
    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(31)
    long = rng.integers(3, 128, size=96).tolist()  # 6 pages, all stored
    # Requests go to the least loaded replica, ties to the first: a filler ahead of the long
    # prompt puts it on replica 1, and each pair of others puts one on each replica.
    fillers = [rng.integers(3, 128, size=20).tolist() for _ in range(2)]
    others = [rng.integers(3, 128, size=90).tolist() for _ in range(4)]
    expected = hf_greedy_ids(model_dir, [long], NUM_NEW)[0]
    parallel = dict(tensor_parallel_size=TP)
    if replicas > 1:
        parallel["additional_config"] = {"data_parallel_size": replicas}
    # Per replica: 12 device pages (a null page and 11 for requests), 40 host pages. vLLM
    # sizes a host chunk as world_size x its worker's page while our one process's page is
    # the whole page; the worker scales cpu_bytes_to_use by world_size so the tier holds
    # what was asked (kv_transfer/config.size_offload_tier_for_one_process): with half of
    # it, as before, the long prompt's pages are evicted from the tier and the hit misses.
    llm = start_llm(model_dir, kv_cache_memory_bytes=replicas * 12 * PAGE_BYTES,
                    max_num_seqs=2, **parallel,
                    kv_transfer_config=dict(
                        kv_connector="OffloadingConnector", kv_role="kv_both",
                        kv_connector_extra_config={
                            "cpu_bytes_to_use": replicas * 40 * PAGE_BYTES}))

    def run_long(filler):
        return _generate(llm, [filler, long] if replicas > 1 else [long], replicas - 1)

    try:
        miss = run_long(fillers[0])
        _generate(llm, others[:2], 0)  # the long prompt's replica: 6 more pages, then 6 more
        _generate(llm, others[2:], 0)
        hit = run_long(fillers[1])
        rows = llm.collective_rpc("replica_rows")[0]
        external_hits = metric(llm, "vllm:external_prefix_cache_hits")
        loaded_bytes = metric(llm, "vllm:kv_offload_load_bytes")
    finally:
        shutdown(llm)
    assert miss == (expected, 0, 0)
    assert hit == (expected, 96, 6)
    assert external_hits == 96
    assert loaded_bytes == 6 * PAGE_BYTES
    if replicas > 1:  # the engine counts rows per replica on its replicas' path only
        assert len(rows) == replicas and min(rows) > 0
