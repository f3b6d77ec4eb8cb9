"""vLLM's LLM class on tiny random Qwen2, Qwen3 and Mistral: greedy output equal to
transformers' (Mistral's window of 8 is much shorter than the sequences)."""

import pytest

from tests.e2e.engines import greedy_against_transformers
from tests.helpers import save_tiny_family

pytestmark = pytest.mark.slow

NUM_NEW = 16
PAGE_BYTES = 2 * 16 * 2 * 32 * 4 * 2  # K and V, block 16, 2 kv heads, head dim 32, f32, 2 layers


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_greedy_matches_transformers(tmp_path, family):
    model_dir = save_tiny_family(tmp_path / family, family)
    got, expected, _ = greedy_against_transformers(model_dir, NUM_NEW, 64 * PAGE_BYTES)
    assert got == expected
