"""KV cache offload (kv_transfer/offload.py) with n-gram speculative decoding: a repeating
prompt, evicted from the device and loaded back from the host tier, is decoded with drafts
verified on the loaded pages (vLLM's spec-decode metrics count them in that run) and gives
transformers' greedy tokens, as its first run (a miss) did. Speculative methods whose
drafter has KV or hidden states of its own are refused with connectors
(tests/plugin/test_offload_config.py)."""

import numpy as np
import pytest

from tests.e2e.engines import metric, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

NUM_NEW = 16
PAGE_BYTES = 16 * 2 * 2 * 2 * 16 * 4  # tokens x layers x (K, V) x kv heads x head size x fp32
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


def test_a_prompt_from_the_host_tier_decodes_with_ngram_drafts(tmp_path):
    from vllm import SamplingParams

    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(33)
    long = list(range(10, 22)) * 8  # 96 tokens, 6 pages: the n-gram proposer drafts on it
    others = [rng.integers(3, 128, size=90).tolist() for _ in range(3)]
    expected = hf_greedy_ids(model_dir, [long], NUM_NEW)[0]
    llm = start_llm(model_dir, kv_cache_memory_bytes=12 * PAGE_BYTES, max_num_seqs=2,
                    speculative_config=NGRAM,
                    kv_transfer_config=dict(
                        kv_connector="OffloadingConnector", kv_role="kv_both",
                        kv_connector_extra_config={"cpu_bytes_to_use": 40 * PAGE_BYTES}))
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)

    def run_long():
        """(tokens, cached tokens, pages loaded, tokens drafted) of the long prompt."""
        loaded = llm.collective_rpc("kv_transfer_counts")[0]["loaded_pages"]
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        out = llm.generate([{"prompt_token_ids": long}], params, use_tqdm=False)[0]
        return (list(out.outputs[0].token_ids), out.num_cached_tokens,
                llm.collective_rpc("kv_transfer_counts")[0]["loaded_pages"] - loaded,
                metric(llm, "vllm:spec_decode_num_draft_tokens") - drafted)

    try:
        miss = run_long()
        llm.generate([{"prompt_token_ids": p} for p in others], params, use_tqdm=False)
        hit = run_long()
    finally:
        shutdown(llm)
    assert miss[:3] == (expected, 0, 0) and hit[:3] == (expected, 96, 6)
    assert miss[3] > 0 and hit[3] > 0  # verify steps ran on the loaded pages too
