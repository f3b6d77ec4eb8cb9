"""n-gram speculative decoding through vLLM's LLM class on a tiny random Llama: greedy output
equals greedy without speculation (transformers) under chunked prefill, prefix caching and
preemption, drafts are accepted on repeating text (vLLM's spec-decode metrics), and nothing
compiles after warm-up (the verify program is compiled for every bucket)."""

import gc

import numpy as np
import pytest

from tests.e2e.engines import num_compilations
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

NUM_NEW = 24
PAGE_BYTES = 2 * 16 * 2 * 16 * 4 * 2  # K and V, block 16, 2 kv heads, head dim 16, f32, 2 layers
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("spec") / "llama")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    random = [rng.integers(3, 128, size=n).tolist() for n in (5, 33, 60)]
    repeating = [list(range(10, 22)) * 4, [7, 9, 11, 13, 7, 9, 11, 13, 7, 9], [40, 41] * 20]
    return random + repeating


def _llm(model_dir, num_pages: int):
    from vllm import LLM

    return LLM(model=str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=8,
               max_num_batched_tokens=64, kv_cache_memory_bytes=num_pages * PAGE_BYTES, seed=0,
               disable_log_stats=False, speculative_config=NGRAM)


def _generate(llm, prompts, **params):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=NUM_NEW, ignore_eos=True, **params)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _metric(llm, name):
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


def test_ngram_greedy_equals_greedy_without_speculation(model_dir, prompts):
    """14 pages of 16 tokens cannot hold 6 sequences of up to 84 tokens: vLLM preempts and
    recomputes; the 60-token prompt is prefilled in chunks (64 tokens a step, shared)."""
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = _llm(model_dir, num_pages=14)
    try:
        warm = num_compilations(llm)
        got = _generate(llm, prompts, temperature=0.0)
        # The same prompts again: their pages come from the prefix cache.
        again = _generate(llm, prompts[3:], temperature=0.0)
        accepted = _metric(llm, "vllm:spec_decode_num_accepted_tokens")
        drafted = _metric(llm, "vllm:spec_decode_num_draft_tokens")
        preemptions = _metric(llm, "vllm:num_preemptions")
        # Penalties take the verify program's other variant (the per-row extras).
        _generate(llm, prompts[3:], temperature=0.0, repetition_penalty=1.2)
        compiled_after_warm_up = num_compilations(llm) - warm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    assert got == expected
    assert again == expected[3:]
    assert 0 < accepted <= drafted
    assert preemptions > 0
    assert compiled_after_warm_up == 0


def test_seeded_sampling_with_ngram_repeats_and_logprobs_are_refused(model_dir, prompts):
    """The random rejection path end to end: a seeded request draws the same tokens alone
    and beside others; logprobs (not returned by speculative steps yet) are a 400-style
    validation error, and the engine keeps serving."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = _llm(model_dir, num_pages=128)
    try:
        alone = _generate(llm, prompts[3:4], temperature=1.0, seed=11)
        crowd = _generate(llm, prompts[3:], temperature=1.0, seed=11)
        with pytest.raises(VLLMValidationError, match="logprobs with speculative decoding"):
            llm.generate([{"prompt_token_ids": prompts[0]}],
                         SamplingParams(max_tokens=4, logprobs=2), use_tqdm=False)
        after = _generate(llm, prompts[3:4], temperature=1.0, seed=11)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    assert len(alone[0]) == NUM_NEW and all(0 <= t < 128 for t in alone[0])
    assert crowd[0] == alone[0] == after[0]


def test_batch_size_schedule_turns_drafting_off_for_larger_batches(model_dir, prompts):
    """vLLM's num_speculative_tokens_per_batch_size: k = 3 for one running request, 0 from
    two on. Four repeating prompts together draft nothing (plain steps, the same greedy
    text); one alone drafts and has drafts accepted."""
    expected = hf_greedy_ids(model_dir, prompts[3:], NUM_NEW)
    schedule = {**NGRAM, "num_speculative_tokens_per_batch_size": [(1, 1, 3), (2, 8, 0)]}
    from vllm import LLM

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=8,
              max_num_batched_tokens=64, kv_cache_memory_bytes=128 * PAGE_BYTES, seed=0,
              disable_log_stats=False, speculative_config=schedule)
    try:
        together = _generate(llm, prompts[3:] + prompts[3:4], temperature=0.0)
        drafted_together = _metric(llm, "vllm:spec_decode_num_draft_tokens")
        alone = _generate(llm, prompts[3:4], temperature=0.0)
        drafted_alone = _metric(llm, "vllm:spec_decode_num_draft_tokens") - drafted_together
        accepted = _metric(llm, "vllm:spec_decode_num_accepted_tokens")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    assert together == expected + expected[:1]
    assert alone == expected[:1]
    assert drafted_together == 0
    assert drafted_alone > 0 and accepted > 0
