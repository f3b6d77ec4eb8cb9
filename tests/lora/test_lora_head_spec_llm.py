"""Through vllm.LLM with n-gram speculative decoding and LoRA: base and an lm_head adapter
mixed in one batch give transformers+peft's greedy tokens (the verify step scores each
request's drafts with its own adapter's head; without speculation the same engine's greedy
equals peft's too: test_lora_vocab.py), and prompt_logprobs with that adapter are peft's
log_softmax. A LoRARequest whose adapter we refuse (DoRA, rank above --max-lora-rank, a
module the model lacks) fails generate with a validation error naming it before the
request reaches the engine, which serves the next call. Engine-level tests:
test_lora_head_scoring.py, tests/plugin/test_lora_requests.py."""

import shutil

import numpy as np
import pytest

from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import peft_greedy, peft_logits, save_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 8


def _save_adapter_for_a_missing_layer(good, out):
    """A copy of a q_proj adapter moved to layer 7 of a 2-layer model."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(good, out)
    tensors = load_file(str(good / "adapter_model.safetensors"))
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    return out


def test_lm_head_adapter_with_ngram_and_refused_adapters_through_llm(tmp_path):
    import scipy.special
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.request import LoRARequest

    from tests.e2e.engines import metric, num_compilations, shutdown, start_llm

    model_dir = save_tiny_llama(tmp_path / "llama")
    head_dir = save_adapter(model_dir, tmp_path / "head", seed=1, r=8, lora_alpha=16,
                            target_modules=["lm_head", "q_proj"])
    attn_dir = save_adapter(model_dir, tmp_path / "attn", seed=2, r=4, target_modules=["q_proj"])
    refused = {"use_dora": save_adapter(model_dir, tmp_path / "dora", seed=3, r=4, use_dora=True,
                                        target_modules=["q_proj"]),
               "above --max-lora-rank": save_adapter(model_dir, tmp_path / "r32", seed=4, r=32,
                                                     target_modules=["q_proj"]),
               "layers.7": _save_adapter_for_a_missing_layer(attn_dir, tmp_path / "missing")}
    head = LoRARequest("head", 1, str(head_dir))
    rng = np.random.default_rng(3)
    prompts = [(rng.integers(3, 128, size=n).tolist() * 3)[:20] for n in (4, 5, 6, 3)]
    chosen = [None, head, head, None]
    greedy = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    llm = start_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=16,
                    speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                        "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    try:
        before = num_compilations(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy,
                            lora_request=chosen, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        scored = llm.generate([{"prompt_token_ids": prompts[1]}],
                              SamplingParams(max_tokens=1, prompt_logprobs=0),
                              lora_request=head, use_tqdm=False)[0].prompt_logprobs
        errors = {}
        for i, (why, path) in enumerate(refused.items(), start=2):
            with pytest.raises(VLLMValidationError) as error:
                llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], greedy,
                             lora_request=[None, LoRARequest(f"bad{i}", i, str(path))],
                             use_tqdm=False)
            errors[why] = str(error.value)
        again = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy,
                             lora_request=chosen, use_tqdm=False)  # the engine serves on
        after = num_compilations(llm)
    finally:
        shutdown(llm)
    want = [peft_greedy(model_dir, None if r is None else head_dir, p, NUM_NEW)
            for p, r in zip(prompts, chosen)]
    assert got == want
    assert want[1] != peft_greedy(model_dir, None, prompts[1], NUM_NEW)  # the adapter matters
    assert accepted > 0
    assert [list(o.outputs[0].token_ids) for o in again] == want
    assert after == before
    log_probs = scipy.special.log_softmax(peft_logits(model_dir, head_dir, prompts[1]), axis=-1)
    assert scored[0] is None
    np.testing.assert_allclose([scored[i][t].logprob for i, t in enumerate(prompts[1]) if i],
                               [log_probs[i - 1, t] for i, t in enumerate(prompts[1]) if i],
                               atol=1e-4, rtol=0)
    for why, message in errors.items():
        assert why in message and "cannot be served" in message, message


def test_lora_with_a_draft_model_through_llm(tmp_path):
    """--speculative-config draft_model with LoRA: the draft model (here the base model
    itself) drafts without the adapters, the verify step applies each request's (an
    attention and lm_head adapter): base and adapter requests in one batch give
    transformers+peft's greedy tokens, the base ones with every draft accepted."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.e2e.engines import metric, num_compilations, shutdown, start_llm

    model_dir = save_tiny_llama(tmp_path / "llama")
    head_dir = save_adapter(model_dir, tmp_path / "head", seed=5, r=8, lora_alpha=16,
                            target_modules=["lm_head", "q_proj", "v_proj"])
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (6, 9, 5, 11)]
    chosen = [None, LoRARequest("head", 1, str(head_dir))] * 2
    llm = start_llm(model_dir, enable_lora=True, max_loras=1, max_lora_rank=8,
                    speculative_config={"method": "draft_model", "model": str(model_dir),
                                        "num_speculative_tokens": 2})
    try:
        before = num_compilations(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                            lora_request=chosen, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        after = num_compilations(llm)
    finally:
        shutdown(llm)
    want = [peft_greedy(model_dir, None if r is None else head_dir, p, NUM_NEW)
            for p, r in zip(prompts, chosen)]
    assert got == want
    assert want[1] != peft_greedy(model_dir, None, prompts[1], NUM_NEW)  # the adapter matters
    assert 0 < accepted < drafted  # the adapter's requests reject some base drafts
    assert after == before
