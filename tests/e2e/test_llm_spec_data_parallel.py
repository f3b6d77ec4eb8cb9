"""Speculative decoding with data parallel replicas (additional_config data_parallel_size 2:
two vLLM schedulers, each replica's requests on its own slice of the mesh's data axis, one
verify step over every replica's rows) on a tiny random Llama over 8 virtual CPU devices:
greedy output with n-gram drafts equals the same engine's without speculation and
transformers' greedy, under preemption, chunked prefill and the prefix cache; a seeded
request samples the same tokens alone and beside others; both replicas' acceptance reaches
vLLM's spec-decode metrics; nothing compiles after warm-up."""

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
    each: the replicas' schedulers preempt."""
    return start_llm(model_dir, kv_cache_memory_bytes=num_pages * PAGE_BYTES,
                     additional_config=DATA_PARALLEL, **overrides)


def test_ngram_with_two_replicas_equals_greedy_without_speculation(model_dir, prompts):
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = _engine(model_dir, num_pages=20)
    try:
        plain = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    finally:
        shutdown(llm)
    llm = _engine(model_dir, num_pages=20, speculative_config=NGRAM)
    try:
        warm = num_compilations(llm)
        got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        again = generate_ids(llm, prompts[3:], temperature=0.0, max_tokens=NUM_NEW,
                             ignore_eos=True)  # their pages from each replica's prefix cache
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        preemptions = metric(llm, "vllm:num_preemptions")
        rows = llm.collective_rpc("replica_rows")[0]
        # A seeded request draws the same tokens alone and beside others on either replica
        # (the random rejection path, with penalties' per-row extras for one call).
        params = dict(temperature=1.0, seed=11, max_tokens=NUM_NEW, ignore_eos=True)
        alone = generate_ids(llm, prompts[3:4], **params)
        crowd = generate_ids(llm, prompts[4:] + prompts[3:4] + prompts[:2], **params)
        penalised = [generate_ids(llm, p, repetition_penalty=1.3, **params)
                     for p in (prompts[3:4], prompts[:3] + prompts[3:4])]
        compiled_after_warm_up = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    assert got == plain == expected
    assert again == expected[3:]
    assert 0 < accepted <= drafted
    assert preemptions > 0
    assert len(rows) == 2 and min(rows) > 0, rows  # both replicas ran requests
    assert crowd[3] == alone[0] and len(alone[0]) == NUM_NEW
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


def test_eagle3_with_two_replicas_drafts_as_with_one(tmp_path, monkeypatch):
    """An EAGLE-3 head over two replicas' requests (one program over both replicas' rows and
    pages) proposes every draft it proposes on one replica, and greedy output is
    transformers'; synchronous scheduling, so that vLLM's schedulers hold the drafts."""
    from tests.e2e import eagle3_run
    from tests.eagle3_checkpoint import save_tiny_eagle3, save_tiny_llama_target

    target = save_tiny_llama_target(tmp_path / "target")
    from safetensors.numpy import load_file

    embed = load_file(str(target / "model.safetensors"))["model.embed_tokens.weight"]
    head = save_tiny_eagle3(tmp_path / "head", (0, 1, 2), echo_embed=embed)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the schedulers in this process
    one = eagle3_run.run(str(target), str(head))
    two = eagle3_run.run(str(target), str(head), additional_config=DATA_PARALLEL)
    assert two["outputs"] == one["outputs"] == hf_greedy_ids(
        target, eagle3_run.prompts(), eagle3_run.NUM_NEW)
    assert two["drafts"] == one["drafts"]
    assert two["drafted"] == one["drafted"] > two["accepted"] == one["accepted"] > 0
