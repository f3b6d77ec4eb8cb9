"""A checkpoint with FP8 KV cache scales (compressed-tensors' kv_cache_scheme) through
vllm.LLM: with the default kv_cache_dtype ("auto") the platform serves an fp8 cache, as vLLM
does on CUDA (one byte a cached value), and greedy decoding equals transformers'
whose attention rounds K/V through fp8 with the checkpoint's scales
(tests/quantization/checkpoints.fp8_kv_cache_attention). fp8_e5m2 is refused: the scales are
e4m3's."""

import numpy as np
import pytest

from tests.quantization.checkpoints import (K_SCALES, V_SCALES, fp8_kv_cache_attention,
                                            save_base_and_kv_scaled)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_base_and_kv_scaled(tmp_path_factory.mktemp("llm_kv_cache_scales"))


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(12)
    return [rng.integers(3, 128, size=n).tolist() for n in (6, 19, 40, 11)]


def _reference_greedy(base, prompts) -> list[list[int]]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32,
        attn_implementation=fp8_kv_cache_attention(K_SCALES, V_SCALES)).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(NUM_NEW):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            out.append(ids[len(prompt):])
    return out


def _served(model_dir, **overrides):
    """(greedy tokens, the cache dtype vLLM settled on, KV pages) through our platform."""
    from tests.e2e.engines import generate_ids, shutdown, start_llm

    llm = start_llm(model_dir, **overrides)
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        tokens = generate_ids(llm, _prompts(), max_tokens=NUM_NEW, temperature=0.0,
                              ignore_eos=True)
        return tokens, cache.cache_dtype, cache.num_gpu_blocks
    finally:
        shutdown(llm)


def test_checkpoint_scales_served_by_an_fp8_cache(checkpoints):
    base, scaled = checkpoints
    tokens, cache_dtype, pages = _served(scaled)
    assert cache_dtype == "fp8"
    assert tokens == _reference_greedy(base, _prompts())
    # One byte a value: 2 layers x (K, V) x 16 tokens a page x 2 KV heads x 32 dims.
    assert pages == (4 << 20) // (2 * 2 * 16 * 2 * 32), pages


def test_fp8_e5m2_is_refused_with_checkpoint_scales(checkpoints):
    from tests.e2e.engines import start_llm

    with pytest.raises(Exception, match="e4m3"):
        start_llm(checkpoints[1], kv_cache_dtype="fp8_e5m2")
