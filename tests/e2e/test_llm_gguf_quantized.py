"""The real models served from their GGUF files kept quantized (what `xla-inference serve`
runs by default), through vllm.LLM, greedy, against transformers loading the same GGUF
(which dequantizes it to float32): SmolLM2-135M (Q4_1 projections, Q8_0 embedding and LM
head) and Gemma 3 270M (Q5_0, Q4_K, Q6_K, Q8_0). The weights are the same numbers on both
sides; ours multiplies them in integers on 15-bit activations (quantization/product.py), so
a near tie may flip late in a continuation. Also SmolLM2 quantized online to int8 against
the float32 model: different weights, so only agreement is asserted, not equality. The
agreement is printed (pytest -s) and recorded in benchmarks/RESULTS.md."""

import pytest

from tests.e2e.engines import generate_ids, shutdown, start_llm
from tests.e2e.reference import hf_greedy, prompt_token_ids

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 32


def _greedy(model_dir, prompts, **overrides):
    llm = start_llm(model_dir, **{**dict(max_model_len=512, max_num_seqs=8,
                                         max_num_batched_tokens=256,
                                         kv_cache_memory_bytes=128 << 20), **overrides})
    try:
        return generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True), \
            llm.collective_rpc("weight_bytes")[0]
    finally:
        shutdown(llm)


def _agreement(got, expected) -> tuple[int, float]:
    """(prompts equal throughout, mean fraction of tokens before the first difference)."""
    def prefix(a, b):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        return n / len(b)

    fractions = [prefix(g, e) for g, e in zip(got, expected)]
    return sum(f == 1.0 for f in fractions), sum(fractions) / len(fractions)


def _served_like_transformers(label, model_dir, gguf_path, num_prompts=None) -> int:
    """Greedy output of the GGUF served kept quantized from `model_dir` against
    transformers on the file: all prompts but one equal, 90% of tokens before a first
    difference. Returns the weight bytes the worker holds."""
    prompts = prompt_token_ids(model_dir)[:num_prompts]
    got, weight_bytes = _greedy(model_dir, prompts)
    equal, prefix = _agreement(got, hf_greedy(gguf_path, prompts, NUM_NEW))
    print(f"{label} kept quantized: {equal}/{len(prompts)} prompts equal, {prefix:.0%} of "
          f"tokens before a difference; weights {weight_bytes / 2**20:.0f} MiB")
    assert equal >= len(prompts) - 1 and prefix >= 0.9
    return weight_bytes


def test_smollm2_gguf_kept_quantized_matches_transformers(smollm2_gguf):
    from xla_inference.loading.default_model import prepare_default_gguf_model

    weight_bytes = _served_like_transformers("SmolLM2 Q4_1", prepare_default_gguf_model(),
                                             smollm2_gguf)
    # 4-bit projections and an 8-bit LM head, with the embedding gathered in float32: well
    # under the float32 model's 513 MiB
    assert weight_bytes < 0.45 * 513 * 2**20


def test_gemma3_270m_gguf_kept_quantized_matches_transformers():
    from xla_inference.loading.default_model import (GGUF_SUFFIX, GEMMA3_270M_NAME,
                                                     gemma3_270m_gguf_path,
                                                     prepare_gguf_serving_dir)

    gguf_path = gemma3_270m_gguf_path()
    model_dir = prepare_gguf_serving_dir(gguf_path, GEMMA3_270M_NAME + GGUF_SUFFIX)
    _served_like_transformers("Gemma 3 270M Q4_K_M", model_dir, gguf_path, num_prompts=4)


def test_smollm2_online_int8_agrees_with_float32(smollm2_dir, smollm2_gguf):
    prompts = prompt_token_ids(smollm2_dir)
    got, weight_bytes = _greedy(smollm2_dir, prompts, quantization="int8")
    expected = hf_greedy(smollm2_gguf, prompts, NUM_NEW)
    equal, prefix = _agreement(got, expected)
    print(f"SmolLM2 online int8: {equal}/{len(prompts)} prompts equal to float32, "
          f"{prefix:.0%} of tokens before a difference; weights {weight_bytes / 2**20:.0f} MiB")
    assert prefix >= 0.5
