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

from tests.e2e.engines import shutdown, start_llm
from tests.helpers import save_tiny_llama
from tests.lora.lora_helpers import (generate_mixed, lora_requests, peft_expected, peft_greedy,
                                     save_adapter)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 8
ADAPTERS = [("vocab", dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens",
                                                              "lm_head"])),
            ("mlp", dict(r=8, lora_alpha=16, use_rslora=True,
                         target_modules=["v_proj", "gate_proj", "up_proj", "down_proj"]))]


@pytest.mark.parametrize("parallel", [dict(pipeline_parallel_size=2)], ids=["pp2"])
def test_pipeline_parallel_mixed_adapters_match_peft_greedy(tmp_path, parallel):
    model_dir = save_tiny_llama(tmp_path / "llama", num_layers=4)
    adapters = {name: save_adapter(model_dir, tmp_path / name, seed=60 + i, **fields)
                for i, (name, fields) in enumerate(ADAPTERS)}
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (6, 19, 11, 27, 9, 14)]
    requests = lora_requests(adapters)
    chosen = [requests[i % 3] for i in range(len(prompts))]
    llm = start_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8,
                    max_num_batched_tokens=32, **parallel)
    try:
        got, compiled = generate_mixed(llm, prompts, chosen, NUM_NEW)
        mesh = llm.collective_rpc("mesh_shape")[0]
        rows = llm.collective_rpc("replica_rows")[0]
    finally:
        shutdown(llm)
    want = peft_expected(model_dir, adapters, prompts, chosen, NUM_NEW)
    assert got == want
    base = [peft_greedy(model_dir, None, p, NUM_NEW) for p in prompts]
    assert all(w != b for w, b, r in zip(want, base, chosen) if r is not None)  # adapters matter
    assert compiled == 0
    data = parallel.get("additional_config", {}).get("data_parallel_size", 1)
    assert mesh == {"stage": 2, "data": data, "model": parallel.get("tensor_parallel_size", 1)}
    if data > 1:
        assert len(rows) == data and min(rows) > 0, rows  # both replicas ran requests
