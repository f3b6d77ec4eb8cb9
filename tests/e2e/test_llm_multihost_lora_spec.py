"""LoRA adapters and n-gram speculative decoding across two JAX processes ("hosts"), one
virtual CPU device each, tensor parallel 2 over both (distributed/multihost.py), on one engine
(one launch for the module):

- LoRA: every process holds its half of each adapter's stacks, so each must make the same
  slot writes, in the same order, before the step that reads them. The driver's add_lora
  calls and each step's scheduler output (whose new requests name their adapter's path)
  reach the follower in order, and it reads the PEFT files from the same path. A batch
  mixing the base model and two adapters, then an adapter added at run time (two slots for
  three adapters: a slot rewritten on both processes mid-run), give transformers+peft's
  greedy output.
- n-gram: the driver proposes (vLLM's NgramProposer on its host); its drafts reach the
  follower in the scheduler output of the step that verifies them. Greedy output equals
  greedy without speculation (transformers), drafts accepted on repeating text.

Nothing compiles after warm-up in either."""

import numpy as np
import pytest

from tests.e2e.engines import num_compilations, shutdown, start_llm
from tests.helpers import hf_greedy_ids, save_tiny_llama
from tests.lora.lora_helpers import ADAPTERS, peft_greedy, save_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 8
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("multihost") / "llama")


@pytest.fixture(scope="module")
def adapters(model_dir):
    root = model_dir.parent
    return {name: save_adapter(model_dir, root / name, seed=10 + i, **fields)
            for i, (name, fields) in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def llm(model_dir):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
        env.setenv("XLA_INFERENCE_HOSTS", "2")
        env.setenv("XLA_INFERENCE_JOIN_TIMEOUT", "300")
        engine = start_llm(model_dir, tensor_parallel_size=2, enable_lora=True, max_loras=2,
                           max_lora_rank=16, max_cpu_loras=3, speculative_config=NGRAM,
                           max_num_seqs=4, max_num_batched_tokens=32)
    assert engine.collective_rpc("mesh_processes")[0] == [0, 1]
    yield engine
    shutdown(engine)


def _generate(llm, prompts, loras=None, max_tokens=NUM_NEW):
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                        lora_request=loras, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _metric(llm, name):
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


def test_lora_mixed_batch_and_a_run_time_adapter(llm, model_dir, adapters):
    from vllm.lora.request import LoRARequest

    first = [LoRARequest("a4", 1, str(adapters["a4"])), LoRARequest("a8", 2, str(adapters["a8"]))]
    late = LoRARequest("a16", 3, str(adapters["a16"]))
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (6, 19, 11, 27, 9, 14)]
    chosen = [[None, *first][i % 3] for i in range(len(prompts))]
    late_prompts, late_chosen = prompts[:3], [late, None, late]

    before = num_compilations(llm)
    got = _generate(llm, prompts, chosen)
    # At run time, by the engine's add_lora (vLLM's /v1/load_lora_adapter path): every
    # process reads it; its first step then takes one of the two slots on both.
    assert llm.llm_engine.add_lora(late)
    writes_before_late = llm.collective_rpc("lora_slot_writes")[0]
    got_late = _generate(llm, late_prompts, late_chosen)
    loaded = set(llm.collective_rpc("list_loras")[0])
    writes = llm.collective_rpc("lora_slot_writes")[0]
    compiled = num_compilations(llm) - before

    path = lambda r: None if r is None else adapters[r.lora_name]  # noqa: E731
    want = [peft_greedy(model_dir, path(r), p, NUM_NEW) for p, r in zip(prompts, chosen)]
    want_late = [peft_greedy(model_dir, path(r), p, NUM_NEW)
                 for p, r in zip(late_prompts, late_chosen)]
    assert got == want
    assert got_late == want_late
    # the adapters change the outputs (the same prompts appear with and without one)
    assert len({tuple(w) for w in want + want_late}) == len(want) + len(want_late)
    assert loaded == {1, 2, 3}
    assert writes > writes_before_late
    assert compiled == 0


def test_ngram_greedy_equals_greedy_without_speculation(llm, model_dir):
    num_new = 16
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 33)]
    prompts += [list(range(10, 22)) * 4, [7, 9, 11, 13] * 3, [40, 41] * 20]
    expected = hf_greedy_ids(model_dir, prompts, num_new)
    before = num_compilations(llm)
    accepted_before = _metric(llm, "vllm:spec_decode_num_accepted_tokens")
    drafted_before = _metric(llm, "vllm:spec_decode_num_draft_tokens")
    got = _generate(llm, prompts, max_tokens=num_new)
    accepted = _metric(llm, "vllm:spec_decode_num_accepted_tokens") - accepted_before
    drafted = _metric(llm, "vllm:spec_decode_num_draft_tokens") - drafted_before
    compiled = num_compilations(llm) - before
    assert got == expected
    assert 0 < accepted <= drafted
    assert compiled == 0
