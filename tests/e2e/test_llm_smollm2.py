"""vLLM's LLM class on xla-inference, real SmolLM2 in float32, against transformers."""

import gc

import pytest

from tests.e2e.reference import hf_greedy, prompt_token_ids

pytestmark = pytest.mark.slow

NUM_NEW = 32


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    return prompt_token_ids(smollm2_dir)


@pytest.fixture(scope="module")
def expected(smollm2_gguf, prompts):
    return hf_greedy(smollm2_gguf, prompts, NUM_NEW)


def _llm(model_dir, **overrides):
    from vllm import LLM

    args = dict(model=str(model_dir), dtype="float32", max_model_len=512, max_num_seqs=16,
                max_num_batched_tokens=256, kv_cache_memory_bytes=256 << 20,
                enable_prefix_caching=True, seed=0)
    args.update(overrides)
    return LLM(**args)


def _greedy(llm, prompts):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _num_compilations(llm) -> int:
    return llm.collective_rpc("num_compilations")[0]


def _prefix_cache_hits(llm) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics()
               if m.name == "vllm:prefix_cache_hits")


def _shutdown(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def test_greedy_matches_transformers_with_prefix_cache(smollm2_dir, prompts, expected):
    llm = _llm(smollm2_dir, disable_log_stats=False)
    try:
        compiled_after_warmup = _num_compilations(llm)
        first = _greedy(llm, prompts)
        hits_before = _prefix_cache_hits(llm)
        second = _greedy(llm, prompts)  # every prompt's full blocks now come from the cache
        assert _prefix_cache_hits(llm) > hits_before
        # Steady state: serving compiled nothing after warm-up.
        assert _num_compilations(llm) == compiled_after_warmup
    finally:
        _shutdown(llm)
    for i, (got, want) in enumerate(zip(first, expected)):
        assert got == want, f"prompt {i}: xla-inference {got} != transformers {want}"
    assert second == first


def test_greedy_matches_transformers_with_chunked_prefill(smollm2_dir, prompts, expected):
    # 32 tokens per step: every prompt longer than that is prefilled in chunks, mixed
    # with other requests' decode steps.
    llm = _llm(smollm2_dir, max_num_batched_tokens=32, max_num_seqs=8,
               enable_prefix_caching=False)
    try:
        got = _greedy(llm, prompts)
    finally:
        _shutdown(llm)
    assert max(len(p) for p in prompts) > 32
    assert got == expected
