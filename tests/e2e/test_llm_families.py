"""vLLM's LLM class on tiny random Qwen2, Qwen3 and Mistral: greedy output equal to
transformers' (Mistral's window of 8 is much shorter than the sequences)."""

import gc

import numpy as np
import pytest

from tests.helpers import hf_greedy_ids, save_tiny_family

pytestmark = pytest.mark.slow

NUM_NEW = 16
PAGE_BYTES = 2 * 16 * 2 * 32 * 4 * 2  # K and V, block 16, 2 kv heads, head dim 32, f32, 2 layers


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_greedy_matches_transformers(tmp_path, family):
    from vllm import LLM, SamplingParams

    model_dir = save_tiny_family(tmp_path / family, family)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 21, 38)]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=32, kv_cache_memory_bytes=64 * PAGE_BYTES, seed=0)
    try:
        sp = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    assert [list(o.outputs[0].token_ids) for o in outs] == expected
