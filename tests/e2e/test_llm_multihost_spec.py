"""n-gram speculative decoding across two JAX processes ("hosts"), one virtual CPU device
each, tensor parallel 2 over both (plugin/multihost.py): the driver proposes (vLLM's
NgramProposer on its host), its drafts reach the follower in the scheduler output of the
step that verifies them, and both processes run that verify step. Greedy output equals
greedy without speculation (transformers), with drafts accepted on repeating text."""

import numpy as np
import pytest

from tests.e2e.engines import num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 16
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


def _metric(llm, name):
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


def test_ngram_greedy_across_two_processes_equals_greedy_without_speculation(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("XLA_INFERENCE_HOSTS", "2")
    monkeypatch.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")
    model_dir = save_tiny_llama(tmp_path / "llama")
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 33)]
    prompts += [list(range(10, 22)) * 4, [7, 9, 11, 13] * 3, [40, 41] * 20]
    expected = hf_greedy_ids(model_dir, prompts, NUM_NEW)
    llm = start_llm(model_dir, tensor_parallel_size=2, speculative_config=NGRAM,
                    max_num_seqs=4, max_num_batched_tokens=32)
    try:
        assert llm.collective_rpc("mesh_processes")[0] == [0, 1]
        warm = num_compilations(llm)
        from vllm import SamplingParams

        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                            use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        accepted = _metric(llm, "vllm:spec_decode_num_accepted_tokens")
        drafted = _metric(llm, "vllm:spec_decode_num_draft_tokens")
        compiled = num_compilations(llm) - warm
    finally:
        shutdown(llm)
    assert got == expected
    assert 0 < accepted <= drafted
    assert compiled == 0
