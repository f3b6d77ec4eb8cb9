"""vLLM's LLM class on a tiny random Llama: exactness under preemption, sampling, bad input."""

import gc

import numpy as np
import pytest

from tests.helpers import (bf16_keys_and_values, bf16_linear_inputs, hf_greedy_ids,
                           save_bf16_rounded, save_tiny_llama)

pytestmark = pytest.mark.slow

NUM_NEW = 24
PAGE_BYTES = 2 * 16 * 2 * 16 * 4 * 2  # K and V, block 16, 2 kv heads, head dim 16, f32, 2 layers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(3, 128, size=n).tolist() for n in (5, 17, 33, 40, 8, 60, 25, 12)]


def _llm(model_dir, num_pages: int, dtype: str = "float32"):
    from vllm import LLM

    return LLM(model=str(model_dir), dtype=dtype, max_model_len=128, max_num_seqs=8,
               max_num_batched_tokens=64, kv_cache_memory_bytes=num_pages * PAGE_BYTES, seed=0,
               disable_log_stats=False)


def _shutdown(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _generate(llm, prompts, **params):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=NUM_NEW, ignore_eos=True, **params)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def roomy(model_dir):
    llm = _llm(model_dir, num_pages=128)
    yield llm
    _shutdown(llm)


def test_greedy_matches_transformers(roomy, model_dir, prompts):
    assert _generate(roomy, prompts, temperature=0.0) == hf_greedy_ids(model_dir, prompts, NUM_NEW)


def test_temperature_sampling_gives_valid_varied_tokens(roomy, prompts):
    outs = _generate(roomy, prompts * 2, temperature=1.0, top_k=50, top_p=0.9)
    assert all(len(o) == NUM_NEW and all(0 <= t < 128 for t in o) for o in outs)
    # Same prompt twice in one batch: independent draws (equal only by a ~1e-30 chance).
    assert outs[:len(prompts)] != outs[len(prompts):]


def test_whole_vocabulary_logprobs_beyond_max_logprobs_are_refused_clearly(roomy, prompts):
    # logprobs=-1 is served with max_logprobs=-1 (tests/e2e/test_llm_logprobs.py); under the
    # default max_logprobs (20) it is refused as a validation error (a 400 in the server).
    from vllm import SamplingParams

    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="greater than max allowed: 20"):
        roomy.generate([{"prompt_token_ids": prompts[0]}],
                       SamplingParams(max_tokens=4, logprobs=-1), use_tqdm=False)
    # The engine keeps serving after the refusal.
    assert len(_generate(roomy, prompts[:1], temperature=0.0)[0]) == NUM_NEW


def test_preemption_keeps_greedy_output_exact(model_dir, prompts):
    # 14 pages of 16 tokens cannot hold 8 sequences of up to 84 tokens at once: vLLM must
    # preempt requests, free their pages and recompute them later.
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = _llm(model_dir, num_pages=14)
    try:
        got = _generate(llm, prompts, temperature=0.0)
        preemptions = sum(getattr(m, "value", 0) for m in llm.get_metrics()
                          if m.name == "vllm:num_preemptions")
    finally:
        _shutdown(llm)
    assert got == expected
    assert preemptions > 0


def test_bfloat16_means_bf16_projections_and_f32_elsewhere(model_dir, prompts,
                                                           tmp_path_factory):
    # On the host CPU, dtype=bfloat16 keeps the projection matrices in bfloat16, rounds
    # their inputs to bfloat16 and accumulates in float32; the KV cache is bfloat16 (read by
    # the native attention kernel); the rest (norms, attention's arithmetic) is float32.
    # Greedy output is transformers' in float32 on the checkpoint with its matrices
    # rounded, every nn.Linear's input rounded and attention's keys and values rounded,
    # both for a batch (wider steps) and for requests run alone (their decode steps take
    # one token).
    rounded = save_bf16_rounded(model_dir, tmp_path_factory.mktemp("rounded") / "llama")
    with bf16_linear_inputs(), bf16_keys_and_values():
        expected = hf_greedy_ids(rounded, prompts, NUM_NEW)
    llm = _llm(model_dir, num_pages=128, dtype="bfloat16")
    try:
        together = _generate(llm, prompts, temperature=0.0)
        alone = [_generate(llm, [p], temperature=0.0)[0] for p in prompts[:2]]
    finally:
        _shutdown(llm)
    assert together == expected
    assert alone == expected[:2]


