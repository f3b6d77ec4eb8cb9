"""vLLM's LLM class on a tiny random Llama 4 (Llama4ForCausalLM: rope layers with attention
in chunks of 8 positions, a NoPE layer with temperature tuning, MoE layers with a shared
expert between dense ones): greedy output equal to transformers'."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, shutdown, start_llm
from tests.e2e.test_llm_families import NUM_NEW, PAGE_BYTES
from tests.helpers import hf_greedy_ids, save_tiny_family

pytestmark = pytest.mark.slow


def test_greedy_matches_transformers(tmp_path):
    model_dir = save_tiny_family(tmp_path / "llama4", "llama4")
    rng = np.random.default_rng(11)
    # Prompts of several chunks; the 38-token one is prefilled in two scheduler chunks.
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 21, 38)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=32,
                    kv_cache_memory_bytes=128 * PAGE_BYTES)  # 64 pages of 4 layers
    try:
        got = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    finally:
        shutdown(llm)
    assert got == expected
