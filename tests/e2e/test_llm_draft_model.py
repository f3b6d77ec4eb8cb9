"""Draft-model speculative decoding through vLLM's LLM class on tiny random Llamas: greedy
output equals transformers' greedy output of the target alone under chunked prefill, prefix
caching and preemption; a draft equal to the target has every draft accepted, an unrelated
random draft few; nothing compiles after warm-up."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, metric, num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = pytest.mark.slow

NUM_NEW = 24
K = 3
# One page (16 tokens) of both models: K and V, 2 kv heads, head dim 16, float32, 2 layers each.
PAGE_BYTES = 2 * (2 * 16 * 2 * 16 * 4 * 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    return save_tiny_llama(root / "target"), save_tiny_llama(root / "other", seed=5)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(3, 128, size=n).tolist() for n in (5, 33, 60, 17, 9)]


def _counters(llm):
    return [metric(llm, f"vllm:{name}") for name in (
        "spec_decode_num_accepted_tokens", "spec_decode_num_draft_tokens", "num_preemptions",
        "prefix_cache_hits")]


def _run(target, draft, prompts, also=None):
    """(greedy outputs, the 60-token prompt again, accepted drafts, drafted, preemptions,
    (prefix-cached tokens, drafts rejected) in the second run, programs compiled after
    warm-up, also(llm)). 10 pages cannot hold four of the sequences at once: vLLM preempts;
    32 tokens a step chunk the longer prompts (and keep the buckets, compiled for both
    models, few). In the second run the prompt (the last to finish) finds its pages in the
    prefix cache: the draft starts from the draft KV the first run wrote into them."""
    llm = start_llm(target, kv_cache_memory_bytes=10 * PAGE_BYTES, max_num_seqs=4,
                    max_num_batched_tokens=32,
                    speculative_config={"method": "draft_model", "model": str(draft),
                                        "num_speculative_tokens": K})
    try:
        warm = num_compilations(llm)
        got = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
        counts = _counters(llm)
        again = generate_ids(llm, prompts[2:3], max_tokens=NUM_NEW, temperature=0.0,
                             ignore_eos=True)
        accepted, drafted, _, cached = (b - a for a, b in zip(counts, _counters(llm)))
        extra = also(llm) if also else None
        compiled = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    return got, again, *counts[:3], (cached, drafted - accepted), compiled, extra


def test_a_draft_equal_to_the_target_has_every_draft_accepted(models, prompts):
    target, _ = models
    expected = hf_greedy_ids(target, prompts, NUM_NEW)
    got, again, accepted, drafted, preemptions, rejected_again, compiled, _ = _run(
        target, target, prompts)
    assert got == expected
    assert again == expected[2:3]
    assert drafted > 0 and accepted == drafted
    assert rejected_again == (48, 0)  # 3 pages of the prompt from the cache
    assert preemptions > 0
    assert compiled == 0


def _seeded_alone_and_in_a_crowd(llm, prompts):
    """A seeded request's tokens alone and beside another (with penalties: the verify
    program's other variant). Short prompts (no page to find in the prefix cache) and few
    tokens, so that both runs schedule the request alike: vLLM pads a request that has one
    prompt token left with placeholder drafts, and a step whose drafts the token budget
    cuts, or a preemption, draws differently (a recovered token where there would have
    been a sampled one; vLLM's own sampler too)."""
    params = dict(max_tokens=NUM_NEW, temperature=1.0, seed=11, ignore_eos=True,
                  repetition_penalty=1.1)
    return (generate_ids(llm, [prompts[4]], **params)[0],
            generate_ids(llm, [prompts[4], prompts[0]], **params)[0])


def test_an_unrelated_draft_changes_no_greedy_token(models, prompts):
    """Also: seeded random sampling through rejection stays reproducible and batch-invariant."""
    target, other = models
    expected = hf_greedy_ids(target, prompts, NUM_NEW)
    got, again, accepted, drafted, preemptions, _, compiled, seeded = _run(
        target, other, prompts, also=lambda llm: _seeded_alone_and_in_a_crowd(llm, prompts))
    assert got == expected
    assert again == expected[2:3]
    assert drafted > 0 and accepted < 0.5 * drafted
    assert preemptions > 0
    assert compiled == 0
    alone, in_a_crowd = seeded
    assert len(alone) == NUM_NEW and alone == in_a_crowd


def test_the_draft_runs_on_the_targets_tensor_parallel_mesh(models, prompts):
    """Both models sharded over 2 of the virtual CPU devices (tests/conftest.py)."""
    target, _ = models
    expected = hf_greedy_ids(target, prompts[3:], NUM_NEW)
    llm = start_llm(target, tensor_parallel_size=2, max_num_seqs=4, max_num_batched_tokens=32,
                    speculative_config={"method": "draft_model", "model": str(target),
                                        "num_speculative_tokens": K})
    try:
        got = generate_ids(llm, prompts[3:], max_tokens=NUM_NEW, temperature=0.0,
                           ignore_eos=True)
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        mesh = llm.collective_rpc("mesh_shape")[0]
    finally:
        shutdown(llm)
    assert mesh["model"] == 2
    assert got == expected
    assert drafted > 0 and accepted == drafted
