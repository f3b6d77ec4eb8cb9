"""Structured output with draft-model speculative decoding under vLLM's async scheduling
(its default for draft_model): vLLM validates the drafts it takes from the runner against
the grammar, pads the rest with -1 and builds the bitmask for them; the runner verifies its
own drafts only as far as that bitmask constrains (plugin/model_runner._acceptable_drafts).
The draft model is the target itself, so its drafts are the target's unconstrained greedy
tokens: some the grammar allows, some not. Greedy output equals transformers' greedy
output of the target alone with the grammar's mask applied by hand."""

import numpy as np
import pytest

from tests.e2e.engines import generate_ids, metric, shutdown, start_llm
from tests.helpers import save_tiny_llama

pytestmark = pytest.mark.slow

# The regex's tokens: the word tokenizer's "t3".."t9" and "t30".."t99" (not "t1": no token
# goes on with a digit), most of the vocabulary, so that many drafts hold and some do not.
REGEX = "(t[3-9]|t[3-9][0-9])+"
ALLOWED = (*range(3, 10), *range(30, 100))
EOS = 2
MAX_TOKENS = 16


def _greedy_under_regex(model_dir, prompt):
    """transformers' greedy tokens with every token but ALLOWED banned, and EOS allowed (and
    stopping) once one of them was generated: the regex's mask."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids, new = list(prompt), []
    with torch.no_grad():
        while len(new) < MAX_TOKENS:
            logits = model(torch.tensor([ids])).logits[0, -1].numpy()
            allowed = list(ALLOWED) + ([EOS] if new else [])
            token = allowed[int(np.argmax(logits[allowed]))]
            new.append(token)
            ids.append(token)
            if token == EOS:
                break
    return new


def test_regex_output_under_async_draft_model_equals_the_target_alone(tmp_path):
    from vllm.sampling_params import StructuredOutputsParams

    target = save_tiny_llama(tmp_path / "target")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (6, 11, 19)]
    expected = [_greedy_under_regex(target, p) for p in prompts]
    llm = start_llm(target, speculative_config={"method": "draft_model", "model": str(target),
                                                "num_speculative_tokens": 3})
    try:
        assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling
        got = generate_ids(llm, prompts, max_tokens=MAX_TOKENS, temperature=0.0,
                           structured_outputs=StructuredOutputsParams(regex=REGEX))
        drafted = metric(llm, "vllm:spec_decode_num_draft_tokens")
        accepted = metric(llm, "vllm:spec_decode_num_accepted_tokens")
    finally:
        shutdown(llm)
    # The target drafts for itself: every draft the grammar allows is accepted (vLLM does
    # not count the ones it invalidated), and some are.
    assert drafted == accepted > 0
    assert got == expected