def test_reset_encoder_cache_reaches_the_worker_and_serving_goes_on(roomy, model_dir, prompts):
    # vLLM calls every worker's reset_encoder_cache (after weight updates, when a pause clears
    # the caches); a worker without it fails the call. We keep no encoder cache: a no-op.
    roomy.llm_engine.reset_encoder_cache()
    assert _generate(roomy, prompts[:2], temperature=0.0) == hf_greedy_ids(model_dir, prompts[:2],
                                                                          NUM_NEW)


def test_repr_of_the_llm_names_the_family_and_serving_goes_on(roomy, model_dir, prompts):
    # LLM.__repr__ (pytest prints it when an assertion touches the object) asks each worker
    # for get_model_inspection; unanswered, a follower across hosts stopped the engine.
    view = repr(roomy)
    assert view.startswith("LlamaForCausalLM served by xla-inference: JAX family llama"), view
    assert "parameter arrays" in view and "mesh" in view
    # LLM.apply_model runs a function on each worker's torch module; there is none here,
    # which the worker says (it raised a bare NotImplementedError), and serving goes on.
    with pytest.raises(Exception, match="not as a torch nn.Module"):
        roomy.apply_model(lambda module: type(module).__name__)
    assert _generate(roomy, prompts[:1], temperature=0.0) == hf_greedy_ids(model_dir, prompts[:1],
                                                                          NUM_NEW)


def test_max_model_len_minus_one_fits_the_context_to_the_kv_cache(model_dir):
    # --max-model-len -1: vLLM starts from the checkpoint's 512 positions, then, the KV cache
    # sized, shortens the context to what the cache holds for one sequence: 7 pages less
    # vLLM's null page, 6 x 16 = 96 tokens. It tells the worker (update_max_model_len)
    # before the engine is built, and the engine must be built for 96.
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    rng = np.random.default_rng(3)
    prompt, too_long = (rng.integers(3, 128, size=n).tolist() for n in (60, 97))
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=-1, max_num_seqs=8,
              max_num_batched_tokens=64, kv_cache_memory_bytes=7 * PAGE_BYTES, seed=0)
    try:
        chosen = llm.llm_engine.model_config.max_model_len
        built = llm.collective_rpc("served_max_model_len")[0]
        # The whole context: 60 prompt tokens and 36 new ones.
        out = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(max_tokens=36, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)
        with pytest.raises((ValueError, VLLMValidationError), match="maximum context length is 96 tokens"):
            llm.generate([{"prompt_token_ids": too_long}], SamplingParams(max_tokens=1),
                         use_tqdm=False)
    finally:
        _shutdown(llm)
    assert (chosen, built) == (96, 96)
    assert [list(out[0].outputs[0].token_ids)] == hf_greedy_ids(model_dir, [prompt], 36)


def test_profiler_routes_trace_with_jax_and_sleep_routes_keep_serving(model_dir, prompts,
                                                                     tmp_path):
    """--profiler-config's torch profiler: vLLM's start_profile/stop_profile reach the worker,
    which traces with JAX's profiler into torch_profiler_dir (an XLA trace of the steps run
    between them). The sleep routes (dev mode's /sleep, /wake_up) keep the memory and leave
    serving as it was; releasing memory is refused."""
    from vllm import LLM

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=128, max_num_seqs=8,
              max_num_batched_tokens=64, kv_cache_memory_bytes=128 * PAGE_BYTES, seed=0,
              profiler_config={"profiler": "torch", "torch_profiler_dir": str(tmp_path)})
    try:
        expected = hf_greedy_ids(model_dir, prompts[:2], NUM_NEW)
        llm.start_profile()
        assert _generate(llm, prompts[:2], temperature=0.0) == expected
        llm.stop_profile()
        traces = list(tmp_path.rglob("*.xplane.pb"))
        assert traces and all(t.stat().st_size > 0 for t in traces), list(tmp_path.rglob("*"))
        llm.sleep(level=1)
        llm.wake_up()
        assert _generate(llm, prompts[:2], temperature=0.0) == expected
    finally:
        _shutdown(llm)
