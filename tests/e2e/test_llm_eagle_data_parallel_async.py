"""An EAGLE-3 head with two data parallel replicas (additional_config
data_parallel_size 2, 8 virtual CPU devices) under vLLM's async scheduling (its default for
them): each replica's scheduler sends -1 placeholders, the runner verifies the drafts its
head proposed on that replica's own share of the head's KV pages and subtracts the rejected
ones. Greedy output equals transformers' greedy output of the target alone, under chunked
prefill and preemption; both replicas ran requests; nothing compiles after warm-up.
(Synchronous scheduling with two replicas against vLLM's CPU backend's drafts:
tests/e2e/test_llm_eagle3.py. EAGLE-1 (method eagle, save_tiny_eagle1(echo=True), 48
pages) passed the same check once by hand, 315 drafted, 9 accepted, 0 compiled; not kept
here to hold the slow set's time: the same runner path, another head module.)"""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, metric, num_compilations, shutdown, start_llm
from tests.eagle3_checkpoint import save_tiny_eagle3, save_tiny_llama_target
from tests.helpers import hf_greedy_ids

pytestmark = pytest.mark.slow

NUM_NEW = 20
K = 3
# One page (16 tokens): K and V, 2 kv heads, head dim 32, float32, of the target's 2 layers
# and the head's one.
LAYER_PAGE_BYTES = 2 * 16 * 2 * 32 * 4
DATA_PARALLEL = {"data_parallel_size": 2}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return save_tiny_llama_target(tmp_path_factory.mktemp("eagle_dp") / "target")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(4)
    return [rng.integers(3, 128, size=n).tolist() for n in (5, 40, 60, 17, 9, 26)]


def _serve(target, prompts, speculative_config, num_pages: int):
    """Greedy output and counters of an engine of two replicas sharing num_pages pages
    (each replica's its own half, one its null page); 32 tokens a step chunk the longer
    prompts."""
    llm = start_llm(target, kv_cache_memory_bytes=num_pages, max_num_seqs=4,
                    max_num_batched_tokens=32, additional_config=DATA_PARALLEL,
                    speculative_config=speculative_config)
    try:
        assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling  # vLLM's default
        warm = num_compilations(llm)
        got = generate_ids(llm, prompts, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
        return dict(
            outputs=got, compiled=num_compilations(llm) - warm,
            drafted=metric(llm, "vllm:spec_decode_num_draft_tokens"),
            accepted=metric(llm, "vllm:spec_decode_num_accepted_tokens"),
            preemptions=metric(llm, "vllm:num_preemptions"),
            rows=llm.collective_rpc("replica_rows")[0])
    finally:
        shutdown(llm)


def test_eagle3_with_two_replicas_and_async_scheduling_equals_the_target_alone(target,
                                                                                prompts):
    """An "echo" head (the target's embedding echoed: many drafts accepted, not all). 20
    pages, 10 a replica, fewer than its requests' pages at the end: vLLM preempts."""
    from safetensors.numpy import load_file

    embed = load_file(str(target / "model.safetensors"))["model.embed_tokens.weight"]
    head = save_tiny_eagle3(target.parent / "head3", (0, 1, 2), echo_embed=embed)
    run = _serve(target, prompts, {"method": "eagle3", "model": str(head),
                                   "num_speculative_tokens": K}, 20 * 3 * LAYER_PAGE_BYTES)
    print(f"eagle3, 2 replicas, async: {run}")
    assert run["outputs"] == hf_greedy_ids(target, prompts, NUM_NEW)
    assert 0 < run["accepted"] < run["drafted"]
    assert run["preemptions"] > 0
    assert len(run["rows"]) == 2 and min(run["rows"]) > 0, run["rows"]
    assert run["compiled"] == 0

