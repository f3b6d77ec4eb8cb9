"""vllm.LLM with --enable-lora on a tiny random Qwen3-MoE with data parallel 2 x tensor
parallel 2 and expert parallel (virtual CPU devices): the experts, and their adapters'
stacks with them, split over all four devices (parallel/sharding.expert_spec); each
replica runs attention with its own tokens' slots, and every replica's tokens meet at the
experts with their own slots (layers/moe._every_replicas_adapters). One batch mixing the
base model, an attention adapter and one on attention and every expert (peft's fused
gate_up_proj / down_proj) gives transformers+peft's greedy output for each request, both
replicas ran requests, nothing compiled after warm-up."""

import numpy as np
import pytest

from tests.e2e.engines import shutdown, start_llm
from tests.helpers import save_tiny_family
from tests.lora.lora_helpers import (generate_mixed, lora_requests, peft_expected, peft_greedy,
                                     save_adapter)
from tests.lora.test_lora_moe import moe_adapters

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NUM_NEW = 8


def test_moe_data_parallel_expert_adapters_match_peft_greedy(tmp_path):
    model_dir = save_tiny_family(tmp_path / "moe", "qwen3_moe", norm_topk_prob=True)
    fields = dict(moe_adapters("qwen3_moe"))
    adapters = {name: save_adapter(model_dir, tmp_path / name, seed=70 + i, **fields[name])
                for i, name in enumerate(("m4", "e8"))}
    rng = np.random.default_rng(13)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 26, 13, 31, 5, 18)]
    requests = lora_requests(adapters)
    chosen = [requests[i % 3] for i in range(len(prompts))]
    llm = start_llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=16,
                    tensor_parallel_size=2, enable_expert_parallel=True,
                    max_num_batched_tokens=32, additional_config={"data_parallel_size": 2})
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
    assert mesh == {"data": 2, "model": 2}
    assert len(rows) == 2 and min(rows) > 0, rows
