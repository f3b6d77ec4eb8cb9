"""vLLM's LLM class on a tiny random Llama 4 (Llama4ForCausalLM: rope layers with attention
in chunks of 8 positions, a NoPE layer with temperature tuning, MoE layers with a shared
expert between dense ones): greedy output equal to transformers'."""

import pytest

from tests.e2e.engines import greedy_against_transformers
from tests.e2e.test_llm_families import NUM_NEW, PAGE_BYTES
from tests.helpers import save_tiny_family

pytestmark = pytest.mark.slow


def test_greedy_matches_transformers(tmp_path):
    model_dir = save_tiny_family(tmp_path / "llama4", "llama4")
    # The 38-token prompt spans several attention chunks and two scheduler chunks.
    got, expected, _ = greedy_against_transformers(model_dir, NUM_NEW, 64 * PAGE_BYTES)
    assert got == expected
