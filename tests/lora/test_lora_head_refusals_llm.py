"""Through vllm.LLM with n-gram speculative decoding and LoRA: an adapter on lm_head is
refused when loaded (the drafts would be verified with the base LM head), a request for
prompt_logprobs with it is refused before it reaches the engine, and the engine serves
on afterwards (unit tests: tests/lora/test_lora_vocab_refusals.py,
tests/plugin/test_lora_requests.py)."""

import pytest

from tests.e2e.engines import shutdown, start_llm
from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import save_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_lm_head_adapter_refusals_through_llm(tmp_path):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.request import LoRARequest

    model_dir = save_tiny_llama(tmp_path / "llama")
    head = LoRARequest("head", 1, str(save_adapter(model_dir, tmp_path / "head", seed=1, r=4,
                                                   target_modules=["lm_head", "q_proj"])))
    attn = LoRARequest("attn", 2, str(save_adapter(model_dir, tmp_path / "attn", seed=2, r=4,
                                                   target_modules=["q_proj"])))
    llm = start_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8,
                    speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                        "prompt_lookup_max": 2})
    prompt = [{"prompt_token_ids": [5, 9, 17, 33, 2, 71]}]
    try:
        with pytest.raises(Exception, match="adapts lm_head.*speculative decoding"):
            llm.llm_engine.add_lora(head)
        with pytest.raises(VLLMValidationError, match="prompt_logprobs with LoRA adapter 'head'"):
            llm.generate(prompt, SamplingParams(max_tokens=2, prompt_logprobs=1),
                         lora_request=head, use_tqdm=False)
        out = llm.generate(prompt, SamplingParams(max_tokens=2, prompt_logprobs=1,
                                                  temperature=0.0),
                           lora_request=attn, use_tqdm=False)[0]
    finally:
        shutdown(llm)
    assert len(out.outputs[0].token_ids) == 2 and len(out.prompt_logprobs) == 6
