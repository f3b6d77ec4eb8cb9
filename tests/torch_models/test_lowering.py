"""vLLM's PyTorch model classes lowered through torchax (torch_models/) against
transformers' own implementations: logits of every position of a ragged batch that mixes
prefill chunks and decode steps, for architectures xla-inference has no native code for."""

import numpy as np
import pytest

from tests.helpers import (assert_ragged_logits, engine_request, hf_logits, run_chunks,
                           save_tiny_llama, tiny_engine)
from tests.torch_models.conftest import torch_engine

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# Step 1: two prompts' first chunks; step 2: a long chunk, a decode-sized step, a whole
# new prompt; all three go on reading the pages written before.
PLAN = [{0: 5, 1: 6}, {0: 8, 1: 1, 2: 9}]


@pytest.mark.parametrize("name", ["phi3", "granite", "cohere", "stablelm"])
def test_ragged_logits_match_transformers(tiny_architecture, name):
    model_dir = tiny_architecture(name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, n).tolist() for n in (13, 7, 9)]
    expected = [hf_logits(model_dir, p) for p in prompts]  # before vLLM's classes load
    assert_ragged_logits(torch_engine(model_dir), prompts, expected, PLAN, 2e-4)


def test_bfloat16_projections_equal_the_native_path(tmp_path):
    """dtype=bfloat16 on the host CPU: bfloat16 projection weights, float32 activations, a
    bfloat16 KV cache. Both paths multiply in bfloat16 with float32 accumulation (torch's
    linear is our projection) and keep K/V in the same cache, so a Llama through vLLM's
    class equals our Llama family."""
    import jax.numpy as jnp

    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 128, n).tolist() for n in (13, 7, 9)]
    rows = []
    bf16 = jnp.bfloat16
    for engine in (tiny_engine(model_dir, narrow_dtype=bf16, kv_dtype=bf16),
                   torch_engine(model_dir, narrow_dtype=bf16, kv_dtype=bf16, model_impl="vllm")):
        assert engine.kv_cache.arrays[0][0].dtype == bf16
        reqs = [engine_request(f"r{i}", p, 1 + 8 * i) for i, p in enumerate(prompts)]
        rows.append(run_chunks(engine, reqs, PLAN))
    native, torch_path = rows
    assert native.keys() == torch_path.keys()
    for key in native:
        np.testing.assert_allclose(torch_path[key], native[key], rtol=1e-4, atol=1e-4)
