"""vLLM's LLM class on tiny random Qwen2, Qwen3 and Mistral: greedy output equal to
transformers'. The windowed models (Mistral's window of 8 on every layer, a Qwen2 with a
full layer and a sliding one) run on vLLM's KV cache groups, with sequences much longer
than the window, so that vLLM frees their pages as the window moves on."""

import pytest

from tests.e2e.engines import greedy_against_transformers
from tests.helpers import save_tiny_family

pytestmark = pytest.mark.slow

NUM_NEW = 16
PAGE_BYTES = 2 * 16 * 2 * 32 * 4 * 2  # K and V, block 16, 2 kv heads, head dim 32, f32, 2 layers


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_greedy_matches_transformers(tmp_path, family):
    model_dir = save_tiny_family(tmp_path / family, family)
    got, expected, _ = greedy_against_transformers(model_dir, NUM_NEW, 64 * PAGE_BYTES)
    assert got == expected


@pytest.mark.parametrize("family,overrides,layer_groups", [
    ("mistral", {}, [0, 0]),  # one window for every layer: one group
    # Layer 0 full, layer 1 a window of 8: a group each, at the same memory.
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), [0, 1]),
], ids=["mistral", "qwen2-window"])
def test_windowed_greedy_matches_transformers(tmp_path, family, overrides, layer_groups):
    model_dir = save_tiny_family(tmp_path / family, family, **overrides)
    got, expected, layout = greedy_against_transformers(
        model_dir, NUM_NEW, 64 * PAGE_BYTES, inspect=lambda llm: llm.collective_rpc(
            "kv_cache_groups")[0])
    assert got == expected
    assert layout["layer_groups"] == layer_groups and layout["num_groups"] == max(layer_groups) + 1
    assert layout["layer_arrays"] == ([0, 1] if layer_groups == [0, 0] else [0, 0])
