"""Speculative decoding with data parallel replicas (additional_config data_parallel_size 2:
two vLLM schedulers, each replica's requests on its own slice of the mesh's data axis, one
verify step over every replica's rows) on a tiny random Llama over 8 virtual CPU devices:
greedy output with n-gram drafts or a draft model equals transformers' greedy, under
preemption, chunked prefill and the prefix cache; a seeded request samples the same tokens
alone and beside others; both replicas' acceptance reaches vLLM's spec-decode metrics;
nothing compiles after warm-up. EAGLE-3 with two replicas: tests/e2e/test_llm_eagle3.py,
beside the vLLM CPU backend's drafts it is compared with."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, metric, num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

NUM_NEW = 20
PAGE_BYTES = 2 * 16 * 2 * 16 * 4 * 2  # K and V, block 16, 2 kv heads, head dim 16, f32, 2 layers
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}
DATA_PARALLEL = {"data_parallel_size": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("spec_dp") / "llama")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(9)
    random = [rng.integers(3, 128, size=n).tolist() for n in (6, 30, 58)]
    repeating = [list(range(10, 22)) * 4, [7, 9, 11, 13] * 3, [40, 41] * 20, [5, 6, 7] * 9]
    return random + repeating


def _engine(model_dir, num_pages: int, **overrides):
    """20 pages: 10 per replica (one its null page), fewer than its requests' 4-6 pages
    each: the replicas' schedulers preempt. 32 tokens a step: one token bucket fewer to
    compile at warm-up than the default 64 (the slow set's time)."""
    return start_llm(model_dir, kv_cache_memory_bytes=num_pages * PAGE_BYTES,
                     max_num_batched_tokens=32, additional_config=DATA_PARALLEL, **overrides)


def test_ngram_with_two_replicas_equals_transformers_greedy(model_dir, prompts):
    """One engine: transformers' greedy output pins the text (no second engine without
    speculation to compare with); 32 tokens a step chunk the 58-token prompt."""
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = _engine(model_dir, num_pages=20, speculative_config=NGRAM)
    try:
        warm = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        again = generate_ids(llm, prompts[3:], temperature=0.0, max_tokens=NUM_NEW,
                             ignore_eos=True)  # a second pass over pages the first freed
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        preemptions = metric(llm, "vllm:num_preemptions")
        rows = llm.collective_rpc("replica_rows")[0]
        # A seeded request draws the same tokens alone and beside others on either replica
        # (the random rejection path, with penalties' per-row extras for one call).
        params = dict(temperature=1.0, seed=11, max_tokens=NUM_NEW, ignore_eos=True)
        alone = generate_ids(llm, prompts[3:4], **params)
        # Alone on the idle engine again: the first replica again (ties go to the lowest
        # index), whose prefix cache holds the prompt's pages from the run just before.
        cached_before = metric(llm, "vllm:prefix_cache_hits")
        alone_cached = generate_ids(llm, prompts[3:4], **params)
        cached = metric(llm, "vllm:prefix_cache_hits") - cached_before
        crowd = generate_ids(llm, prompts[4:] + prompts[3:4] + prompts[:2], **params)
        penalised = [generate_ids(llm, p, repetition_penalty=1.3, **params)
                     for p in (prompts[3:4], prompts[:3] + prompts[3:4])]
        compiled_after_warm_up = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    assert got == expected
    assert again == expected[3:]
    assert 0 < accepted <= drafted
    assert preemptions > 0 and cached > 0
    assert len(rows) == 2 and min(rows) > 0, rows  # both replicas ran requests
    assert crowd[3] == alone[0] == alone_cached[0] and len(alone[0]) == NUM_NEW
    assert penalised[0][0] == penalised[1][3]
    assert compiled_after_warm_up == 0


def test_draft_model_with_two_replicas_equal_to_the_target_has_every_draft_accepted(
        model_dir, prompts):
    """A draft model equal to the target under async scheduling (vLLM's default for it):
    each replica's draft KV lives in that replica's pages, so every draft is accepted; the
    greedy text is transformers'."""
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    draft = {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 3}
    llm = _engine(model_dir, num_pages=2 * 48, speculative_config=draft)  # both models' pages
    try:
        warm = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        rows = llm.collective_rpc("replica_rows")[0]
        compiled_after_warm_up = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    assert got == expected
    assert drafted > 0 and accepted == drafted
    assert len(rows) == 2 and min(rows) > 0, rows
    assert compiled_after_warm_up == 0
