"""vLLM's LLM class on a tiny random DeepSeek-V3 (multi-head latent attention with YaRN,
one dense layer then grouped-sigmoid MoE layers with a shared expert): greedy output equal
to transformers'. The KV cache vLLM sizes holds the latent only (2 x 24 values per token
and layer)."""

import pytest

from tests.e2e.engines import greedy_against_transformers
from tests.e2e.test_llm_families import NUM_NEW
from tests.models.test_deepseek_v3 import save_tiny_deepseek_v3

pytestmark = pytest.mark.slow

PAGE_BYTES = 2 * 16 * 1 * 24 * 4 * 3  # halves of [latent 32, rope 16], block 16, f32, 3 layers


def test_greedy_matches_transformers(tmp_path):
    model_dir = save_tiny_deepseek_v3(tmp_path / "deepseek_v3")
    got, expected, num_blocks = greedy_against_transformers(
        model_dir, NUM_NEW, 64 * PAGE_BYTES,
        inspect=lambda llm: llm.llm_engine.vllm_config.cache_config.num_gpu_blocks)
    assert num_blocks == 64
    assert got == expected
