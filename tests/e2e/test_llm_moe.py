"""vLLM's LLM class on tiny random Qwen3-MoE (one dense layer, one MoE layer, routing
weights renormalised) and Mixtral (a window of 8, much shorter than the sequences):
greedy output equal to transformers'."""

import pytest

from tests.e2e.engines import greedy_against_transformers
from tests.e2e.test_llm_families import NUM_NEW, PAGE_BYTES
from tests.helpers import save_tiny_family

pytestmark = pytest.mark.slow

VARIANTS = {
    "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=True)),
    "mixtral": ("mixtral", dict(sliding_window=8)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    model_dir = save_tiny_family(tmp_path / variant, family, **overrides)
    got, expected, _ = greedy_against_transformers(model_dir, NUM_NEW, 64 * PAGE_BYTES)
    assert got == expected
