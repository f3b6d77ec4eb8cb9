"""vllm.LLM with --enable-lora and --pipeline-parallel-size 2 on a tiny 4-layer Llama
(virtual CPU devices; two layers a stage, so a layer's place within its stage, which a
2-layer model would always give as 0, must pick its own adapter weights): one batch mixing
the base model, an adapter on the embedding, q_proj and the LM head, and one on v_proj
and the MLP gives transformers+peft's greedy output for each
request, nothing compiled after warm-up. Each stage's layers add their own layers'
adapters, each micro-batch's token slots travel with it through the stages, the
embedding's delta before the first stage and the LM head's after the last
(lora/slots._attach_staged, runner/engine._forward_microbatches_lora). PP 2 x DP 2 x TP 2
(each replica its micro-batches over the stages of its data slice, the stacks split over
the stage and model axes) passed the same test on a 2-layer model (61 s more; left out
for the test-time budget: add dict(pipeline_parallel_size=2, tensor_parallel_size=2,
additional_config={"data_parallel_size": 2}) to the parameters to run it)."""

import numpy as np
import pytest

from tests.e2e.engines import num_compilations, shutdown, start_llm
from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import peft_greedy, save_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 8
ADAPTERS = [("vocab", dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens",
                                                              "lm_head"])),
            ("mlp", dict(r=8, lora_alpha=16, use_rslora=True,
                         target_modules=["v_proj", "gate_proj", "up_proj", "down_proj"]))]


@pytest.mark.parametrize("parallel", [dict(pipeline_parallel_size=2)], ids=["pp2"])
def test_pipeline_parallel_mixed_adapters_match_peft_greedy(tmp_path, parallel):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    model_dir = save_tiny_llama(tmp_path / "llama", num_layers=4)
    adapters = {name: save_adapter(model_dir, tmp_path / name, seed=60 + i, **fields)
                for i, (name, fields) in enumerate(ADAPTERS)}
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (6, 19, 11, 27, 9, 14)]
    requests = [None] + [LoRARequest(name, i, str(path))
                         for i, (name, path) in enumerate(adapters.items(), start=1)]
    chosen = [requests[i % 3] for i in range(len(prompts))]
    llm = start_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8,
                    max_num_batched_tokens=32, **parallel)
    try:
        before = num_compilations(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True),
                            lora_request=chosen, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        after = num_compilations(llm)
        mesh = llm.collective_rpc("mesh_shape")[0]
        rows = llm.collective_rpc("replica_rows")[0]
    finally:
        shutdown(llm)
    want = [peft_greedy(model_dir, None if r is None else adapters[r.lora_name], p, NUM_NEW)
            for p, r in zip(prompts, chosen)]
    assert got == want
    base = [peft_greedy(model_dir, None, p, NUM_NEW) for p in prompts]
    assert all(w != b for w, b, r in zip(want, base, chosen) if r is not None)  # adapters matter
    assert after == before
    data = parallel.get("additional_config", {}).get("data_parallel_size", 1)
    assert mesh == {"stage": 2, "data": data, "model": parallel.get("tensor_parallel_size", 1)}
    if data > 1:
        assert len(rows) == data and min(rows) > 0, rows  # both replicas ran requests
