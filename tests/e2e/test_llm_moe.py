"""vLLM's LLM class on tiny random Qwen3-MoE (one dense layer, one MoE layer, routing
weights renormalised) and Mixtral (a window of 8, much shorter than the sequences):
greedy output equal to transformers'."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, shutdown, start_llm
from tests.e2e.test_llm_families import NUM_NEW, PAGE_BYTES
from tests.helpers import hf_greedy_ids, save_tiny_family

pytestmark = pytest.mark.slow

VARIANTS = {
    "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=True)),
    "mixtral": ("mixtral", dict(sliding_window=8)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    model_dir = save_tiny_family(tmp_path / variant, family, **overrides)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 21, 38)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=32,
                    kv_cache_memory_bytes=64 * PAGE_BYTES)
    try:
        got = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    finally:
        shutdown(llm)
    assert got == expected
