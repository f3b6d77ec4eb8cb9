"""vLLM's LLM class on a tiny random DeepSeek-V3 (multi-head latent attention with YaRN,
one dense layer then grouped-sigmoid MoE layers with a shared expert): greedy output equal
to transformers'. The KV cache vLLM sizes holds the latent only (2 x 24 values per token
and layer)."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, shutdown, start_llm
from tests.e2e.test_llm_families import NUM_NEW
from tests.helpers import hf_greedy_ids
from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3

pytestmark = pytest.mark.slow

PAGE_BYTES = 2 * 16 * 1 * 24 * 4 * 3  # halves of [latent 32, rope 16], block 16, f32, 3 layers


def test_greedy_matches_transformers(tmp_path):
    model_dir = save_tiny_deepseek_v3(tmp_path / "deepseek_v3")
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 21, 38)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=32,
                    kv_cache_memory_bytes=64 * PAGE_BYTES)
    try:
        num_blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        got = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    finally:
        shutdown(llm)
    assert num_blocks == 64
    assert got == expected
