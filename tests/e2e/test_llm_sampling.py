"""The sampling surface through vllm.LLM on a tiny random Llama, against transformers + numpy."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama
from tests.sampling_reference import hf_processed_greedy
from xla_inference.sampling.host import SamplingOptions

pytestmark = pytest.mark.slow

NUM_NEW = 16
PAGE_BYTES = 16 * 2 * 2 * 2 * 16 * 4  # 16 tokens of K and V, 2 layers x 2 KV heads x 16, f32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(3, 128, size=n).tolist() for n in (6, 19, 33, 12)]


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = start_llm(model_dir, max_model_len=128, max_num_seqs=24, max_num_batched_tokens=128,
                       kv_cache_memory_bytes=8 << 20)
    yield engine
    shutdown(engine)


# (vLLM's parameters, the same rules written out for the numpy reference)
PROCESSED_CASES = [
    (dict(presence_penalty=1.5, frequency_penalty=0.5),
     SamplingOptions(presence_penalty=1.5, frequency_penalty=0.5)),
    (dict(repetition_penalty=1.8), SamplingOptions(repetition_penalty=1.8)),
    (dict(logit_bias={5: 4.0, 17: 3.0, 40: -100.0}),
     SamplingOptions(logit_bias=((5, 4.0), (17, 3.0), (40, -100.0)))),
    (dict(allowed_token_ids=[3, 9, 27, 81, 100]), SamplingOptions(allowed_token_ids=(3, 9, 27, 81, 100))),
    (dict(bad_words=["t5", "t9 t17"], presence_penalty=0.3),
     SamplingOptions(bad_words=((5,), (9, 17)), presence_penalty=0.3)),
]


@pytest.mark.parametrize("params,reference", PROCESSED_CASES,
                         ids=["presence+frequency", "repetition", "logit_bias", "allowed", "bad_words"])
def test_processed_greedy_matches_transformers_with_numpy_rules(llm, model_dir, prompts, params,
                                                                reference):
    got = generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True, **params)
    want = [hf_processed_greedy(model_dir, p, NUM_NEW, reference) for p in prompts]
    assert got == want


def test_min_tokens_holds_back_a_stop_token(llm, model_dir, prompts):
    plain = generate_ids(llm, prompts[:1], temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)[0]
    stop = plain[1]  # greedy would stop at the second token without min_tokens
    got = generate_ids(llm, prompts[:1], temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True,
                       stop_token_ids=[stop], min_tokens=6)[0]
    want = hf_processed_greedy(model_dir, prompts[0], NUM_NEW,
                               SamplingOptions(min_tokens=6, stop_token_ids=(stop,)), stop_ids=(stop,))
    assert got == want
    assert stop not in got[:6] and len(got) >= 6


def test_seeded_request_is_the_same_alone_and_in_a_batch(llm, prompts):
    seeded = dict(temperature=1.0, top_p=0.95, seed=4321, max_tokens=NUM_NEW, ignore_eos=True)
    alone = generate_ids(llm, prompts[1:2], **seeded)[0]
    from vllm import SamplingParams

    crowd = [SamplingParams(temperature=1.0, max_tokens=NUM_NEW + i % 5, ignore_eos=True)
             for i in range(16)]
    batch_prompts = [prompts[i % len(prompts)] for i in range(16)] + [prompts[1]]
    params = crowd + [SamplingParams(**seeded)]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch_prompts], params, use_tqdm=False)
    assert list(outs[-1].outputs[0].token_ids) == alone
    other_seed = generate_ids(llm, prompts[1:2], **{**seeded, "seed": 4322})[0]
    assert other_seed != alone


def test_logprobs_and_prompt_logprobs_match_transformers(llm, model_dir, prompts):
    from vllm import SamplingParams

    from tests.helpers import hf_logits

    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=5,
                        prompt_logprobs=3)
    out = llm.generate([{"prompt_token_ids": prompts[2]}], sp, use_tqdm=False)[0]
    tokens = prompts[2] + list(out.outputs[0].token_ids)
    logits = hf_logits(model_dir, tokens).astype(np.float64)
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tol = 1e-4  # float32 model against float32 transformers, in log space
    P = len(prompts[2])
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == P
    for pos in range(1, P):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[tokens[pos]].logprob - ref[pos - 1, tokens[pos]]) < tol
        assert entry[tokens[pos]].rank == 1 + int(np.sum(ref[pos - 1] > ref[pos - 1, tokens[pos]]))
        top = np.argsort(-ref[pos - 1])[:3]
        assert set(top.tolist()) <= set(entry)
    for i, entry in enumerate(out.outputs[0].logprobs):
        row = ref[P - 1 + i]
        top = np.argsort(-row)[:5]
        assert set(top.tolist()) <= set(entry)
        for token, lp in entry.items():
            assert abs(lp.logprob - row[token]) < tol
    assert abs(out.outputs[0].cumulative_logprob
               - sum(ref[P - 1 + i, t] for i, t in enumerate(out.outputs[0].token_ids))) < 1e-3


def test_n_completions_and_stop_strings(llm, prompts):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompts[0]}],
                       SamplingParams(n=3, temperature=1.0, max_tokens=NUM_NEW, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = generate_ids(llm, prompts[:1], temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)[0]
    stop_word = f"t{greedy[3]}"
    out = llm.generate([{"prompt_token_ids": prompts[0]}],
                       SamplingParams(temperature=0.0, max_tokens=NUM_NEW, stop=[stop_word]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and stop_word not in out.text
    assert len(out.token_ids) <= 4 and list(out.token_ids) == greedy[:len(out.token_ids)]


def test_async_scheduling_gives_the_same_greedy_output(model_dir, prompts):
    engine = start_llm(model_dir, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
                       kv_cache_memory_bytes=4 << 20, async_scheduling=True)
    try:
        got = generate_ids(engine, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
        assert engine.llm_engine.vllm_config.scheduler_config.async_scheduling
    finally:
        shutdown(engine)
    assert got == hf_greedy_ids(model_dir, prompts, NUM_NEW)


def _mixed_requests(prompts):
    """Plain greedy requests of several lengths (one stopping at a stop token), seeded
    sampling, and requests whose tokens the host needs every step (penalties, logprobs)."""
    from vllm import SamplingParams

    plain = [SamplingParams(temperature=0.0, max_tokens=8 + 7 * i, ignore_eos=True) for i in range(6)]
    seeded = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=30, ignore_eos=True)
              for i in range(4)]
    host = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.5),
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2),
            SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[7, 11, 13, 17, 19, 23])]
    params = plain + seeded + host
    requests = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(len(params))]
    return requests, params


def test_async_scheduling_keeps_tokens_on_device_and_matches_synchronous(model_dir, prompts):
    """With async scheduling, plain requests' tokens stay on device and feed the next step
    (plugin/async_output.py), drawn by the step's own program where all are greedy
    (runner/engine._forward_argmax), while steps with host-side needs resolve them first;
    under
    preemption (a KV cache of 12 pages for 13 requests of up to 6) every request's tokens
    equal those of synchronous scheduling, where each token reaches the host before the
    next step is built (that path is checked against transformers above)."""
    from tests.e2e.engines import metric

    requests, params = _mixed_requests(prompts)
    got = {}
    for async_scheduling in (True, False):
        engine = start_llm(model_dir, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
                           kv_cache_memory_bytes=12 * PAGE_BYTES, async_scheduling=async_scheduling)
        try:
            before = engine.collective_rpc("num_compilations")[0]
            outs = engine.generate(requests, params, use_tqdm=False)
            got[async_scheduling] = [list(o.outputs[0].token_ids) for o in outs]
            counts = engine.collective_rpc("async_step_counts")[0]
            assert engine.collective_rpc("num_compilations")[0] == before  # the feed was warmed
            assert metric(engine, "vllm:num_preemptions") > 0
        finally:
            shutdown(engine)
        on_device, fed, by_forward = counts
        if async_scheduling:  # the all-greedy steps' programs drew their tokens themselves
            assert on_device > 20 and fed > 20 and 0 < by_forward < on_device, counts
        else:
            assert list(counts) == [0, 0, 0]
    assert got[True] == got[False]
    assert [len(ids) for ids in got[True][:6]] == [8 + 7 * i for i in range(6)]


def test_a_reset_of_running_requests_between_steps_restarts_them_cleanly(llm, model_dir, prompts):
    """reset_prefix_cache(reset_running_requests=True) between steps preempts every running
    request and drops its computed tokens (vLLM may resume it at the next step, its tokens
    resent) while a step's tokens are still on device: the restarted requests must not take
    those stale tokens, and greedy output stays transformers'."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"reset-{i}", {"prompt_token_ids": prompt}, params)
    got, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps in (3, 8, 9):
            assert llm.reset_prefix_cache(reset_running_requests=True)
    assert [got[f"reset-{i}"] for i in range(len(prompts))] == hf_greedy_ids(model_dir, prompts,
                                                                               NUM_NEW)
