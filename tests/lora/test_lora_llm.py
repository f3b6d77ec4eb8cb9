"""vllm.LLM with --enable-lora on a tiny Llama: one batch mixing the base model and three
PEFT adapters (two device slots, so adapters are swapped and evicted between steps) gives
each request transformers+peft's greedy output, with no compile after warm-up; the same
with tensor parallel 2 (the stacks split as their base weights); and data parallel 2
(each replica's requests read their own tokens' slots) on the torch path (vLLM's Llama
class, q/k/v and gate/up fused: torch_models/lora.py), both in one run."""

import numpy as np
import pytest

from tests.e2e.engines import num_compilations, shutdown, start_llm
from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import peft_greedy, save_adapters

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 8


@pytest.mark.parametrize("parallel", [{}, dict(tensor_parallel_size=2),
                                      dict(additional_config={"data_parallel_size": 2},
                                           model_impl="vllm")],
                         ids=["one_device", "tp2", "dp2_torch_path"])
def test_mixed_batch_matches_peft_greedy(tmp_path, parallel):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    model_dir = save_tiny_llama(tmp_path / "llama")
    adapters = save_adapters(model_dir, tmp_path)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (6, 19, 11, 27, 9, 14, 23, 8)]
    requests = [None] + [LoRARequest(name, i, str(path))
                         for i, (name, path) in enumerate(adapters.items(), start=1)]
    chosen = [requests[i % 4] for i in range(len(prompts))]
    llm = start_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=3,
                    **parallel)
    try:
        before = num_compilations(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                            lora_request=chosen, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        after = num_compilations(llm)
        loaded = llm.collective_rpc("list_loras")[0]
        impl = str(llm.llm_engine.model_config.model_impl)
        writes = llm.collective_rpc("lora_slot_writes")[0]
    finally:
        shutdown(llm)
    want = [peft_greedy(model_dir, None if r is None else adapters[r.lora_name], p, NUM_NEW)
            for p, r in zip(prompts, chosen)]
    assert got == want
    assert len({tuple(w) for w in want}) == len(want)  # the adapters change the outputs
    assert after == before
    assert set(loaded) == {1, 2, 3} and writes >= 4  # without DP two slots for three adapters: a swap
    assert impl == parallel.get("model_impl", "auto")
