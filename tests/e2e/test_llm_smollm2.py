"""vLLM's LLM class on xla-inference, real SmolLM2 in float32, against transformers."""

import json
import re

import jsonschema
import numpy as np
import pytest

from tests.e2e.engines import generate_ids, metric, num_compilations, shutdown, start_llm
from tests.e2e.reference import TransformersGGUF, hf_greedy, hf_log_softmax, prompt_token_ids

pytestmark = pytest.mark.slow

NUM_NEW = 32


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    return prompt_token_ids(smollm2_dir)


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_gguf):
    """transformers' SmolLM2 from the GGUF, loaded at most once for the greedy reference
    and the log-softmax one."""
    model = TransformersGGUF(smollm2_gguf)
    yield model
    model.release()


@pytest.fixture(scope="module")
def expected(smollm2_gguf, prompts, transformers_smollm2):
    return hf_greedy(smollm2_gguf, prompts, NUM_NEW, load_model=transformers_smollm2.get)


def _llm(model_dir, **overrides):
    args = dict(max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256,
                kv_cache_memory_bytes=256 << 20, enable_prefix_caching=True)
    return start_llm(model_dir, **{**args, **overrides})


def _greedy(llm, prompts):
    return generate_ids(llm, prompts, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    engine = _llm(smollm2_dir)
    yield engine
    shutdown(engine)


def test_greedy_matches_transformers_with_prefix_cache(llm, prompts, expected):
    compiled_after_warmup = num_compilations(llm)
    first = _greedy(llm, prompts)
    hits_before = metric(llm, "vllm:prefix_cache_hits")
    second = _greedy(llm, prompts)  # every prompt's full blocks now come from the cache
    assert metric(llm, "vllm:prefix_cache_hits") > hits_before
    # Steady state: serving compiled nothing after warm-up.
    assert num_compilations(llm) == compiled_after_warmup
    for i, (got, want) in enumerate(zip(first, expected)):
        assert got == want, f"prompt {i}: xla-inference {got} != transformers {want}"
    assert second == first


def test_logprobs_match_transformers_log_softmax(llm, smollm2_gguf, prompts,
                                                 transformers_smollm2):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5,
                        prompt_logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], sp, use_tqdm=False)
    tol = 2e-3  # float32 against float32 transformers; both dequantize the same GGUF
    sequences = [prompt + list(out.outputs[0].token_ids) for prompt, out in zip(prompts, outs)]
    references = hf_log_softmax(smollm2_gguf, sequences, transformers_smollm2.get())
    transformers_smollm2.release()  # the module's other engine needs the memory more
    for prompt, out, tokens, ref in zip(prompts, outs, sequences, references):
        P = len(prompt)
        for pos in range(1, P):
            lp = out.prompt_logprobs[pos][tokens[pos]]
            assert abs(lp.logprob - ref[pos - 1, tokens[pos]]) < tol
        for i, entry in enumerate(out.outputs[0].logprobs):
            row = ref[P - 1 + i]
            assert set(np.argsort(-row)[:5].tolist()) <= set(entry)
            for token, lp in entry.items():
                assert abs(lp.logprob - row[token]) < tol, (i, token)


def test_structured_outputs_hold_on_the_real_model(llm, smollm2_dir):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    tok = AutoTokenizer.from_pretrained(smollm2_dir)

    def ask(question, **structured):
        prompt = tok.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
        sp = SamplingParams(temperature=0.0, max_tokens=96,
                            structured_outputs=StructuredOutputsParams(**structured))
        return llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].text

    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = json.loads(ask("Describe a person as JSON with a name and an age.", json=schema))
    jsonschema.validate(reply, schema)
    phone = ask("Give me a phone number.", regex=r"\d{3}-\d{3}-\d{4}")
    assert re.fullmatch(r"\d{3}-\d{3}-\d{4}", phone), phone
    choice = ask("Is the sky blue? Answer yes or no.", choice=["yes", "no"])
    assert choice in ("yes", "no")


def test_chunked_prefill_and_preemption_keep_greedy_exact(smollm2_dir, prompts, expected):
    # 32 tokens per step: every prompt longer than that is prefilled in chunks, mixed with
    # other requests' decode steps. 12 pages of 16 tokens cannot hold all 8 sequences
    # (up to ~80 tokens each) at once, so vLLM must preempt and recompute.
    page_bytes = 2 * 16 * 3 * 64 * 4 * 30  # K and V, block 16, 3 kv heads, dim 64, f32, 30 layers
    engine = _llm(smollm2_dir, max_model_len=160, max_num_batched_tokens=32, max_num_seqs=8,
                  enable_prefix_caching=False, kv_cache_memory_bytes=12 * page_bytes)
    try:
        got = _greedy(engine, prompts)
        preemptions = metric(engine, "vllm:num_preemptions")
    finally:
        shutdown(engine)
    assert max(len(p) for p in prompts) > 32
    assert preemptions > 0
    assert got == expected
